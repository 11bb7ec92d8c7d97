"""The run context: everything a command needs for one study, built lazily and cached.

A :class:`RunContext` owns the run directory (``runs/<study-name>/``) and builds, on first
use, the fused float model, its layer groups, the quantizer backend, the calibration set,
the COCO evaluator and the float baseline (ONNX + metrics, cached on disk). The sweep, the
study, ``quantize`` and ``export`` all evaluate assignments through
:meth:`RunContext.build_and_evaluate`, so a trial is the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.assignment import FLOAT, Assignment, LayerGroup, Precision
from search.runs import environment, read_json, write_json, write_text

if TYPE_CHECKING:
    from quantizers.base import CalibrationSet, QuantizedModel, QuantizerBackend
    from search.data import CocoSubset
    from search.model import LoadedModel
    from search.spec import StudySpec


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TrialOutcome:
    """What building and evaluating one assignment produced (all JSON-serializable)."""

    digest: str
    assignment: Assignment
    metrics: dict[str, Any]
    summary: dict[str, Any]
    timings: dict[str, float]
    artifact: Path
    export_info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "assignment": self.assignment.to_dict(), "metrics": self.metrics,
                "summary": self.summary, "timings": self.timings, "artifact": str(self.artifact),
                "export": self.export_info, "worker": worker_id()}


class RunContext:
    """Lazily built components of one study run.

    Args:
        spec: the validated study spec.
        run_dir: where artifacts go (default ``spec.run_dir()``).
        device: torch device for calibration (default: the spec's ``device``).
        progress: show rich progress bars.
    """

    def __init__(self, spec: StudySpec, *, run_dir: Path | None = None, device: str | None = None,
                 progress: bool = True) -> None:
        self.spec = spec
        self.run_dir = Path(run_dir) if run_dir else spec.run_dir()
        self._device = device or spec.device
        self.progress = progress

    # -- files ------------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """Create the run dir and write ``spec.yaml`` and ``env.json``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.run_dir / "spec.yaml", self.spec.to_yaml())
        env = environment()
        env["device"] = self.device
        write_json(self.run_dir / "env.json", env)

    @property
    def cache_dir(self) -> Path:
        return self.run_dir / "cache"

    @cached_property
    def device(self) -> str:
        from search.runs import resolve_device

        return resolve_device(self._device)

    # -- model and data -----------------------------------------------------------------------
    @cached_property
    def model(self) -> LoadedModel:
        from search.model import load_model

        return load_model(self.spec.model, self.spec.imgsz, max_det=self.spec.evaluation.max_det)

    @cached_property
    def model_digest(self) -> str:
        return file_digest(self.spec.model) if self.spec.model.is_file() else str(self.spec.model)

    @cached_property
    def groups(self) -> list[LayerGroup]:
        import fnmatch

        groups = self.model.groups(self.spec.granularity)
        if self.spec.keep_float:
            groups = [g for g in groups
                      if not any(fnmatch.fnmatch(name, pat) for name in (g.name, *g.layers)
                                 for pat in self.spec.keep_float)]
        return groups

    @cached_property
    def backend(self) -> QuantizerBackend:
        from quantizers import get_backend
        from search.console import console_err

        # cache_dir: one-time per-model work of the backend (issue 13: rounded weights), reused by reruns
        return get_backend(self.spec.backend, device=self.device, cache_dir=self.cache_dir / "weights",
                           progress=self.progress, console=console_err)

    def candidates_for(self, group: LayerGroup) -> list[Precision]:
        """The study's candidates this backend can build for every layer of ``group`` (float excluded)."""
        caps = self.backend.capabilities
        by_name = {lay.name: lay for lay in self.model.layers}
        return [p for p in self.spec.candidates
                if all(caps.supports(by_name[name], p) for name in group.layers)]

    @cached_property
    def calibration(self) -> CalibrationSet:
        from quantizers.base import CalibrationSet
        from search.data import preprocess_many, read_calibration_list

        cal = self.spec.calibration
        paths = read_calibration_list(cal.source, cal.max_images)
        images, _ = preprocess_many(paths, self.spec.imgsz, cache=self.cache_dir / "calibration.npz",
                                    progress=self.progress, description="calibration images")
        return CalibrationSet(images=images, paths=paths, batch_size=cal.batch_size)

    @cached_property
    def subset(self) -> CocoSubset:
        from search.data import load_coco_subset

        ds = self.spec.dataset
        return load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)

    @cached_property
    def data_digest(self) -> str:
        payload = {"ids": self.subset.image_ids, "ann": str(self.spec.dataset.annotations),
                   "calib": [str(p) for p in self.calibration.paths], "imgsz": self.spec.imgsz}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    # -- evaluators ---------------------------------------------------------------------------
    @cached_property
    def coco(self) -> Any:
        from evaluators.coco import CocoEvaluator

        return CocoEvaluator(subset=self.subset, names=self.model.names, imgsz=self.spec.imgsz,
                             settings=self.spec.evaluation, cache_dir=self.cache_dir)

    @cached_property
    def latency(self) -> Any:
        from evaluators import make_latency_evaluator

        return make_latency_evaluator(self.spec, cache_dir=self.cache_dir)

    # -- float baseline -----------------------------------------------------------------------
    @property
    def float_dir(self) -> Path:
        return self.run_dir / "float"

    def float_onnx(self) -> Path:
        """The float model's ONNX (exported once per model digest and image size)."""
        from search.model import export_onnx

        path = self.float_dir / "model.onnx"
        stamp = self.float_dir / "source.json"
        key = {"model": str(self.spec.model), "digest": self.model_digest, "imgsz": self.spec.imgsz,
               "max_det": self.spec.evaluation.max_det}
        if path.is_file() and stamp.is_file() and read_json(stamp) == key:
            return path
        export_onnx(self.model.module, path, self.spec.imgsz)
        write_json(stamp, key)
        return path

    def float_metrics(self) -> dict[str, Any]:
        """COCO metrics, latency and cost of the float model (cached in ``float/metrics.json``)."""
        onnx_path = self.float_onnx()
        cache = self.float_dir / "baseline.json"
        key = {"onnx": file_digest(onnx_path), "data": self.data_digest,
               "eval": self.spec.evaluation.model_dump(mode="json"),
               "latency": self.spec.latency.model_dump(mode="json")}
        if cache.is_file():
            data = read_json(cache)
            if data.get("key") == key:
                return dict(data["metrics"])
        outcome = self._evaluate_onnx(onnx_path, Assignment(), {}, reference=False)
        write_json(cache, {"key": key, "metrics": outcome})
        return outcome

    # -- trials -------------------------------------------------------------------------------
    def cost(self, assignment: Assignment) -> dict[str, Any]:
        from evaluators.cost import analytic_cost

        return analytic_cost(self.model.layers, assignment).to_dict()

    def materialize(self, assignment: Assignment) -> QuantizedModel:
        self.backend.capabilities.check(self.model.layers, assignment)
        qmodel = self.backend.materialize(self.model, assignment, self.calibration)
        weights = qmodel.info.get("weights", {})
        if weights.get("served_from") in ("computed", "disk"):  # issue 13: record the one-time cost in the run
            write_json(self.run_dir / "weights.json", {**weights, "seconds": qmodel.timings.get("weights"),
                                                       "cache_dir": str(self.cache_dir / "weights")})
        return qmodel

    def _evaluate_onnx(self, onnx_path: Path, assignment: Assignment, timings: dict[str, float], *,
                       reference: bool = True) -> dict[str, Any]:
        """COCO accuracy, latency and cost of one ONNX model.

        With ``latency.reference: float`` (ort engine), the model is timed in alternation
        with the float model, and ``latency_ms`` is its ratio to float times the float
        baseline's milliseconds (``latency_measured_ms`` keeps the raw median).
        """
        base_ms = None
        ref_onnx = None
        if reference and self.spec.latency.reference == "float" and self.spec.latency.engine == "ort":
            base_ms = float(self.float_metrics()["latency_ms"])
            ref_onnx = self.float_onnx()
        t0 = time.perf_counter()
        acc = self.coco.evaluate(onnx_path)
        timings["evaluate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = (self.latency.evaluate(onnx_path, reference=ref_onnx) if ref_onnx is not None
               else self.latency.evaluate(onnx_path))
        timings["latency"] = time.perf_counter() - t0
        cost = self.cost(assignment)
        latency: dict[str, Any] = {"latency_ms": lat.median_ms, "latency_p90_ms": lat.p90_ms,
                                   "latency_measured_ms": lat.median_ms}
        if base_ms is not None and "ratio" in lat.extra:
            ratio = float(lat.extra["ratio"])
            scale = base_ms / float(lat.extra["reference_median_ms"])
            latency = {"latency_ms": ratio * base_ms, "latency_p90_ms": lat.p90_ms * scale,
                       "latency_measured_ms": lat.median_ms, "latency_ratio": ratio,
                       "latency_float_same_window_ms": float(lat.extra["reference_median_ms"])}
        return {
            "map50_95": acc.map50_95, "map50": acc.map50, "map75": acc.map75,
            "per_class": acc.per_class, "images_per_s": acc.images_per_s, "provider": acc.provider,
            **latency, "latency_provider": lat.provider, "latency_device": lat.device,
            "latency_batch": lat.batch_size,
            "weight_bytes": cost["weight_bytes"], "size_ratio": cost["size_ratio"], "bops": cost["bops"],
            "w4_weight_share": cost["w4_weight_share"], "onnx_bytes": onnx_path.stat().st_size,
        }

    def trial_dir(self, assignment: Assignment) -> Path:
        return self.run_dir / "trials" / assignment.digest()

    def build_and_evaluate(self, assignment: Assignment, *, out_dir: Path | None = None,
                           use_cache: bool = True) -> TrialOutcome:
        """Materialize, export, evaluate (COCO, latency, cost) one assignment.

        Results are cached in ``out_dir`` (default ``trials/<digest>/``): a finished
        ``metrics.json`` is reused unless ``use_cache`` is false. Files are written
        atomically, so an interrupted build leaves no half-written artifact.
        """
        digest = assignment.digest()
        out_dir = out_dir or self.trial_dir(assignment)
        metrics_path = out_dir / "metrics.json"
        onnx_path = out_dir / "model.onnx"
        if use_cache and metrics_path.is_file() and onnx_path.is_file():
            data = read_json(metrics_path)
            if data.get("digest") == digest and data.get("context") == self.context_key():
                return TrialOutcome(digest, assignment, data["metrics"], data["summary"], data["timings"],
                                    onnx_path, data.get("export", {}), cached=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "assignment.json", assignment.to_json())
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        qmodel = self.materialize(assignment)
        timings["materialize"] = time.perf_counter() - t0
        timings.update({f"materialize.{k}": v for k, v in qmodel.timings.items()})
        t0 = time.perf_counter()
        export = self.backend.export(qmodel, onnx_path)
        timings["export"] = time.perf_counter() - t0
        metrics = self._evaluate_onnx(onnx_path, assignment, timings)
        timings["total"] = sum(v for k, v in timings.items() if "." not in k)
        summary = assignment.summary(self.model.layers)
        export_info = {"node_counts": dict(export.node_counts), "metadata": dict(export.metadata)}
        outcome = TrialOutcome(digest, assignment, metrics, summary, timings, onnx_path, export_info)
        write_json(metrics_path, {**outcome.to_json(), "context": self.context_key(),
                                  "backend": self.spec.backend.name})
        return outcome

    def context_key(self) -> dict[str, Any]:
        """What, besides the assignment, decides a trial's result."""
        return {"model": self.model_digest, "data": self.data_digest, "imgsz": self.spec.imgsz,
                "backend": self.spec.backend.model_dump(mode="json"),
                "eval": self.spec.evaluation.model_dump(mode="json"),
                "latency": self.spec.latency.model_dump(mode="json")}


def precision_label(p: Precision) -> str:
    return "float" if p == FLOAT else str(p)
