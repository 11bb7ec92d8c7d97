"""The trial pipeline: one assignment -> a quantized ONNX artifact -> its metrics.

Stages, in order (each timed in ``TrialResult.timings``):

1. ``materialize``: the backend builds the assignment on a copy of the float model;
2. ``export``: the backend writes the Q/DQ ONNX (``model.onnx`` + ``model.onnx.json``);
3. ``evaluate`` / ``latency``: :class:`~search.evaluation.ArtifactEvaluator` measures the
   artifact (COCO accuracy, latency against the float model, analytic cost).

A stage that transforms the artifact (e.g. lowering it for a deployment target) goes in
:meth:`TrialPipeline.build` after ``export`` and hands the next stage its own file; a new
measurement goes in the evaluator and adds a field to :class:`~search.results.TrialMetrics`.

Results are cached per assignment in ``trials/<digest>/``: a finished ``metrics.json`` made in
the same context (:meth:`~search.resources.StudyResources.context_key`) is reused. The sweep,
the study, ``search quantize`` and ``search export`` all build through :meth:`TrialPipeline.run`,
so a trial is the same everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.files import read_json, write_json, write_text
from search.baseline import FloatBaseline
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
        timings["total"] = sum(v for k, v in timings.items() if "." not in k)
        result = TrialResult(digest=assignment.digest(), assignment=assignment, metrics=metrics,
                             summary=assignment.summary(self.resources.model.layers), timings=timings,
                             artifact=artifact.path, export=artifact.export)
        write_json(out_dir / "metrics.json", {**result.to_json(), "context": self.resources.context_key(),
                                              "backend": self.resources.spec.backend.name})
        return result

    def build(self, assignment: Assignment, out_dir: Path) -> Artifact:
        """Materialize ``assignment`` and export it to ``out_dir/model.onnx``."""
        res = self.resources
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        qmodel = res.materialize(assignment)
        timings["materialize"] = time.perf_counter() - t0
        timings.update({f"materialize.{k}": v for k, v in qmodel.timings.items()})
        t0 = time.perf_counter()
        export = res.backend.export(qmodel, out_dir / "model.onnx")
        timings["export"] = time.perf_counter() - t0
        return Artifact(path=export.path, timings=timings,
                        export={"node_counts": dict(export.node_counts), "metadata": dict(export.metadata)})

    def cached(self, assignment: Assignment, out_dir: Path) -> TrialResult | None:
        """The finished result in ``out_dir`` if it was made for ``assignment`` in this context."""
        metrics_path = out_dir / "metrics.json"
        onnx_path = out_dir / "model.onnx"
        if not (metrics_path.is_file() and onnx_path.is_file()):
            return None
        data = read_json(metrics_path)
        if data.get("digest") != assignment.digest() or data.get("context") != self.resources.context_key():
            return None
        return TrialResult.from_json(data, assignment, onnx_path)
