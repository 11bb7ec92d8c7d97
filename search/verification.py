"""Verification of chosen trials: the same ONNX file re-measured on images the search never
scored, with paired-bootstrap intervals of every mAP change vs float.

The search picks its Pareto front on the images it scores trials on, so the front's numbers
include the winners' luck. :func:`verify_trials` takes each chosen trial's artifact (the
``model.onnx`` the trial was scored on; re-built through the trial pipeline when it is
gone), evaluates it on the study's verification split (``dataset.verify``) and computes,
with :class:`~evaluators.bootstrap.PairedBootstrap` (the same resampled images for the trial
and for float), a 95 % interval of its mAP50-95 change vs float on the verification split
and on the search split (from the per-image records the trial's own evaluation cached: no
second inference). Without a verification split only the search-split intervals are made
and every number is in-sample (:attr:`Verification.in_sample`).

Results are kept in ``verification.json`` of the run directory, keyed by what decides them
(the head, the split's images, the float model's file and each trial's file), and in the
study's user attributes (the dashboard shows them: Optuna refuses new attributes on a
finished trial, so they are the study's, one ``verify #N`` line per trial).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.files import file_digest, read_json, write_json

if TYPE_CHECKING:
    import optuna

    from evaluators.bootstrap import PairedBootstrap
    from evaluators.coco import CocoEvaluator
    from mpq.assignment import Assignment
    from search.pipeline import TrialPipeline

#: Resamples of the paired bootstrap (the 2.5 % tails then hold 25 resamples each) and its seed.
N_BOOT = 1000
SEED = 0
LEVEL = 0.95
FILE = "verification.json"


@dataclass(frozen=True)
class VerifiedTrial:
    """One trial's artifact on both splits: mAP50-95, its change vs float (trial minus float,
    on the same images) and the change's 95 % paired-bootstrap interval. The ``verify_*``
    fields are None without a verification split."""

    number: int
    digest: str
    onnx_sha256: str
    search_map: float
    search_change: float
    search_low: float
    search_high: float
    verify_map: float | None = None
    verify_map50: float | None = None
    verify_change: float | None = None
    verify_low: float | None = None
    verify_high: float | None = None
    seconds: float = 0.0
    """Wall time of the verification (evaluation on the verification split, both bootstraps)."""

    @property
    def verify_drop(self) -> float | None:
        """Float minus trial mAP50-95 on the verification split."""
        return None if self.verify_change is None else -self.verify_change

    def best_change(self) -> tuple[float, float, float]:
        """(change, low, high) on the verification split, or on the search split without one."""
        if self.verify_change is not None and self.verify_low is not None and self.verify_high is not None:
            return self.verify_change, self.verify_low, self.verify_high
        return self.search_change, self.search_low, self.search_high

    def to_json(self) -> dict[str, Any]:
        """A JSON dict of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VerifiedTrial:
        """Read :meth:`to_json`'s dict (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Verification:
    """The verification of a run's chosen trials (see the module docstring)."""

    key: dict[str, Any]
    head: str
    postprocess: str
    search_images: int
    verify_images: int
    float_search_map: float
    float_verify_map: float | None
    n_boot: int = N_BOOT
    level: float = LEVEL
    seconds: float = 0.0
    """Wall time of the last :func:`verify_trials` (loading, the float model's records, every new point)."""
    points: dict[str, VerifiedTrial] = field(default_factory=dict)

    @property
    def in_sample(self) -> bool:
        """True without a verification split: every number was scored on the images it was picked on."""
        return self.float_verify_map is None

    def get(self, digest: str) -> VerifiedTrial | None:
        """The verified numbers of the trial with assignment digest ``digest`` (None if not verified)."""
        return self.points.get(digest)

    def to_json(self) -> dict[str, Any]:
        """The ``verification.json`` content."""
        out = {k: v for k, v in asdict(self).items() if k != "points"}
        out["points"] = {d: p.to_json() for d, p in self.points.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verification:
        """Read :meth:`to_json`'s dict."""
        names = {f.name for f in fields(cls)} - {"points"}
        ver = cls(**{k: v for k, v in data.items() if k in names})
        ver.points = {d: VerifiedTrial.from_json(p) for d, p in (data.get("points") or {}).items()}
        return ver

    @classmethod
    def load(cls, run_dir: Path) -> Verification | None:
        """``verification.json`` of a run directory, or None."""
        path = Path(run_dir) / FILE
        if not path.is_file():
            return None
        try:
            return cls.from_json(read_json(path))
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Chosen:
    """A trial to verify: its number, assignment digest, artifact path and assignment (to re-build it)."""

    number: int
    digest: str
    artifact: Path
    assignment: Assignment


class Splits:
    """The float model's records and paired bootstraps on the search and verification splits, and
    :meth:`measure` of any artifact on both."""

    def __init__(self, pipeline: TrialPipeline) -> None:
        from evaluators.bootstrap import PairedBootstrap
        from evaluators.coco import CocoEvaluator
        from mpq.model import head_label

        res = pipeline.resources
        self.head = res.model.head
        self.postprocess = head_label(self.head)
        self.float_onnx = pipeline.baseline.onnx()
        self.search: CocoEvaluator = pipeline.evaluator.coco
        self.verify: CocoEvaluator | None = None
        if res.verify_subset is not None:
            self.verify = CocoEvaluator(subset=res.verify_subset, names=res.model.names, imgsz=res.spec.imgsz,
                                        settings=res.spec.evaluation, cache_dir=res.paths.cache,
                                        progress=res.progress)
        pe = self.search.per_image(self.float_onnx)
        self.boot_search: PairedBootstrap = PairedBootstrap(pe, n_boot=N_BOOT, seed=SEED, level=LEVEL)
        self.float_search_map = pe.map()["map50_95"]
        self.boot_verify: PairedBootstrap | None = None
        self.float_verify_map: float | None = None
        if self.verify is not None:
            pe = self.verify.per_image(self.float_onnx)
            self.boot_verify = PairedBootstrap(pe, n_boot=N_BOOT, seed=SEED, level=LEVEL)
            self.float_verify_map = pe.map()["map50_95"]

    def summary(self, key: dict[str, Any] | None = None) -> Verification:
        """A :class:`Verification` of these splits, without points yet."""
        return Verification(key=key or {}, head=self.head, postprocess=self.postprocess,
                            search_images=len(self.search.subset),
                            verify_images=len(self.verify.subset) if self.verify is not None else 0,
                            float_search_map=self.float_search_map, float_verify_map=self.float_verify_map)

    def describe_splits(self) -> dict[str, Any]:
        """The splits' sizes, the float model's mAP50-95 on each, and the bootstrap (for sidecar files)."""
        v = self.summary()
        return {"search_images": v.search_images, "verify_images": v.verify_images,
                "float_search_map": v.float_search_map, "float_verify_map": v.float_verify_map,
                "in_sample": v.in_sample, "n_boot": N_BOOT, "level": LEVEL, "head": self.head,
                "postprocess": self.postprocess}

    def measure(self, number: int, digest: str, onnx: Path) -> VerifiedTrial:
        """One artifact on both splits, with its paired intervals vs float (the search split's records
        come from the trial's own evaluation when it cached them: no second inference)."""
        start = time.perf_counter()
        search_pe = self.search.per_image(onnx)
        s = self.boot_search.interval(search_pe, "map50_95")
        out: dict[str, Any] = {"number": number, "digest": digest, "onnx_sha256": file_digest(onnx),
                               "search_map": search_pe.map()["map50_95"], "search_change": s.delta,
                               "search_low": s.low, "search_high": s.high}
        if self.verify is not None and self.boot_verify is not None:
            pe = self.verify.per_image(onnx)
            v = self.boot_verify.interval(pe, "map50_95")
            m = pe.map()
            out.update(verify_map=m["map50_95"], verify_map50=m["map50"], verify_change=v.delta, verify_low=v.low,
                       verify_high=v.high)
        return VerifiedTrial(**out, seconds=time.perf_counter() - start)


def splits_for(pipeline: TrialPipeline) -> Splits:
    """The :class:`Splits` of a study's pipeline."""
    return Splits(pipeline)


def verification_key(pipeline: TrialPipeline) -> dict[str, Any]:
    """What decides the verified numbers besides each trial's file: the head, both splits' images,
    the annotations, the evaluation settings, the float model's file and the bootstrap."""
    res = pipeline.resources
    spec = res.spec
    verify_ids = res.verify_subset.image_ids if res.verify_subset is not None else []
    ids = hashlib.sha256(json.dumps([list(res.subset.image_ids), list(verify_ids)]).encode()).hexdigest()[:16]
    return {"head": spec.head, "images": ids, "annotations": str(spec.dataset.annotations),
            "evaluation": spec.evaluation.model_dump(mode="json"), "float": file_digest(pipeline.baseline.onnx()),
            "n_boot": N_BOOT, "seed": SEED, "level": LEVEL}


def verify_trials(pipeline: TrialPipeline, chosen: Sequence[Chosen], *,
                  log: Callable[[str], None] | None = None) -> Verification:
    """Verify ``chosen`` (reusing ``verification.json`` for trials already verified with the same
    files and key), write ``verification.json`` and return it."""
    start = time.perf_counter()
    res = pipeline.resources
    key = verification_key(pipeline)
    old = Verification.load(res.run_dir)
    splits = Splits(pipeline)
    ver = splits.summary(key)
    if old is not None and old.key == key:
        ver.points = dict(old.points)
    for c in chosen:
        artifact = c.artifact if c.artifact.is_file() else pipeline.run(c.assignment).artifact
        prior = ver.points.get(c.digest)
        if prior is not None and prior.onnx_sha256 == file_digest(artifact):
            ver.points[c.digest] = VerifiedTrial.from_json({**prior.to_json(), "number": c.number})
            continue
        if log is not None:
            log(f"verifying trial #{c.number} ({artifact.parent.name}) on "
                f"{'the verification split' if splits.verify is not None else 'the search split (in-sample)'}")
        ver.points[c.digest] = splits.measure(c.number, c.digest, artifact)
    ver.seconds = time.perf_counter() - start
    write_json(res.run_dir / FILE, ver.to_json())
    return ver


def store_in_study(study: optuna.Study, ver: Verification) -> None:
    """The verified numbers as the study's user attributes (the dashboard shows them)."""
    study.set_user_attr("verification", {k: v for k, v in ver.to_json().items() if k != "key"})
    for p in sorted(ver.points.values(), key=lambda p: p.number):
        study.set_user_attr(f"verify #{p.number}", describe(p, ver))


def describe(p: VerifiedTrial, ver: Verification) -> str:
    """One line: the trial's mAP and change vs float on both splits, with their intervals."""
    search = (f"search split ({ver.search_images} images): mAP {p.search_map:.4f}, "
              f"{_pt(p.search_change)} [{_pt(p.search_low)}, {_pt(p.search_high)}]")
    if p.verify_map is None or p.verify_change is None or p.verify_low is None or p.verify_high is None:
        return f"{search} (in-sample: scored on the images it was picked on)"
    return (f"verification split ({ver.verify_images} images): mAP {p.verify_map:.4f}, {_pt(p.verify_change)} "
            f"[{_pt(p.verify_low)}, {_pt(p.verify_high)}]; {search}")


def _pt(x: float) -> str:
    return f"{100 * x:+.2f} pt"
