"""The trial pipeline: one assignment -> a quantized ONNX artifact -> its metrics.

Stages, in order (each timed in ``TrialResult.timings``):

1. ``materialize``: the backend builds the assignment on a copy of the float model;
2. ``export``: the backend writes the Q/DQ ONNX (``export.onnx``, or ``model.onnx`` for
   the ``qcdq`` target);
3. ``lower``: :func:`search.deploy.lower_export` rewrites it for the spec's ``deploy.target``
   into ``model.onnx`` + ``model.onnx.json`` (the file every later stage, ``search quantize``
   and ``search export`` hand out);
4. ``evaluate`` / ``latency`` / ``runtime_check``: :class:`~search.evaluation.ArtifactEvaluator`
   measures that file (COCO accuracy, latency against the float model, analytic cost, what
   ONNX Runtime runs as int8).

A stage that transforms the artifact (e.g. lowering it for a deployment target) goes in
:meth:`TrialPipeline.build` after ``export`` and hands the next stage its own file; a new
measurement goes in the evaluator and adds a field to :class:`~search.results.TrialMetrics`.

Results are cached per assignment in ``trials/<digest>/``: a finished ``metrics.json`` made in
the same context (:meth:`~search.resources.StudyResources.context_key`) is reused, but only
while the artifact on disk is the one it measured (its SHA-256 and size, recorded under
``files``); otherwise the trial is rebuilt with a warning naming the file. The sweep,
the study, ``search quantize`` and ``search export`` all build through :meth:`TrialPipeline.run`,
so a trial is the same everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.files import file_record, read_json, record_mismatch, write_json, write_text
from search.baseline import FloatBaseline
from search.console import warn
from search.evaluation import ArtifactEvaluator
from search.resources import StudyResources
from search.results import TrialResult

if TYPE_CHECKING:
    from mpq.assignment import Assignment
    from search.spec import StudySpec


@dataclass
class Artifact:
    """The file a trial is measured on, what its export reported, and the stages' times so far."""

    path: Path
    export: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    #: what the lowering adds to the trial's metrics (target, packed weight bytes, rule violations)
    lowering: dict[str, Any] = field(default_factory=dict)


class TrialPipeline:
    """Builds and evaluates assignments of one study.

    Args:
        resources: the study's model, backend, calibration and data.
        evaluator: how artifacts are measured (default: the study's evaluators).
        baseline: the float baseline trials are compared and timed against.
    """

    def __init__(self, resources: StudyResources, evaluator: ArtifactEvaluator | None = None,
                 baseline: FloatBaseline | None = None) -> None:
        self.resources = resources
        self.evaluator = evaluator or ArtifactEvaluator(resources)
        self.baseline = baseline or FloatBaseline(resources, self.evaluator)

    @classmethod
    def for_spec(cls, spec: StudySpec, *, run_dir: Path | None = None, device: str | None = None,
                 progress: bool = True) -> TrialPipeline:
        """The pipeline of a study spec, with its resources and float baseline."""
        return cls(StudyResources(spec, run_dir=run_dir, device=device, progress=progress))

    def run(self, assignment: Assignment, *, out_dir: Path | None = None, use_cache: bool = True) -> TrialResult:
        """Build and evaluate ``assignment`` in ``out_dir`` (default ``trials/<digest>/``), reusing a cached result.

        Files are written atomically, so an interrupted build leaves no half-written artifact.
        """
        out_dir = out_dir or self.resources.paths.trial(assignment.digest())
        if use_cache:
            cached = self.cached(assignment, out_dir)
            if cached is not None:
                return cached
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "assignment.json", assignment.to_json())
        artifact = self.build(assignment, out_dir)
        timings = artifact.timings
        metrics = self.evaluator.evaluate(artifact.path, assignment, timings,
                                          reference=self.baseline.latency_reference())
        metrics = replace(metrics, **artifact.lowering)
        timings["total"] = sum(v for k, v in timings.items() if "." not in k)
        result = TrialResult(digest=assignment.digest(), assignment=assignment, metrics=metrics,
                             summary=assignment.summary(self.resources.model.layers), timings=timings,
                             artifact=artifact.path, export=artifact.export)
        write_json(out_dir / "metrics.json", {**result.to_json(), "context": self.resources.context_key(),
                                              "backend": self.resources.spec.backend.name,
                                              "files": artifact_records(artifact.path)})
        return result

    def build(self, assignment: Assignment, out_dir: Path) -> Artifact:
        """Materialize ``assignment``, export it and lower it for the deploy target to ``out_dir/model.onnx``."""
        from search import deploy

        res = self.resources
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        qmodel = res.materialize(assignment)
        timings["materialize"] = time.perf_counter() - t0
        timings.update({f"materialize.{k}": v for k, v in qmodel.timings.items()})
        onnx_path = out_dir / "model.onnx"
        export = deploy.export(res, qmodel, onnx_path, float_onnx=self.baseline.onnx(), timings=timings)
        lowered = deploy.lower_export(res, export.path, onnx_path, assignment, timings)
        return Artifact(path=lowered.path, timings=timings,
                        export={"node_counts": dict(lowered.node_counts), "metadata": dict(lowered.metadata),
                                "export_node_counts": dict(export.node_counts)},
                        lowering={"deploy_target": lowered.target, "weight_bytes_packed": lowered.weight_bytes_packed,
                                  "rule_violations": len(lowered.violations)})

    def cached(self, assignment: Assignment, out_dir: Path) -> TrialResult | None:
        """The finished result in ``out_dir`` if it was made for ``assignment`` in this context."""
        metrics_path = out_dir / "metrics.json"
        onnx_path = out_dir / "model.onnx"
        if not (metrics_path.is_file() and onnx_path.is_file()):
            return None
        try:
            data = read_json(metrics_path)
        except ValueError:
            warn(f"{metrics_path}: unreadable (half-written or edited); rebuilding the trial")
            return None
        if data.get("digest") != assignment.digest() or data.get("context") != self.resources.context_key():
            return None
        bad = artifact_mismatch(out_dir, data.get("files"))
        if bad is not None:
            warn(f"{bad}; rebuilding the trial instead of reusing its metrics")
            return None
        return TrialResult.from_json(data, assignment, onnx_path)


def artifact_records(path: Path) -> list[dict[str, Any]]:
    """Digest and size of an artifact and of its external-data file, if it has one."""
    extra = path.with_name(path.name + ".data")
    return [file_record(p) for p in (path, extra) if p.is_file()]


def artifact_mismatch(folder: Path, records: Any) -> str | None:
    """``"<file>: <why>"`` for the first recorded file in ``folder`` that is not intact, else ``None``."""
    if not isinstance(records, list) or not records:
        return f"{folder / 'model.onnx'}: {record_mismatch(folder / 'model.onnx', None)}"
    for record in records:
        path = folder / str(record.get("file", "model.onnx")) if isinstance(record, dict) else folder / "model.onnx"
        why = record_mismatch(path, record)
        if why is not None:
            return f"{path}: {why}"
    return None
