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
    from quantizers.lowering import LoweringResult
    from search.resources import StudyResources

#: the file a backend exports into when the target needs lowering (removed once lowered)
EXPORT_NAME = "export.onnx"


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
