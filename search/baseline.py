"""The float baseline: the float model's ONNX and metrics, cached in ``float/`` of the run directory.

The ONNX is exported once per model file, image size and ``max_det``; the metrics are
measured once per ONNX, data and evaluation settings (``float/baseline.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mpq import keys
from mpq.assignment import Assignment
from mpq.files import read_json, write_json
from search.evaluation import ArtifactEvaluator, LatencyReference
from search.results import TrialMetrics

if TYPE_CHECKING:
    from search.resources import StudyResources


class FloatBaseline:
    """The float model of a study, exported and evaluated like every trial."""

    def __init__(self, resources: StudyResources, evaluator: ArtifactEvaluator) -> None:
        self.res = resources
        self.evaluator = evaluator
        self._metrics: TrialMetrics | None = None

    @property
    def dir(self) -> Path:
        """``float/`` of the run directory."""
        return self.res.paths.float_dir

    def onnx(self) -> Path:
        """The float model's ONNX (exported once per model digest and image size)."""
        from mpq.model import export_onnx

        spec = self.res.spec
        path = self.dir / "model.onnx"
        stamp = self.dir / "source.json"
        key = keys.float_export_key(model=spec.model, model_digest=self.res.model_digest, imgsz=spec.imgsz,
                                    max_det=spec.evaluation.max_det)
        if path.is_file() and stamp.is_file() and read_json(stamp) == key:
            return path
        export_onnx(self.res.model.module, path, spec.imgsz)
        write_json(stamp, key)
        return path

    def metrics(self) -> TrialMetrics:
        """COCO metrics, latency and cost of the float model (cached in ``float/baseline.json``)."""
        if self._metrics is None:
            self._metrics = self._measure()
        return self._metrics

    def _measure(self) -> TrialMetrics:
        spec = self.res.spec
        onnx_path = self.onnx()
        cache = self.dir / "baseline.json"
        key = keys.baseline_key(onnx=onnx_path, data=self.res.data_digest, evaluation=spec.evaluation,
                                latency=spec.latency)
        if cache.is_file():
            data = read_json(cache)
            if data.get("key") == key:
                return TrialMetrics.from_json(data["metrics"])
        metrics = self.evaluator.evaluate(onnx_path, Assignment(), {})
        write_json(cache, {"key": key, "metrics": metrics.to_json()})
        return metrics

    def latency_reference(self) -> LatencyReference | None:
        """What trials are timed against: the float model when ``latency.reference`` is ``float`` (ONNX Runtime)."""
        lat = self.res.spec.latency
        if lat.reference != "float" or lat.engine != "ort":
            return None
        return LatencyReference(onnx=self.onnx(), baseline_ms=float(self.metrics().latency_ms))
