"""Evaluate one ONNX artifact the way every trial is evaluated: COCO accuracy, latency, analytic cost.

The float baseline and every trial go through :meth:`ArtifactEvaluator.evaluate`, so their
numbers are comparable. With a :class:`LatencyReference` (the float model, when the study's
``latency.reference`` is ``float`` on ONNX Runtime) the artifact is timed in alternating blocks with
the float model and its latency is reported as its ratio to float times the float
baseline's milliseconds (see :func:`latency_fields`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.results import TrialMetrics

if TYPE_CHECKING:
    from evaluators.base import LatencyResult
    from evaluators.coco import CocoEvaluator
    from evaluators.latency import OrtLatencyEvaluator
    from evaluators.tensorrt import TensorRTLatencyEvaluator
    from mpq.assignment import Assignment
    from search.resources import StudyResources


@dataclass(frozen=True)
class LatencyReference:
    """The model to time a candidate against, and its baseline median in milliseconds."""

    onnx: Path
    baseline_ms: float


def latency_fields(lat: LatencyResult, reference: LatencyReference | None) -> dict[str, Any]:
    """The latency metrics of a timing: raw, or relative to the reference timed in the same window."""
    if reference is None or "ratio" not in lat.extra:
        return {"latency_ms": lat.median_ms, "latency_p90_ms": lat.p90_ms, "latency_measured_ms": lat.median_ms}
    ratio = float(lat.extra["ratio"])
    same_window = float(lat.extra["reference_median_ms"])
    scale = reference.baseline_ms / same_window
    return {"latency_ms": ratio * reference.baseline_ms, "latency_p90_ms": lat.p90_ms * scale,
            "latency_measured_ms": lat.median_ms, "latency_ratio": ratio, "latency_float_same_window_ms": same_window}


class ArtifactEvaluator:
    """The study's evaluators (COCO on the evaluation subset, latency, analytic cost), built on first use."""

    def __init__(self, resources: StudyResources) -> None:
        self.res = resources

    @cached_property
    def coco(self) -> CocoEvaluator:
        """COCO mAP on the study's evaluation subset (images preprocessed once per run)."""
        from evaluators.coco import CocoEvaluator

        res = self.res
        return CocoEvaluator(subset=res.subset, names=res.model.names, imgsz=res.spec.imgsz,
                             settings=res.spec.evaluation, cache_dir=res.paths.cache)

    @cached_property
    def latency(self) -> OrtLatencyEvaluator | TensorRTLatencyEvaluator:
        """The latency evaluator of the spec's ``latency`` section."""
        from evaluators import make_latency_evaluator

        spec = self.res.spec
        return make_latency_evaluator(spec.latency, imgsz=spec.imgsz, evaluation=spec.evaluation,
                                      cache_dir=self.res.paths.cache)

    def evaluate(self, onnx_path: Path, assignment: Assignment, timings: dict[str, float], *,
                 reference: LatencyReference | None = None) -> TrialMetrics:
        """COCO accuracy, latency and cost of one ONNX model; adds ``evaluate`` and ``latency`` to ``timings``."""
        from evaluators.cost import analytic_cost

        t0 = time.perf_counter()
        acc = self.coco.evaluate(onnx_path)
        timings["evaluate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = (self.latency.evaluate(onnx_path, reference=reference.onnx) if reference is not None  # type: ignore[call-arg]
               else self.latency.evaluate(onnx_path))
        timings["latency"] = time.perf_counter() - t0
        cost = analytic_cost(self.res.model.layers, assignment)
        runtime = self.runtime(onnx_path, assignment, timings)
        return TrialMetrics(**runtime,
            map50_95=acc.map50_95, map50=acc.map50, map75=acc.map75, per_class=acc.per_class,
            images_per_s=acc.images_per_s, provider=acc.provider, **latency_fields(lat, reference),
            latency_provider=lat.provider, latency_device=lat.device, latency_batch=lat.batch_size,
            weight_bytes=cost.weight_bytes, size_ratio=cost.size_ratio, bops=cost.bops,
            w4_weight_share=cost.w4_weight_share, onnx_bytes=onnx_path.stat().st_size,
            head=acc.extra.get("postprocess", {}).get("head"))

    def runtime(self, onnx_path: Path, assignment: Assignment, timings: dict[str, float]) -> dict[str, Any]:
        """What ONNX Runtime runs as int8 (``a8_asked``, ``a8_ran_int8``, ``a8_ran_float``), read back
        from its optimized graph of ``onnx_path`` with the latency's providers; adds ``runtime_check``
        to ``timings``. Only for the ``ort`` latency engine and assignments with A8 layers."""
        spec = self.res.spec
        asked = {lay.name: str(assignment.get(lay.name)) for lay in self.res.model.quantizable_layers}
        n_a8 = sum(1 for p in asked.values() if p.endswith("A8"))
        if n_a8 == 0:
            return {"a8_asked": 0, "a8_ran_int8": 0}
        if spec.latency.engine != "ort":
            return {"a8_asked": n_a8}
        from evaluators.runtime import int8_layers

        t0 = time.perf_counter()
        report = int8_layers(onnx_path, providers=spec.latency.providers or spec.evaluation.providers,
                             threads=spec.latency.threads, asked=asked)
        timings["runtime_check"] = time.perf_counter() - t0
        return {"a8_asked": report.asked_a8, "a8_ran_int8": report.ran_int8,
                "a8_ran_float": tuple(report.a8_ran_float)}
