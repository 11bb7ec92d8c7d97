"""What evaluating one model produced: typed, frozen values that travel from the trial pipeline
to the study, the report and the commands.

:class:`TrialMetrics` is one model's accuracy, latency and cost (a trial's, or the float
baseline's); :class:`TrialResult` is one built and evaluated assignment. Both read and write
the JSON of ``metrics.json`` and of the study's trial attributes, with the same field names
as before they were typed, so older run directories stay readable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mpq.assignment import Assignment
from mpq.objectives import OBJECTIVES


def worker_id() -> str:
    """``host:pid`` of this process: names the worker that made a result."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class TrialMetrics:
    """Accuracy (COCO, pycocotools), latency and analytic cost of one ONNX model.

    ``latency_ms`` is the median latency, or, when the model was timed in alternating blocks with
    the float model, its median ratio to float (``latency_ratio``) times the float baseline's
    milliseconds; ``latency_measured_ms`` is always the raw median. ``map_drop`` (float
    mAP50-95 minus this model's) is set by the study; ``head`` names the head and so the post-processing.

    Deployment (issue 12): ``deploy_target`` is the target the file was lowered for;
    ``a8_asked`` the layers the assignment quantizes at A8, ``a8_ran_int8`` those the runtime
    runs as an integer kernel (read back from ONNX Runtime's optimized graph) and
    ``a8_ran_float`` the A8 layers it runs as float (each one a warning);
    ``weight_bytes`` is the packed weight size (INT4 two per byte), ``onnx_bytes`` the
    file's bytes on disk, ``weight_bytes_packed`` the lowering's count of the packed weights
    with their scales and biases; ``rule_violations`` the target rules the file breaks.
    """

    map50_95: float
    map50: float
    map75: float
    images_per_s: float
    provider: str
    latency_ms: float
    latency_p90_ms: float
    latency_measured_ms: float
    latency_provider: str
    latency_device: str
    latency_batch: int
    weight_bytes: int
    size_ratio: float
    bops: float
    w4_weight_share: float
    onnx_bytes: int
    per_class: Mapping[str, float] = field(default_factory=dict)
    latency_ratio: float | None = None
    latency_float_same_window_ms: float | None = None
    map_drop: float | None = None
    head: str | None = None
    """The detection head scored (``one2one``: NMS-free top-k; ``one2many``: NMS), from the file's output."""
    deploy_target: str | None = None
    a8_asked: int | None = None
    a8_ran_int8: int | None = None
    a8_ran_float: tuple[str, ...] = ()
    weight_bytes_packed: int | None = None
    rule_violations: int | None = None

    @property
    def runtime_warning(self) -> str:
        """A sentence naming the A8 layers that run as float; empty when every A8 layer runs int8."""
        bad = list(self.a8_ran_float)
        if not bad:
            return ""
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        return f"{len(bad)} of {self.a8_asked} layers asked for A8 run as float: {shown}"

    def value(self, objective: str) -> float:
        """The value of ``objective`` (``map``, ``latency``, ``size``, ``bops``) for this model."""
        return float(getattr(self, OBJECTIVES[objective].metric))

    def with_map_drop(self, float_map: float) -> TrialMetrics:
        """These metrics with ``map_drop`` against a float mAP50-95."""
        return replace(self, map_drop=float_map - self.map50_95)

    def to_json(self) -> dict[str, Any]:
        """A JSON dict: every field, optional ones only when set, ``per_class`` after the scalars."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "per_class" or (value is None and f.default is None):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out = {k: out[k] for k in _JSON_ORDER if k in out}
        out["per_class"] = dict(self.per_class)
        if self.map_drop is not None:
            out["map_drop"] = self.map_drop
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialMetrics:
        """Read :meth:`to_json`'s dict (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["per_class"] = dict(values.get("per_class") or {})
        values["a8_ran_float"] = tuple(values.get("a8_ran_float") or ())
        return cls(**values)


_JSON_ORDER = ("map50_95", "map50", "map75", "images_per_s", "provider", "latency_ms", "latency_p90_ms",
               "latency_measured_ms", "latency_ratio", "latency_float_same_window_ms", "latency_provider",
               "latency_device", "latency_batch", "weight_bytes", "size_ratio", "bops", "w4_weight_share",
               "onnx_bytes", "weight_bytes_packed", "deploy_target", "a8_asked", "a8_ran_int8", "a8_ran_float",
               "rule_violations", "head")


@dataclass(frozen=True)
class TrialResult:
    """One assignment, built, exported and evaluated (or read back from its cached ``metrics.json``).

    ``summary`` is :meth:`~mpq.assignment.Assignment.summary` over the model's layers;
    ``timings`` the seconds of each stage (``materialize.<step>`` for the backend's own steps);
    ``export`` the node counts and metadata of the written ONNX.
    """

    digest: str
    assignment: Assignment
    metrics: TrialMetrics
    summary: Mapping[str, Any]
    timings: Mapping[str, float]
    artifact: Path
    export: Mapping[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` content (with the worker that wrote it)."""
        return {"digest": self.digest, "assignment": self.assignment.to_dict(), "metrics": self.metrics.to_json(),
                "summary": dict(self.summary), "timings": dict(self.timings), "artifact": str(self.artifact),
                "export": dict(self.export), "worker": worker_id()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], assignment: Assignment, artifact: Path) -> TrialResult:
        """A cached result read from ``metrics.json``."""
        return cls(digest=data["digest"], assignment=assignment, metrics=TrialMetrics.from_json(data["metrics"]),
                   summary=data["summary"], timings=data["timings"], artifact=artifact,
                   export=data.get("export", {}), cached=True)
