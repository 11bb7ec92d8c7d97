"""Evaluators: COCO accuracy, label-free fidelity, latency (ONNX Runtime, TensorRT), analytic cost.

Each is a small class (or function) with keyword-only construction and one ``evaluate``
returning a frozen result from :mod:`evaluators.base`::

    from evaluators.coco import CocoEvaluator               # evaluate(onnx) -> AccuracyResult
    from evaluators.fidelity import FidelityEvaluator       # evaluate(onnx | module | callable) -> FidelityResult
    from evaluators.latency import OrtLatencyEvaluator      # evaluate(onnx) -> LatencyResult
    from evaluators.tensorrt import TensorRTLatencyEvaluator, tensorrt_available
    from evaluators.cost import analytic_cost               # (layers, assignment) -> CostResult
    from evaluators import make_latency_evaluator           # from a study's latency settings

Names are resolved lazily, so ``import evaluators`` loads neither onnxruntime nor torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evaluators.latency import OrtLatencyEvaluator
    from evaluators.tensorrt import TensorRTLatencyEvaluator
    from search.spec import LatencySpec, StudySpec

_LAZY = {
    "AccuracyResult": "evaluators.base", "FidelityResult": "evaluators.base", "LatencyResult": "evaluators.base",
    "CostResult": "evaluators.base", "CocoEvaluator": "evaluators.coco", "FidelityEvaluator": "evaluators.fidelity",
    "OrtLatencyEvaluator": "evaluators.latency", "TensorRTLatencyEvaluator": "evaluators.tensorrt",
    "tensorrt_available": "evaluators.tensorrt", "analytic_cost": "evaluators.cost",
    "EvaluatorError": "evaluators.errors", "EvaluatorUnavailable": "evaluators.errors",
    "ModelFormatError": "evaluators.errors", "ProviderError": "evaluators.errors",
}
LATENCY_ENGINES = {"ort": "evaluators.latency:OrtLatencyEvaluator",
                   "tensorrt": "evaluators.tensorrt:TensorRTLatencyEvaluator"}

__all__ = [*sorted(_LAZY), "LATENCY_ENGINES", "make_latency_evaluator"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evaluators' has no attribute {name!r}")


def make_latency_evaluator(spec: StudySpec | LatencySpec, *, imgsz: int | None = None,
                           providers: list[str] | None = None, disable_cpu_fallback: bool | None = None,
                           cache_dir: str | os.PathLike[str] | None = None
                           ) -> OrtLatencyEvaluator | TensorRTLatencyEvaluator:
    """The latency evaluator a study asks for (``latency.engine``: ``ort`` or ``tensorrt``).

    Given a whole :class:`~search.spec.StudySpec`, the image size, the providers
    (``latency.providers`` or else ``evaluation.providers``) and ``disable_cpu_fallback``
    come from it; given only a ``LatencySpec``, pass ``imgsz`` (and providers).
    """
    from mpq.errors import UserError

    lat: Any = getattr(spec, "latency", spec)
    if hasattr(spec, "latency"):
        imgsz = imgsz or spec.imgsz  # type: ignore[union-attr]
        providers = providers or spec.latency_providers  # type: ignore[union-attr]
        if disable_cpu_fallback is None:
            disable_cpu_fallback = spec.evaluation.disable_cpu_fallback  # type: ignore[union-attr]
    if imgsz is None:
        raise UserError("make_latency_evaluator needs imgsz when given only the latency settings")
    engine = getattr(lat, "engine", "ort")
    if engine not in LATENCY_ENGINES:
        raise UserError(f"latency.engine '{engine}' is not one of {', '.join(LATENCY_ENGINES)}")
    if engine == "tensorrt":
        from evaluators.tensorrt import TensorRTLatencyEvaluator

        return TensorRTLatencyEvaluator(cache_dir=cache_dir, imgsz=imgsz, warmup=lat.warmup, runs=lat.runs,
                                        batch_size=lat.batch_size, fp16=lat.fp16, int8=True)
    from evaluators.latency import OrtLatencyEvaluator

    return OrtLatencyEvaluator(providers=providers or lat.providers or ["CPUExecutionProvider"], imgsz=imgsz,
                               warmup=lat.warmup, runs=lat.runs, batch_size=lat.batch_size, threads=lat.threads,
                               disable_cpu_fallback=bool(disable_cpu_fallback), cache_dir=cache_dir)
