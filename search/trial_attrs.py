"""The user attributes a study stores per trial, typed: what each worker writes and the report reads.

Optuna keeps them as JSON in the storage and optuna-dashboard shows them. The writers below
are the only code that sets them; :meth:`TrialAttrs.of` reads them back.

- at the start of a trial: ``digest``, ``worker``, ``label`` (and ``policy`` for an enqueued policy);
- built: ``assignment``, ``summary``, ``artifact``, ``timings``, ``provider``, ``cached``;
- a duplicate of an earlier trial's assignment: those copied, and ``duplicate_of``;
- failed: ``failure`` and ``assignment``;
- evaluated: ``metrics`` (with ``map_drop``), ``constraint`` (with a mAP-drop limit) and flat
  scalars the dashboard's trial table sorts on (``mAP50-95``, ``latency ms``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mpq.assignment import Assignment, Precision
from search.results import TrialMetrics, TrialResult

if TYPE_CHECKING:
    import optuna

#: Attributes a duplicate copies from the trial that built its assignment.
COPIED = ("assignment", "summary", "artifact", "timings", "provider")


@dataclass(frozen=True)
class TrialAttrs:
    """A trial's user attributes, typed (absent ones are ``None`` or empty)."""

    digest: str | None = None
    worker: str | None = None
    label: str = ""
    policy: str = ""
    assignment: Mapping[str, str] | None = None
    summary: Mapping[str, Any] = field(default_factory=dict)
    artifact: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)
    provider: str | None = None
    cached: bool = False
    duplicate_of: int | None = None
    failure: str | None = None
    metrics: TrialMetrics | None = None

    @classmethod
    def of(cls, trial: Any) -> TrialAttrs:
        """The attributes of an Optuna trial (a ``Trial`` or a ``FrozenTrial``)."""
        ua = trial.user_attrs
        metrics = ua.get("metrics")
        return cls(digest=ua.get("digest"), worker=ua.get("worker"), label=ua.get("label", ""),
                   policy=ua.get("policy", ""),
                   assignment=dict(ua["assignment"]) if "assignment" in ua else None,
                   summary=dict(ua.get("summary", {})), artifact=ua.get("artifact", ""),
                   timings=dict(ua.get("timings", {})), provider=ua.get("provider"), cached=bool(ua.get("cached")),
                   duplicate_of=ua.get("duplicate_of"), failure=ua.get("failure"),
                   metrics=TrialMetrics.from_json(metrics) if metrics is not None else None)

    @property
    def is_duplicate(self) -> bool:
        """Whether the trial reused the result of an earlier trial with the same assignment."""
        return self.duplicate_of is not None

    def assignment_value(self) -> Assignment:
        """The trial's assignment (empty when none was recorded)."""
        return Assignment({k: Precision.parse(v) for k, v in (self.assignment or {}).items()})


def write_start(trial: optuna.Trial, *, digest: str, worker: str, label: str) -> None:
    """What is known before the trial builds anything."""
    trial.set_user_attr("digest", digest)
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("label", label)


def write_result(trial: optuna.Trial, result: TrialResult) -> None:
    """The artifact and its provenance, after the pipeline built the assignment."""
    trial.set_user_attr("assignment", result.assignment.to_dict())
    trial.set_user_attr("summary", dict(result.summary))
    trial.set_user_attr("artifact", str(result.artifact.resolve()))
    trial.set_user_attr("timings", {k: round(v, 3) for k, v in result.timings.items()})
    trial.set_user_attr("provider", result.metrics.provider)
    trial.set_user_attr("cached", result.cached)


def write_duplicate(trial: optuna.Trial, prior: Any) -> None:
    """Mark ``trial`` as a duplicate of the earlier trial ``prior`` and copy its provenance."""
    for key in COPIED:
        if key in prior.user_attrs:
            trial.set_user_attr(key, prior.user_attrs[key])
    trial.set_user_attr("duplicate_of", prior.number)


def write_failure(trial: optuna.Trial, exc: BaseException, assignment: Assignment) -> None:
    """Why the trial failed, and what it tried to build."""
    trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}"[:2000])
    trial.set_user_attr("assignment", assignment.to_dict())


def write_metrics(trial: optuna.Trial, metrics: TrialMetrics, max_map_drop: float | None) -> None:
    """The trial's metrics (with ``map_drop`` set), the dashboard's flat scalars and the constraint."""
    assert metrics.map_drop is not None
    # flat scalars first: the dashboard's trial table sorts and filters on them
    for key, value in (("mAP50-95", metrics.map50_95), ("mAP change (pt)", -100 * metrics.map_drop),
                       ("latency ms", metrics.latency_ms), ("weights MB", metrics.weight_bytes / 1e6),
                       ("W4 weight share", metrics.w4_weight_share)):
        if value is not None:
            trial.set_user_attr(key, round(float(value), 5))
    trial.set_user_attr("metrics", metrics.to_json())
    if max_map_drop is not None:
        trial.set_user_attr("constraint", metrics.map_drop - max_map_drop)


def constraint(trial: Any) -> list[float]:
    """The mAP-drop constraint of a finished trial (Optuna's ``constraints_func``)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]
