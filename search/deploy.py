"""The deployment step of a trial (issue 12): lower the backend's export for the study's
``deploy.target``, then prove what the runtime runs.

Kept apart from :mod:`search.context` so that the trial pipeline of the restructure can
call it as one step (materialize -> export -> **lower** -> evaluate (+ **what ran as int8**)):

- :func:`lower_export` turns ``export.onnx`` (what the backend wrote) into the trial's
  ``model.onnx`` (what the target runs; accuracy and latency are measured on it);
- :func:`runtime_metrics` reads back ONNX Runtime's optimized graph of that file and returns
  the flat metrics every trial stores (``a8_asked``, ``ran_int8``, ...) plus the per-layer
  list, with a visible warning for every layer asked for A8 that runs as float.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantizers.lowering import LoweringResult
    from search.assignment import Assignment
    from search.context import RunContext

#: the file a backend exports into when the target needs lowering (removed once lowered)
EXPORT_NAME = "export.onnx"


def export_path(ctx: RunContext, onnx_path: Path) -> Path:
    """Where the backend writes its export: ``onnx_path`` itself for ``qcdq``, else beside it."""
    return onnx_path if ctx.spec.deploy.target == "qcdq" else onnx_path.with_name(EXPORT_NAME)


def lower_export(ctx: RunContext, exported: Path, onnx_path: Path, assignment: Assignment,
                 timings: dict[str, float]) -> LoweringResult:
    """Lower ``exported`` into ``onnx_path`` for ``ctx.spec.deploy``; remove the export."""
    from quantizers.lowering import lower
    from quantizers.lowering import metadata_path as lowering_metadata_path

    t0 = time.perf_counter()
    images = ctx.calibration.images if ctx.spec.deploy.target == "ort-cpu" else None
    result = lower(exported, onnx_path, target=ctx.spec.deploy.target, layers=ctx.model.layers,
                   assignment={k: str(v) for k, v in assignment.items()}, images=images,
                   options=ctx.spec.deploy, cache_dir=ctx.cache_dir / "lowering",
                   batch_size=ctx.spec.calibration.batch_size)
    timings["lower"] = time.perf_counter() - t0
    if exported != onnx_path:
        exported.unlink(missing_ok=True)
        lowering_metadata_path(exported).unlink(missing_ok=True)
    return result


def runtime_metrics(ctx: RunContext, onnx_path: Path, assignment: Assignment,
                    timings: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flat metrics, full report) of what ONNX Runtime runs for ``onnx_path``.

    Flat metrics: ``a8_asked``, ``ran_int8``, ``a8_ran_float`` (count) and
    ``runtime_warning`` (a sentence, empty when every A8 layer runs an integer kernel).
    Only for the ``ort`` latency engine (TensorRT's per-layer precisions come from its
    engine inspector where TensorRT runs).
    """
    if ctx.spec.latency.engine != "ort":
        return {}, {}
    from evaluators.runtime import int8_layers

    t0 = time.perf_counter()
    asked = {lay.name: str(assignment.get(lay.name)) for lay in ctx.model.quantizable_layers}
    report = int8_layers(onnx_path, providers=ctx.spec.latency_providers, threads=ctx.spec.latency.threads,
                         asked=asked)
    timings["runtime_check"] = time.perf_counter() - t0
    flat = {"a8_asked": report.asked_a8, "ran_int8": report.ran_int8, "a8_ran_float": len(report.a8_ran_float),
            "runtime_warning": "; ".join(report.warnings)}
    return flat, report.to_dict()
