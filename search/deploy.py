"""The lowering stage of a trial (issue 12): the backend's export becomes the file the study's
``deploy.target`` runs, and that file is what the trial hands out and measures.

:meth:`search.pipeline.TrialPipeline.build` (and the sensitivity probes) call
:func:`export_path` for where the backend writes its export and :func:`lower_export` to
turn it into ``model.onnx``; what the runtime then runs as int8 is measured by
:meth:`search.evaluation.ArtifactEvaluator.runtime`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpq.assignment import Assignment
    from quantizers.base import ExportResult, QuantizedModel
    from quantizers.lowering import LoweringResult
    from search.resources import StudyResources

#: the file a backend exports into when the target needs lowering (removed once lowered)
EXPORT_NAME = "export.onnx"


def export(res: StudyResources, qmodel: QuantizedModel, onnx_path: Path, float_onnx: Path | None = None,
           timings: dict[str, float] | None = None) -> ExportResult:
    """The backend's Q/DQ graph of ``qmodel``, written where :func:`export_path` says.

    With ``deploy.export: emit`` (the default), a target that is lowered (not ``qcdq``), a
    backend that can ``emit`` and the float ONNX at hand, the graph is emitted into the float
    ONNX (:mod:`quantizers.emit`); otherwise, or when emission cannot write a quantizer (a
    warning says which), the backend traces its torch model (``export``). ``timings`` gains
    ``export`` and ``export.method``-style detail (``export.emit`` or ``export.trace``).
    """
    from quantizers.emit import EmitUnsupported

    path = export_path(res, onnx_path)
    t0 = time.perf_counter()
    emit = getattr(res.backend, "emit", None)
    result = None
    if (res.spec.deploy.export == "emit" and res.spec.deploy.target != "qcdq" and emit is not None
            and float_onnx is not None and qmodel.module is not None):
        try:
            result = emit(qmodel, path, float_onnx)
        except EmitUnsupported as exc:
            from search.console import warn

            warn(f"{exc}; tracing the backend's export instead")
    method = "emit" if result is not None else "trace"
    if result is None:
        result = res.backend.export(qmodel, path)
    if timings is not None:
        timings["export"] = time.perf_counter() - t0
        timings[f"export.{method}"] = timings["export"]
    return result


def export_path(res: StudyResources, onnx_path: Path) -> Path:
    """Where the backend writes its export: ``onnx_path`` itself for ``qcdq``, else beside it."""
    return onnx_path if res.spec.deploy.target == "qcdq" else onnx_path.with_name(EXPORT_NAME)


def lower_export(res: StudyResources, exported: Path, onnx_path: Path, assignment: Assignment,
                 timings: dict[str, float]) -> LoweringResult:
    """Lower ``exported`` into ``onnx_path`` for the spec's ``deploy`` section; remove the export.

    Adds ``lower`` to ``timings``. The lowered file's metadata (``<onnx_path>.json``) replaces
    the export's: target, rules, violations, per-layer forms, packed and file sizes, notes.
    """
    from quantizers.lowering import lower
    from quantizers.lowering import metadata_path as lowering_metadata_path

    spec = res.spec
    t0 = time.perf_counter()
    images = res.calibration.images if spec.deploy.target == "ort-cpu" else None
    result = lower(exported, onnx_path, target=spec.deploy.target, layers=res.model.layers,
                   assignment={k: str(v) for k, v in assignment.items()}, images=images,
                   options=spec.deploy, cache_dir=res.paths.cache / "lowering",
                   batch_size=spec.calibration.batch_size)
    timings["lower"] = time.perf_counter() - t0
    if exported != onnx_path:
        exported.unlink(missing_ok=True)
        lowering_metadata_path(exported).unlink(missing_ok=True)
    return result
