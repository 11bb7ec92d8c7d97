"""Search spaces: how an Optuna trial's parameters become an :class:`Assignment`.

- ``ranked`` (default): a few parameters over the sensitivity table instead of one choice
  per layer, so 50 trials can search it. ``tradeoff`` (log10 lambda) picks, for every
  group independently, the precision minimizing ``damage/D + lambda * cost/C`` (the
  Lagrangian relaxation of "least summed sensitivity under a cost budget"), ``keep_top``
  keeps the K most sensitive groups float, and ``mix`` weighs the cost objectives when
  there are two (size vs BOPs). Every point is a full per-layer assignment.
- ``full``: one categorical choice per group (the whole per-layer space).
- ``topk``: the seeds' policy alone, one integer K: the K most sensitive groups float,
  every other group at its least damaging cheapest candidate.

Each space also produces the *policy* configurations the study enqueues first: top-K
lists for several K, and budget-constrained minimizers of summed sensitivity for several
size budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from search.assignment import FLOAT, Assignment, LayerGroup, LayerInfo, Precision
from search.sensitivity import SensitivityTable

COST_OBJECTIVES = ("size", "bops", "latency")
TRADEOFF_RANGE = (-3.0, 3.0)


def group_cost(group: LayerGroup, layers: dict[str, LayerInfo], precision: Precision, kind: str) -> float:
    """Cost of a group at a precision: weight bits (size) or MACs x w x a bits (BOPs; latency proxy)."""
    total = 0.0
    for name in group.layers:
        lay = layers[name]
        if kind == "size":
            total += lay.weight_params * precision.w_bits
        else:
            total += lay.macs * precision.w_bits * precision.a_bits
    return total


@dataclass
class SearchSpace:
    """Maps trial parameters to assignments over ``groups``.

    Args:
        kind: ``ranked``, ``full`` or ``topk``.
        groups: the layer groups searched.
        options: per group, its allowed precisions (float included).
        table: the sensitivity table.
        layers: every LayerInfo of the model, by name.
        cost_kinds: the cost objectives present (``size``, ``bops``; latency uses BOPs).
    """

    kind: str
    groups: list[LayerGroup]
    options: dict[str, list[Precision]]
    table: SensitivityTable
    layers: dict[str, LayerInfo]
    cost_kinds: tuple[str, ...] = ("size",)

    def __post_init__(self) -> None:
        if self.kind not in ("ranked", "full", "topk"):
            raise ValueError(f"unknown search space '{self.kind}' (ranked, full, topk)")
        kinds = tuple(dict.fromkeys("bops" if k == "latency" else k for k in self.cost_kinds)) or ("size",)
        self.cost_kinds = kinds
        self._cost = {k: {g.name: {str(p): group_cost(g, self.layers, p, k) for p in self.options[g.name]}
                          for g in self.groups} for k in kinds}
        self._cost_total = {k: sum(self._cost[k][g.name][str(FLOAT)] for g in self.groups) or 1.0 for k in kinds}
        self._damage = {g.name: {str(p): self.table.damage(g.name, p) for p in self.options[g.name]}
                        for g in self.groups}
        total = sum(max(d.values()) for d in self._damage.values())
        self._damage_total = total if total > 0 else 1.0
        self.ranking = [g for g in self.table.ranking() if g in self.options]
        self.max_keep = max(1, min(len(self.groups) // 3, 24))

    # -- the pieces ---------------------------------------------------------------------------
    def cost(self, group: str, p: Precision, mix: float = 0.0) -> float:
        """Normalized cost (sum over groups at float = 1)."""
        if len(self.cost_kinds) == 1:
            k = self.cost_kinds[0]
            return self._cost[k][group][str(p)] / self._cost_total[k]
        a, b = self.cost_kinds[0], self.cost_kinds[1]
        return ((1 - mix) * self._cost[a][group][str(p)] / self._cost_total[a]
                + mix * self._cost[b][group][str(p)] / self._cost_total[b])

    def damage(self, group: str, p: Precision) -> float:
        return self._damage[group][str(p)] / self._damage_total

    def cheapest(self, group: str, mix: float = 0.0) -> Precision:
        """The cheapest option of a group, the least damaging among equally cheap ones."""
        opts = self.options[group]
        return min(opts, key=lambda p: (round(self.cost(group, p, mix), 12), self.damage(group, p)))

    def lagrangian(self, tradeoff: float, keep_top: int = 0, mix: float = 0.0) -> Assignment:
        lam = 10.0 ** tradeoff
        keep = set(self.ranking[:keep_top])
        choice: dict[str, Precision] = {}
        for g in self.groups:
            if g.name in keep:
                continue
            best: tuple[float, float] | None = None
            for p in self.options[g.name]:
                c = self.cost(g.name, p, mix)
                score = (self.damage(g.name, p) + lam * c, c)
                if best is None or score < best:
                    best = score
                    choice[g.name] = p
        return Assignment.from_groups(self.groups, choice)

    def topk(self, k: int, mix: float = 0.0) -> Assignment:
        keep = set(self.ranking[:k])
        return Assignment.from_groups(self.groups, {g.name: self.cheapest(g.name, mix)
                                                    for g in self.groups if g.name not in keep})

    def assignment_cost(self, a: Assignment, mix: float = 0.0) -> float:
        return sum(self.cost(g.name, a.get(g.layers[0]), mix) for g in self.groups)

    def assignment_damage(self, a: Assignment) -> float:
        return sum(self.damage(g.name, a.get(g.layers[0])) for g in self.groups)

    # -- Optuna ---------------------------------------------------------------------------------
    def suggest(self, trial: Any) -> Assignment:
        if self.kind == "ranked":
            t = trial.suggest_float("tradeoff", *TRADEOFF_RANGE)
            k = trial.suggest_int("keep_top", 0, self.max_keep)
            mix = trial.suggest_float("mix", 0.0, 1.0) if len(self.cost_kinds) > 1 else 0.0
            return self.lagrangian(t, k, mix)
        if self.kind == "topk":
            return self.topk(trial.suggest_int("keep_top", 0, len(self.groups)))
        choice = {g.name: Precision.parse(trial.suggest_categorical(f"g.{g.name}",
                                                                   [str(p) for p in self.options[g.name]]))
                  for g in self.groups}
        return Assignment.from_groups(self.groups, choice)

    def params_for(self, a: Assignment, *, tradeoff: float | None = None, keep_top: int = 0,
                   mix: float = 0.0) -> dict[str, Any]:
        """Parameters of this space that reproduce ``a`` (for enqueueing policies)."""
        if self.kind == "ranked":
            assert tradeoff is not None
            params: dict[str, Any] = {"tradeoff": tradeoff, "keep_top": keep_top}
            if len(self.cost_kinds) > 1:
                params["mix"] = mix
            return params
        if self.kind == "topk":
            return {"keep_top": keep_top}
        return {f"g.{g.name}": str(a.get(g.layers[0])) for g in self.groups}

    # -- policies -------------------------------------------------------------------------------
    def budget_tradeoff(self, budget: float, mix: float = 0.0) -> float | None:
        """The smallest tradeoff (least damage) whose Lagrangian solution costs <= ``budget``."""
        lo, hi = TRADEOFF_RANGE
        if self.assignment_cost(self.lagrangian(hi, 0, mix), mix) > budget + 1e-12:
            return None
        if self.assignment_cost(self.lagrangian(lo, 0, mix), mix) <= budget + 1e-12:
            return lo
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.assignment_cost(self.lagrangian(mid, 0, mix), mix) <= budget + 1e-12:
                hi = mid
            else:
                lo = mid
        return hi

    def policies(self, ks: Sequence[int] | None = None,
                 budgets: Sequence[float] = (0.27, 0.3, 0.33, 0.36, 0.4, 0.5)) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) of the policy configurations, deduplicated by assignment."""
        out: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()

        def add(label: str, a: Assignment, params: dict[str, Any]) -> None:
            if a.digest() not in seen and len(a):
                seen.add(a.digest())
                out.append((label, params))

        n = len(self.groups)
        ks = ks if ks is not None else sorted({0, 1, 2, 4, max(1, n // 10), max(1, n // 5)})
        for k in ks:
            if k > (len(self.groups) if self.kind == "topk" else self.max_keep):
                continue
            a = self.topk(k)
            if self.kind == "ranked":
                add(f"top-{k} float", a, self.params_for(a, tradeoff=TRADEOFF_RANGE[1], keep_top=k))
            else:
                add(f"top-{k} float", a, self.params_for(a, keep_top=k))
        if self.kind == "topk":
            return out
        for b in budgets:
            t = self.budget_tradeoff(b)
            if t is None:
                continue
            a = self.lagrangian(t)
            label = f"min-sensitivity @ {100 * b:.0f}% {self.cost_kinds[0]}"
            add(label, a, self.params_for(a, tradeoff=round(t, 6), keep_top=0))
        return out


def describe_params(params: dict[str, Any]) -> str:
    parts = []
    for k, v in params.items():
        if k.startswith("g."):
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) and not math.isnan(v) else f"{k}={v}")
    return " ".join(parts) if parts else f"{len(params)} per-group choices"
