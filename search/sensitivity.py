"""The per-layer sensitivity sweep.

For each layer group and each low candidate precision, the group alone is quantized
through the study's backend and the damage is measured:

- ``fidelity`` (default, label-free): 1 - mAP50-95 of the probe's detections scored
  against the float model's detections on calibration images, plus the noise-to-signal
  ratio of the raw head output (a tie-breaker where no detection changes);
- ``map``: mAP50-95 drop on the first ``sensitivity.images`` labelled evaluation images;
- ``fisher``: a gradient score, 1/2 * sum(F * dW^2) (+ the same for the layer's input
  when activations go to INT8), with the empirical Fisher F of the YOLO detection loss
  against the float model's detections (see :mod:`search.gradients`).

The table is cached in ``sensitivity.json`` in the run directory, keyed by model, data,
backend and candidates (:func:`mpq.keys.sweep_key`), and reused unless one of them changes.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpq import keys
from mpq.assignment import Assignment, LayerGroup, Precision
from mpq.errors import UserError
from mpq.files import read_sealed_json, write_json, write_sealed_json

if TYPE_CHECKING:
    from search.baseline import FloatBaseline
    from search.resources import StudyResources

METRICS = ("fidelity", "map", "fisher")


@dataclass
class SensitivityTable:
    """Damage per (group, candidate); higher is more sensitive."""

    metric: str
    key: dict[str, Any]
    groups: list[str]
    scores: dict[str, dict[str, dict[str, float]]]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def damage(self, group: str, precision: Precision | str) -> float:
        """The damage of ``group`` at ``precision`` (0 for float or an unprobed precision)."""
        p = Precision.parse(precision)
        if p.is_float:
            return 0.0
        entry = self.scores.get(group, {}).get(str(p))
        if entry is not None:
            return float(entry["damage"])
        # a precision that was not probed (W8A16 by default): estimate it from a probed one with
        # the same activations and fewer weight bits, scaling by the quantization noise power
        # (4x less per extra bit); else bound it by the probed precisions it dominates
        probed = {Precision.parse(k): float(v["damage"]) for k, v in self.scores.get(group, {}).items()}
        same_act = [(q, d) for q, d in probed.items() if q.a_bits == p.a_bits and q.w_bits < p.w_bits]
        if same_act:
            q, d = max(same_act, key=lambda t: t[0].w_bits)
            return d * 4.0 ** -(p.w_bits - q.w_bits)
        worse = [d for q, d in probed.items() if q.w_bits <= p.w_bits and q.a_bits <= p.a_bits]
        return min(worse) if worse else 0.0

    def candidates(self) -> list[str]:
        """The probed precisions, lowest first."""
        seen: dict[str, None] = {}
        for per in self.scores.values():
            for k in per:
                seen.setdefault(k, None)
        return sorted(seen, key=lambda s: Precision.parse(s))

    def group_score(self, group: str) -> float:
        """One number per group for ranking: its largest damage over the probed candidates."""
        per = self.scores.get(group, {})
        return max((float(v["damage"]) for v in per.values()), default=0.0)

    def ranking(self, precision: Precision | str | None = None) -> list[str]:
        """Group names, most sensitive first (by ``precision``'s damage, or the largest)."""
        if precision is None:
            return sorted(self.groups, key=lambda g: (-self.group_score(g), g))
        return sorted(self.groups, key=lambda g: (-self.damage(g, precision), g))

    def to_json(self) -> dict[str, Any]:
        """The ``sensitivity.json`` content."""
        return {"version": 1, "metric": self.metric, "key": self.key, "groups": self.groups,
                "scores": self.scores, "seconds": self.seconds, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensitivityTable:
        """Read :meth:`to_json`'s dict."""
        return cls(data["metric"], data["key"], list(data["groups"]), data["scores"],
                   float(data.get("seconds", 0.0)), dict(data.get("extra", {})))


def sweep_key(res: StudyResources, metric: str, candidates: Iterable[Precision]) -> dict[str, Any]:
    """What decides the table of ``metric`` over ``candidates`` (see :func:`mpq.keys.sweep_key`)."""
    s = res.spec
    return keys.sweep_key(model=res.model_digest, data=res.data_digest, imgsz=s.imgsz, granularity=s.granularity,
                          groups=[g.name for g in res.groups], backend=s.backend, metric=metric,
                          candidates=candidates, images=s.sensitivity.images, deploy=_probe_target(s.deploy))


def _probe_target(deploy: Any) -> str:
    """The deploy settings the probes' files depend on (``ort-cpu+int8-silu``: the SiLU between A8
    layers runs on integers, see ``deploy.int8_silu``; ``+int8-ops``: so do the ops between them,
    see ``deploy.int8_ops``)."""
    if deploy.target != "ort-cpu" or not deploy.int8_silu:
        return str(deploy.target)
    return f"{deploy.target}+int8-silu" + ("+int8-ops" if deploy.int8_ops else "")


def sweep_candidates(res: StudyResources) -> list[Precision]:
    """The probed candidates: the spec's ``sensitivity.candidates``, by default the study's
    candidates without W8A16 when W4A16 is probed (8-bit weights alone are near-lossless;
    their damage is estimated from W4A16's, see :meth:`SensitivityTable.damage`)."""
    if res.spec.sensitivity.candidates:
        return list(res.spec.sensitivity.candidates)
    cands = list(res.spec.candidates)
    if Precision(8, 16) in cands and Precision(4, 16) in cands:
        cands.remove(Precision(8, 16))
    return cands


def load_cached(res: StudyResources, metric: str | None = None) -> SensitivityTable | None:
    """The cached table of ``metric`` (default: the study's), if it was made in this context."""
    metric = metric or res.spec.sensitivity.metric
    path = table_path(res, metric)
    if not path.is_file():
        return None
    try:
        table = SensitivityTable.from_json(read_sealed_json(path))
    except (KeyError, ValueError, TypeError) as exc:
        from search.console import warn

        warn(f"{path}: {exc}; running the sweep again")
        return None
    return table if table.key == sweep_key(res, metric, sweep_candidates(res)) else None


def table_path(res: StudyResources, metric: str) -> Path:
    """Where the table of ``metric`` is cached in the run directory."""
    return res.paths.sensitivity(metric, res.spec.sensitivity.metric)


def run_sweep(res: StudyResources, baseline: FloatBaseline, *, metric: str | None = None, fresh: bool = False,
              progress: bool = True, heartbeat: Callable[[], None] | None = None) -> SensitivityTable:
    """Load the cached table or compute it (and cache it); ``heartbeat`` is called after each probe."""
    metric = metric or res.spec.sensitivity.metric
    if metric not in METRICS:
        raise UserError(f"unknown sensitivity metric '{metric}'; choose one of {', '.join(METRICS)}")
    if not fresh:
        cached = load_cached(res, metric)
        if cached is not None:
            return cached
    candidates = sweep_candidates(res)
    start = time.perf_counter()
    if metric == "fisher":
        from search.gradients import fisher_sensitivity

        scores, extra = fisher_sensitivity(res, candidates, progress=progress)
    else:
        scores, extra = _probe_sweep(res, baseline, metric, candidates, progress=progress, heartbeat=heartbeat)
    table = SensitivityTable(metric, sweep_key(res, metric, candidates), [g.name for g in res.groups], scores,
                             time.perf_counter() - start, extra)
    res.run_dir.mkdir(parents=True, exist_ok=True)
    write_sealed_json(table_path(res, metric), table.to_json())
    return table


def _probe_sweep(res: StudyResources, baseline: FloatBaseline, metric: str, candidates: list[Precision],
                 progress: bool = True, heartbeat: Callable[[], None] | None = None,
                 ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """Quantize each group alone at each candidate and measure the damage."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from search.console import console_err

    n_img = res.spec.sensitivity.images
    probes: list[tuple[LayerGroup, Precision]] = []
    for g in res.groups:
        allowed = res.candidates_for(g)
        probes.extend((g, p) for p in candidates if p in allowed)
    scores: dict[str, dict[str, dict[str, float]]] = {g.name: {} for g in res.groups}
    extra: dict[str, Any] = {"images": n_img, "probes": len(probes)}

    if metric == "fidelity":
        from evaluators.fidelity import FidelityEvaluator

        images = res.calibration.images[:n_img]
        fid = FidelityEvaluator(reference=res.model.module, images=images, names=res.model.names,
                                batch_size=len(images))
        tails = BlockCache(res.model.module, images)
        extra["forward"] = "float block outputs cached; each probe runs from its first quantized block on"

        def measure(qm: Any, tmp: Path) -> dict[str, float]:
            if qm.module is not None:
                target: Any = tails.tail(qm.module, start_block(qm.assignment))
            else:
                target = _export_tmp(res, qm, tmp, baseline.onnx())
            r = fid.evaluate(target)
            # detection disagreement, plus the output noise-to-signal ratio as a fine tie-breaker
            # (det_map saturates at 1.0 for layers that change no detection on a few images)
            nsr = 10.0 ** (-r.sqnr_db / 10.0) if math.isfinite(r.sqnr_db) else 0.0
            return {"damage": max(0.0, 1.0 - r.det_map) + nsr, "det_map": r.det_map, "sqnr_db": r.sqnr_db}
    else:  # map on a small labelled subset
        from evaluators.coco import CocoEvaluator

        small = CocoEvaluator(subset=res.subset.head(n_img), names=res.model.names, imgsz=res.spec.imgsz,
                              settings=res.spec.evaluation, cache_dir=res.paths.cache / f"sweep-map-{n_img}")
        base = small.evaluate(baseline.onnx()).map50_95
        extra["float_map"] = base

        def measure(qm: Any, tmp: Path) -> dict[str, float]:
            path = _export_tmp(res, qm, tmp, baseline.onnx())
            m = small.evaluate(path).map50_95
            return {"damage": max(0.0, base - m), "map50_95": m, "drop": base - m}

    columns = (TextColumn("[bold]sweep[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmpdir, \
            Progress(*columns, console=console_err, disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{metric} ({len(probes)} probes)", total=len(probes))
        for g, p in probes:
            bar.update(task, description=f"{metric}: {g.name} {p}")
            qm = res.materialize(Assignment.from_groups([g], {g.name: p}))
            entry = measure(qm, Path(tmpdir))
            entry["damage"] = float(entry["damage"]) if math.isfinite(entry["damage"]) else 1.0
            scores[g.name][str(p)] = entry
            bar.advance(task)
            if heartbeat is not None:
                heartbeat()
    return scores, extra


def start_block(assignment: Assignment) -> int:
    """Index of the first top-level block (``model.<i>``) an assignment quantizes."""
    return min((int(name.split(".")[1]) for name in assignment), default=0)


class BlockCache:
    """Float outputs of every top-level block on a fixed image batch, so that a probe that
    quantizes layers of block ``k`` only runs blocks ``k..end`` (exact: earlier blocks of a
    probe are float copies).

    The fidelity evaluator calls its candidate on the same array each time; the cache is
    keyed by that array's memory address.
    """

    def __init__(self, module: Any, images: np.ndarray) -> None:
        import torch

        self.module = module
        self.images = images
        self._outs: dict[int, list[Any]] = {}
        from mpq.model import run_blocks

        x = torch.from_numpy(np.ascontiguousarray(images))
        with torch.no_grad():
            _, outs = run_blocks(module.model, x)
        self._outs[x.data_ptr()] = outs

    def tail(self, qmodule: Any, start: int) -> Any:
        """A module running ``qmodule`` from block ``start`` on, with cached float inputs."""
        import torch
        from torch import nn

        from mpq.model import first_output, run_blocks

        cache = self._outs

        class Tail(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = qmodule.model
                self.save = qmodule.save

            def forward(self, x: torch.Tensor) -> Any:
                outs = cache.get(x.data_ptr())
                if outs is None or start == 0:
                    return qmodule(x)
                h, _ = run_blocks(list(self.model)[start:], outs[start - 1], outputs=list(outs[:start]))
                return first_output(h)

        return Tail().eval()


def _export_tmp(res: StudyResources, qm: Any, tmp: Path, float_onnx: Path) -> Path:
    """Export a probe and lower it for the deploy target: a probe is measured on what a trial would run."""
    from search import deploy

    path = tmp / "probe.onnx"
    exported = deploy.export(res, qm, path, float_onnx=float_onnx).path
    deploy.lower_export(res, exported, path, qm.assignment, {})
    return path


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return float("nan")
    rho = spearmanr(xs, ys).statistic
    return float(rho)


def correlation_report(res: StudyResources, baseline: FloatBaseline, *, fresh: bool = False) -> Any:
    """How well each cheap score predicts the measured per-probe mAP drop (Spearman).

    Computes (or loads) the ``map`` sweep and the ``fidelity`` and ``fisher`` sweeps of the
    same probes, then ranks them against the mAP drop, per candidate and over all probes.
    """
    from rich.table import Table

    tables = {m: run_sweep(res, baseline, metric=m, fresh=fresh) for m in ("map", "fidelity", "fisher")}
    truth = tables["map"]
    out = Table(title=f"Spearman rank correlation with the measured mAP drop ({len(truth.groups)} groups)")
    out.add_column("score")
    cands = truth.candidates()
    for c in [*cands, "all probes"]:
        out.add_column(c, justify="right")
    out.add_column("seconds", justify="right")
    result: dict[str, dict[str, float]] = {}
    for name in ("fidelity", "fisher", "map"):
        t = tables[name]
        row = []
        result[name] = {}
        all_x: list[float] = []
        all_y: list[float] = []
        for c in cands:
            xs = [t.damage(g, c) for g in truth.groups if c in truth.scores.get(g, {})]
            ys = [truth.damage(g, c) for g in truth.groups if c in truth.scores.get(g, {})]
            all_x += xs
            all_y += ys
            rho = spearman(xs, ys)
            result[name][c] = rho
            row.append(f"{rho:.3f}")
        rho_all = spearman(all_x, all_y)
        result[name]["all"] = rho_all
        out.add_row(name if name != "map" else "map (itself)", *row, f"{rho_all:.3f}", f"{t.seconds:.0f}")
    write_json(res.run_dir / "sensitivity-correlation.json", result)
    return out
