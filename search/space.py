"""Search spaces: how an Optuna trial's parameters become an :class:`Assignment`.

- ``ranked`` (default): three parameters over the sensitivity table instead of one choice
  per layer, so 50 trials can search it, while every point is a full per-layer assignment:

  * ``tradeoff`` (log10 lambda): every group's *weight* bit width minimizes
    ``damage/D + lambda * cost/C`` (the Lagrangian relaxation of "least summed
    sensitivity under a size budget"; cost = weight bits, or MAC-weighted bits when BOPs
    is the only cost objective);
  * ``a8_share``: the given share of the quantized groups whose INT8 input hurts least
    (extra damage of A8 over A16) get INT8 activations; whether A8 pays off in latency
    depends on the hardware and runtime, so the sampler learns it from measurements;
  * ``keep_top``: the K most sensitive groups stay float.

- ``full``: one categorical choice per group (the whole per-layer space).
- ``topk``: the seeds' policy alone, one integer K: the K most sensitive groups float,
  every other group at its cheapest candidate.

Each space also produces the *policy* configurations the study enqueues first: top-K
lists for several K (with and without INT8 activations), and budget-constrained
minimizers of summed sensitivity for several size budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpq.assignment import FLOAT, Assignment, LayerGroup, LayerInfo, Precision
from mpq.errors import UserError
from mpq.objectives import cost_objectives
from search.sensitivity import SensitivityTable

if TYPE_CHECKING:
    from search.resources import StudyResources

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


class GroupTradeoffs:
    """Per group and precision: the normalized cost (the sum over groups at float is 1) and the
    normalized damage (the sum over groups of their largest damage is 1).

    Args:
        groups: the layer groups searched.
        options: per group, its allowed precisions (float included).
        table: the sensitivity table.
        layers: every LayerInfo of the model, by name.
        cost_kinds: the cost objectives present (``size``, ``bops``; latency uses BOPs).
    """

    def __init__(self, groups: list[LayerGroup], options: dict[str, list[Precision]], table: SensitivityTable,
                 layers: dict[str, LayerInfo], cost_kinds: tuple[str, ...]) -> None:
        self.options = options
        self.layers = layers
        kinds = [k for k in cost_kinds if k in ("size", "bops")]
        self.weight_cost_kind = "size" if ("size" in kinds or not kinds) else "bops"
        self._total_cost = {k: sum(group_cost(g, layers, FLOAT, k) for g in groups) or 1.0
                            for k in ("size", "bops")}
        self._damage = {g.name: {str(p): table.damage(g.name, p) for p in options[g.name]} for g in groups}
        total = sum(max(d.values()) for d in self._damage.values())
        self._damage_total = total if total > 0 else 1.0
        self._names = {g.name: g for g in groups}

    def cost(self, group: str, p: Precision, kind: str | None = None) -> float:
        """Normalized cost of a group at a precision (the sum over groups at float is 1)."""
        kind = kind or self.weight_cost_kind
        return group_cost(self._names[group], self.layers, p, kind) / self._total_cost[kind]

    def damage(self, group: str, p: Precision) -> float:
        """Normalized damage of a group at a precision."""
        return self._damage[group][str(p)] / self._damage_total

    def weight_options(self, group: str) -> list[int]:
        """The weight widths the group may take."""
        return sorted({p.w_bits for p in self.options[group]})

    def weight_damage(self, group: str, w: int) -> float:
        """Damage of weight width ``w`` with the least damaging activation width available."""
        return min(self.damage(group, p) for p in self.options[group] if p.w_bits == w)

    def weight_cost(self, group: str, w: int) -> float:
        """Cost of weight width ``w`` (activations float)."""
        return self.cost(group, Precision(w, 16) if w < 16 else FLOAT)

    def act_options(self, group: str, w: int) -> list[int]:
        """The activation widths the group may take with weight width ``w``."""
        return sorted({p.a_bits for p in self.options[group] if p.w_bits == w})

    def a8_extra(self, group: str, w: int) -> float:
        """How much INT8 inputs add to the damage of a group at weight width ``w``."""
        acts = self.act_options(group, w)
        if 8 not in acts:
            return float("inf")
        d8 = self.damage(group, Precision(w, 8))
        d16 = self.damage(group, Precision(w, 16)) if 16 in acts else 0.0
        return max(0.0, d8 - d16)


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
        self.tradeoffs = GroupTradeoffs(self.groups, self.options, self.table, self.layers, self.cost_kinds)
        self.ranking = [g for g in self.table.ranking() if g in self.options]
        self.max_keep = max(1, min(len(self.groups) // 3, 24))

    def choose(self, tradeoff: float, a8_share: float = 0.0, keep_top: int = 0) -> Assignment:
        """Weights by the Lagrangian at ``tradeoff``, then INT8 inputs on the least A8-sensitive share."""
        t = self.tradeoffs
        lam = 10.0 ** tradeoff
        keep = set(self.ranking[:keep_top])
        widths: dict[str, int] = {}
        for g in self.groups:
            if g.name in keep:
                widths[g.name] = 16
                continue
            scored = [(t.weight_damage(g.name, w) + lam * t.weight_cost(g.name, w),
                       t.weight_cost(g.name, w), w) for w in t.weight_options(g.name)]
            widths[g.name] = min(scored)[2]
        choice: dict[str, Precision] = {}
        optional: list[str] = []
        for name, w in widths.items():
            acts = t.act_options(name, w)
            if acts == [8]:
                choice[name] = Precision(w, 8)  # e.g. a W8A8-only backend
            elif 16 in acts:
                choice[name] = Precision(w, 16) if w < 16 else FLOAT
                if 8 in acts and w < 16:
                    optional.append(name)
        optional.sort(key=lambda n: (t.a8_extra(n, widths[n]), n))
        for name in optional[: int(round(a8_share * len(optional)))]:
            choice[name] = Precision(widths[name], 8)
        return Assignment.from_groups(self.groups, choice)

    def lagrangian(self, tradeoff: float, keep_top: int = 0) -> Assignment:
        """Weights by the Lagrangian at ``tradeoff``, no INT8 inputs."""
        return self.choose(tradeoff, 0.0, keep_top)

    def topk(self, k: int, a8: bool = False) -> Assignment:
        """The seeds' policy: the K most sensitive groups float, the rest at the cheapest weights."""
        return self.choose(TRADEOFF_RANGE[1], 1.0 if a8 else 0.0, k)

    def assignment_cost(self, a: Assignment, kind: str | None = None) -> float:
        """Normalized cost of an assignment (1 = float)."""
        return sum(self.tradeoffs.cost(g.name, a.get(g.layers[0]), kind) for g in self.groups)

    def assignment_damage(self, a: Assignment) -> float:
        """Normalized summed damage of an assignment."""
        return sum(self.tradeoffs.damage(g.name, a.get(g.layers[0])) for g in self.groups)

    # -- Optuna ---------------------------------------------------------------------------------
    def has_a8_choice(self) -> bool:
        """Whether some group may take INT8 inputs or not at the same weight width."""
        t = self.tradeoffs
        return any(8 in t.act_options(g.name, w) and 16 in t.act_options(g.name, w)
                   for g in self.groups for w in t.weight_options(g.name) if w < 16)

    def suggest(self, trial: Any) -> Assignment:
        """The assignment of an Optuna trial's parameters (sampled here)."""
        if self.kind == "ranked":
            t = trial.suggest_float("tradeoff", *TRADEOFF_RANGE)
            a8 = trial.suggest_float("a8_share", 0.0, 1.0) if self.has_a8_choice() else 0.0
            k = trial.suggest_int("keep_top", 0, self.max_keep)
            return self.choose(t, a8, k)
        if self.kind == "topk":
            k = trial.suggest_int("keep_top", 0, len(self.groups))
            a8 = trial.suggest_categorical("a8", [False, True]) if self.has_a8_choice() else False
            return self.topk(k, a8)
        choice = {g.name: Precision.parse(trial.suggest_categorical(f"g.{g.name}",
                                                                   [str(p) for p in self.options[g.name]]))
                  for g in self.groups}
        return Assignment.from_groups(self.groups, choice)

    def params_for(self, a: Assignment, *, tradeoff: float = TRADEOFF_RANGE[1], a8_share: float = 0.0,
                   keep_top: int = 0) -> dict[str, Any]:
        """Parameters of this space that reproduce ``a`` (for enqueueing policies)."""
        if self.kind == "ranked":
            params: dict[str, Any] = {"tradeoff": tradeoff, "keep_top": keep_top}
            if self.has_a8_choice():
                params["a8_share"] = a8_share
            return params
        if self.kind == "topk":
            params = {"keep_top": keep_top}
            if self.has_a8_choice():
                params["a8"] = a8_share > 0
            return params
        return {f"g.{g.name}": str(a.get(g.layers[0])) for g in self.groups}


def space_for(res: StudyResources, table: SensitivityTable, kind: str, objectives: Sequence[str]) -> SearchSpace:
    """The search space of a study: per group, the candidates its backend can build, plus float."""
    options = {g.name: [*res.candidates_for(g), FLOAT] for g in res.groups}
    empty = [g for g, opts in options.items() if len(opts) == 1]
    if len(empty) == len(options):
        raise UserError(f"backend '{res.backend.name}' can build none of the study's candidates "
                        f"{[str(p) for p in res.spec.candidates]} ({res.backend.capabilities.notes})")
    return SearchSpace(kind, res.groups, options, table, {lay.name: lay for lay in res.model.layers},
                       cost_objectives(objectives) or ("size",))


def budget_tradeoff(space: SearchSpace, budget: float) -> float | None:
    """The smallest tradeoff (least damage) whose weight choice costs <= ``budget`` (normalized size)."""
    lo, hi = TRADEOFF_RANGE

    def cost(t: float) -> float:
        return space.assignment_cost(space.lagrangian(t), "size")

    if cost(hi) > budget + 1e-12:
        return None
    if cost(lo) <= budget + 1e-12:
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        if cost(mid) <= budget + 1e-12:
            hi = mid
        else:
            lo = mid
    return hi


def policies(space: SearchSpace, ks: Sequence[int] | None = None,
             budgets: Sequence[float] = (0.27, 0.3, 0.33, 0.37, 0.42, 0.5)) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of the policy configurations, deduplicated by assignment."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()

    def add(label: str, a: Assignment, params: dict[str, Any]) -> None:
        if a.digest() not in seen and len(a):
            seen.add(a.digest())
            out.append((label, params))

    n = len(space.groups)
    ks = ks if ks is not None else sorted({0, 2, 4, max(1, n // 10), max(1, n // 5)})
    a8_variants = (False, True) if space.has_a8_choice() else (False,)
    for a8 in a8_variants:
        for k in ks:
            if k > (n if space.kind == "topk" else space.max_keep):
                continue
            a = space.topk(k, a8)
            label = f"top-{k} float, rest {'W4A8' if a8 else 'W4A16'}"
            add(label, a, space.params_for(a, a8_share=1.0 if a8 else 0.0, keep_top=k))
    if space.kind == "topk":
        return out
    for b in budgets:
        t = budget_tradeoff(space, b)
        if t is None:
            continue
        a = space.lagrangian(t)
        add(f"min-sensitivity @ {100 * b:.0f}% size", a, space.params_for(a, tradeoff=math.ceil(t * 1e6) / 1e6))
    return out
