"""Evaluators: COCO accuracy, label-free fidelity, latency (ONNX Runtime, TensorRT), analytic cost.

Each is a small class (or function) with keyword-only construction and one ``evaluate``
returning a frozen result from :mod:`evaluators.base`::

    from evaluators.coco import CocoEvaluator               # evaluate(onnx) -> AccuracyResult
    from evaluators.fidelity import FidelityEvaluator       # evaluate(onnx | module | callable) -> FidelityResult
    from evaluators.latency import OrtLatencyEvaluator      # evaluate(onnx) -> LatencyResult
    from evaluators.tensorrt import TensorRTLatencyEvaluator, tensorrt_available
    from evaluators.cost import analytic_cost               # (layers, assignment) -> CostResult
    from evaluators.bootstrap import PairedBootstrap        # interval(per-image records) -> BootstrapInterval
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
    from mpq.options import EvaluationSpec, LatencySpec

_LAZY = {
    "AccuracyResult": "evaluators.base", "FidelityResult": "evaluators.base", "LatencyResult": "evaluators.base",
    "CostResult": "evaluators.base", "CocoEvaluator": "evaluators.coco", "FidelityEvaluator": "evaluators.fidelity",
    "OrtLatencyEvaluator": "evaluators.latency", "TensorRTLatencyEvaluator": "evaluators.tensorrt",
    "tensorrt_available": "evaluators.tensorrt", "analytic_cost": "evaluators.cost",
    "PerImageEval": "evaluators.bootstrap", "PairedBootstrap": "evaluators.bootstrap",
    "BootstrapInterval": "evaluators.bootstrap",
    "EvaluatorError": "evaluators.errors", "EvaluatorUnavailable": "evaluators.errors",
    "ModelFormatError": "evaluators.errors", "ProviderError": "evaluators.errors",
}
#: The latency engines of ``latency.engine``.
LATENCY_ENGINES = ("ort", "tensorrt")

__all__ = [*sorted(_LAZY), "LATENCY_ENGINES", "make_latency_evaluator"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evaluators' has no attribute {name!r}")


def make_latency_evaluator(latency: LatencySpec, *, imgsz: int, evaluation: EvaluationSpec | None = None,
                           cache_dir: str | os.PathLike[str] | None = None
                           ) -> OrtLatencyEvaluator | TensorRTLatencyEvaluator:
    """The latency evaluator a study's ``latency`` section asks for (``engine``: ``ort`` or ``tensorrt``).

    ONNX Runtime runs on ``latency.providers``, else on ``evaluation.providers``, and honours
    ``evaluation.disable_cpu_fallback``.
    """
    from mpq.errors import UserError

    if latency.engine not in LATENCY_ENGINES:
        raise UserError(f"latency.engine '{latency.engine}' is not one of {', '.join(LATENCY_ENGINES)}")
    if latency.engine == "tensorrt":
        from evaluators.tensorrt import TensorRTLatencyEvaluator

        return TensorRTLatencyEvaluator(cache_dir=cache_dir, imgsz=imgsz, warmup=latency.warmup, runs=latency.runs,
                                        batch_size=latency.batch_size, fp16=latency.fp16, int8=True)
    from evaluators.latency import OrtLatencyEvaluator

    providers = latency.providers or (evaluation.providers if evaluation is not None else None)
    return OrtLatencyEvaluator(providers=providers or ["CPUExecutionProvider"], imgsz=imgsz,
                               warmup=latency.warmup, runs=latency.runs, batch_size=latency.batch_size,
                               threads=latency.threads, block=latency.block,
                               disable_cpu_fallback=bool(evaluation is not None and evaluation.disable_cpu_fallback),
                               cache_dir=cache_dir)
