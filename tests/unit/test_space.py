from __future__ import annotations

import optuna
import pytest

from mpq.assignment import FLOAT, Assignment, LayerInfo, Precision, group_layers
from search.sensitivity import SensitivityTable
from search.space import SearchSpace, budget_tradeoff, policies

P = Precision.parse


def _model(n: int = 12):
    layers = [LayerInfo(f"model.{i}.conv", "Conv2d", 16, 16, (3, 3), (1, 1), 1, 16 * 16 * 9, 1000 * (i + 1), i,
                        f"model.{i}") for i in range(n)]
    groups = group_layers(layers, "layer")
    # layer i is more sensitive the larger i; A8 hurts the first layers most
    scores = {g.name: {"W4A16": {"damage": 0.01 * (i + 1)}, "W4A8": {"damage": 0.01 * (i + 1) + 0.02},
                       "W8A8": {"damage": 0.001 * (i + 1) + 0.02}, "W8A16": {"damage": 0.0001 * (i + 1)}}
              for i, g in enumerate(groups)}
    table = SensitivityTable("fidelity", {}, [g.name for g in groups], scores)
    options = {g.name: [P("W4A16"), P("W4A8"), P("W8A16"), P("W8A8"), FLOAT] for g in groups}
    return layers, groups, table, options


def _space(kind: str = "ranked", costs: tuple[str, ...] = ("size",)) -> SearchSpace:
    layers, groups, table, options = _model()
    return SearchSpace(kind, groups, options, table, {lay.name: lay for lay in layers}, costs)


def test_lagrangian_extremes_and_monotone_cost():
    s = _space()
    cheap = s.lagrangian(3.0)
    assert all(p.w_bits == 4 for _, p in cheap.items()) and len(cheap) == 12
    assert all(p == P("W4A16") for _, p in cheap.items())  # same size as W4A8, less damage
    assert len(s.lagrangian(-3.0)) == 0  # tiny lambda: everything float
    costs = [s.assignment_cost(s.lagrangian(t)) for t in (-3, -2, -1, -0.5, 0, 0.5, 1, 2, 3)]
    assert costs == sorted(costs, reverse=True)


def test_keep_top_keeps_the_most_sensitive_float():
    s = _space()
    a = s.lagrangian(3.0, keep_top=3)
    assert s.ranking[:3] == ["model.11.conv", "model.10.conv", "model.9.conv"]
    for name in s.ranking[:3]:
        assert a.get(name) == FLOAT
    assert a.get("model.0.conv") == P("W4A16")


def test_budget_policies_respect_their_budgets():
    s = _space()
    for b in (0.27, 0.3, 0.4, 0.5):
        t = budget_tradeoff(s, b)
        assert t is not None
        assert s.assignment_cost(s.lagrangian(t)) <= b + 1e-9
    assert budget_tradeoff(s, 0.2) is None  # below all-W4 (0.25 of float bits)
    labels = [label for label, _ in policies(s)]
    assert any(label.startswith("top-") for label in labels) and any("min-sensitivity" in lb for lb in labels)


def test_a8_share_takes_the_least_a8_sensitive_first():
    s = _space()
    # extra damage of A8 over A16 is 0.02 for W4 everywhere in this table: ties broken by name
    a = s.choose(3.0, a8_share=0.5)
    a8 = [n for n, p in a.items() if p.a_bits == 8]
    assert len(a8) == 6 and all(a.get(n).w_bits == 4 for n in a8)
    assert len([n for n, p in s.choose(3.0, a8_share=1.0).items() if p.a_bits == 8]) == 12
    assert not [n for n, p in s.choose(3.0, a8_share=0.0).items() if p.a_bits == 8]


def test_w8a8_only_backend_forces_a8():
    layers, groups, table, _ = _model()
    options = {g.name: [P("W8A8"), FLOAT] for g in groups}
    s = SearchSpace("ranked", groups, options, table, {lay.name: lay for lay in layers}, ("size",))
    a = s.choose(3.0)
    assert all(p == P("W8A8") for _, p in a.items()) and len(a) == 12
    assert not s.has_a8_choice()


@pytest.mark.parametrize("kind", ["ranked", "full", "topk"])
def test_suggest_and_policies_round_trip_through_optuna(kind: str):
    s = _space(kind, ("size", "latency"))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    configs = policies(s)
    assert configs
    for label, params in configs:
        study.enqueue_trial(params, user_attrs={"policy": label})
    seen = []

    def objective(trial):
        a = s.suggest(trial)
        assert isinstance(a, Assignment)
        seen.append((trial.user_attrs.get("policy"), a))
        return -s.assignment_damage(a), s.assignment_cost(a)

    study.optimize(objective, n_trials=len(configs) + 5)
    # the enqueued policies come first and reproduce their assignments
    for (label, params), (pol, a) in zip(configs, seen, strict=False):
        assert pol == label
        if kind == "topk":
            assert a == s.topk(params["keep_top"], params.get("a8", False))
        if kind == "ranked":
            assert a == s.choose(params["tradeoff"], params.get("a8_share", 0.0), params["keep_top"])
