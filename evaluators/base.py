"""Evaluator results: plain frozen values, JSON-serializable with ``dataclasses.asdict``.

Every evaluator is a small class with keyword-only construction and one ``evaluate(...)``
method returning one of these (see ``tests/integration/test_evaluator_contract.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AccuracyResult:
    """COCO bbox metrics of one model on the evaluation subset (pycocotools)."""

    map50_95: float
    map50: float
    map75: float
    map_small: float
    map_medium: float
    map_large: float
    per_class: dict[str, float]
    num_images: int
    num_detections: int
    images_per_s: float
    seconds: float
    provider: str
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class FidelityResult:
    """Label-free agreement of a model with the float model on calibration images.

    ``det_map`` is the COCO mAP50-95 of the model's detections scored against the float
    model's detections as pseudo-labels (1.0 = identical); ``sqnr_db`` the
    signal-to-quantization-noise ratio of the raw output tensor (higher is closer).
    """

    det_map: float
    det_map50: float
    sqnr_db: float
    num_images: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class LatencyResult:
    """Timed inference of one model (pre/post-processing excluded)."""

    engine: str
    provider: str
    device: str
    batch_size: int
    threads: int | None
    warmup: int
    runs: int
    mean_ms: float
    median_ms: float
    p90_ms: float
    min_ms: float
    fps: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class CostResult:
    """Analytic cost of an assignment, from the layer table, with no hardware."""

    weight_bytes: int
    float_weight_bytes: int
    bops: float
    float_bops: float
    w4_weight_share: float
    a8_layer_share: float

    @property
    def size_ratio(self) -> float:
        """Weight bytes relative to the float model."""
        return self.weight_bytes / max(self.float_weight_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field and ``size_ratio``."""
        d = asdict(self)
        d["size_ratio"] = self.size_ratio
        return d
