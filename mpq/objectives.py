"""The objectives a study can optimize: one table that the spec, the study, the search space
and the report all read.

>>> OBJECTIVES["map"].direction, OBJECTIVES["map"].metric
('maximize', 'map50_95')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

#: The names a spec may list under ``search.objectives`` (kept equal to :data:`OBJECTIVES`'s keys).
ObjectiveName = Literal["map", "latency", "size", "bops"]


@dataclass(frozen=True)
class Objective:
    """One objective: its optimization direction, the trial metric it reads and its display name.

    ``cost`` marks the objectives that make a model cheaper (size, BOPs, latency); the search
    space trades them against accuracy.
    """

    name: str
    direction: Literal["maximize", "minimize"]
    metric: str
    label: str
    cost: bool

    @property
    def maximize(self) -> bool:
        """True for an objective to maximize (accuracy)."""
        return self.direction == "maximize"


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("map", "maximize", "map50_95", "mAP50-95", cost=False),
    Objective("latency", "minimize", "latency_ms", "latency ms", cost=True),
    Objective("size", "minimize", "weight_bytes", "weight bytes", cost=True),
    Objective("bops", "minimize", "bops", "BOPs", cost=True),
)}
assert set(OBJECTIVES) == set(get_args(ObjectiveName)), "ObjectiveName and OBJECTIVES must list the same names"

#: The accuracy objective every study must include.
ACCURACY = "map"
DEFAULT_OBJECTIVES: tuple[ObjectiveName, ...] = ("map", "latency")


def directions(names: Sequence[str]) -> list[Literal["maximize", "minimize"]]:
    """Optuna study directions of ``names``, in order."""
    return [OBJECTIVES[n].direction for n in names]


def labels(names: Sequence[str]) -> list[str]:
    """Display names of ``names`` (Optuna's metric names), in order."""
    return [OBJECTIVES[n].label for n in names]


def cost_objectives(names: Sequence[str]) -> tuple[str, ...]:
    """The cost objectives among ``names``, in order."""
    return tuple(n for n in names if OBJECTIVES[n].cost)
