from __future__ import annotations

import pytest

from search.report import TrialRow, best_at_budget, hypervolume_2d, pareto_front
from search.results import TrialMetrics


def _row(n: int, m: float, lat: float, size: float, feasible: bool = True) -> TrialRow:
    metrics = TrialMetrics(map50_95=m, map50=m, map75=m, images_per_s=1.0, provider="CPUExecutionProvider",
                           latency_ms=lat, latency_p90_ms=lat, latency_measured_ms=lat,
                           latency_provider="CPUExecutionProvider", latency_device="cpu", latency_batch=1,
                           weight_bytes=int(size * 1e6), size_ratio=size, bops=1.0, w4_weight_share=0.0,
                           onnx_bytes=1)
    return TrialRow(n, str(n), "", "", metrics, {}, {}, "", {}, {}, feasible)


def test_pareto_front_two_objectives():
    rows = [_row(0, 0.80, 10, 1.0), _row(1, 0.79, 9, 0.5), _row(2, 0.70, 9, 0.3), _row(3, 0.78, 11, 0.4),
            _row(4, 0.60, 8, 0.25), _row(5, 0.85, 12, 0.3, feasible=False)]
    front = pareto_front(rows, ["map", "latency"])
    assert [r.number for r in front] == [4, 1, 0]
    front = pareto_front(rows, ["map", "size"])
    assert [r.number for r in front] == [4, 2, 3, 1, 0]  # infeasible #5 excluded


def test_hypervolume_2d():
    assert hypervolume_2d([(0.3, 0.8), (0.5, 0.9), (0.4, 0.7)], (1.0, 0.5)) == pytest.approx(0.26)
    assert hypervolume_2d([], (1.0, 0.5)) == 0.0
    assert hypervolume_2d([(1.2, 0.9), (0.5, 0.4)], (1.0, 0.5)) == 0.0  # outside the reference box
    # adding a dominated point changes nothing
    assert hypervolume_2d([(0.3, 0.8), (0.35, 0.75)], (1.0, 0.5)) == pytest.approx(0.7 * 0.3)


def test_best_at_budget():
    rows = [_row(0, 0.80, 10, 1.0), _row(1, 0.79, 9, 0.5), _row(2, 0.70, 9, 0.3)]
    assert best_at_budget(rows, 0.5).number == 1
    assert best_at_budget(rows, 0.3).number == 2
    assert best_at_budget(rows, 0.2) is None
