"""Analytic cost (weight bytes, BOPs) from a layer table, by hand-computed numbers."""

from __future__ import annotations

import pytest

from evaluators.cost import analytic_cost, layer_cost
from mpq.assignment import Assignment, LayerInfo, Precision
from mpq.errors import UserError


def _conv(name: str, cin: int, cout: int, k: int, hw: int, index: int, quantizable: bool = True) -> LayerInfo:
    weights = cout * cin * k * k
    return LayerInfo(name=name, kind="Conv2d", in_channels=cin, out_channels=cout, kernel=(k, k), stride=(1, 1),
                     groups=1, params=weights + cout, macs=weights * hw * hw, index=index, block=name.rsplit(".", 1)[0],
                     quantizable=quantizable, reason="" if quantizable else "DFL: fixed weights")


LAYERS = [_conv("model.0.conv", 3, 16, 3, 96, 0), _conv("model.1.conv", 16, 32, 3, 48, 1),
          _conv("model.23.dfl.conv", 16, 1, 1, 10, 2, quantizable=False)]


def test_float_assignment_costs_the_float_model():
    c = analytic_cost(LAYERS, Assignment())
    weights = sum(lay.weight_params for lay in LAYERS)
    biases = sum(lay.params - lay.weight_params for lay in LAYERS)
    assert c.float_weight_bytes == c.weight_bytes == weights * 4 + biases * 4
    assert c.bops == c.float_bops == sum(lay.macs for lay in LAYERS) * 32 * 32
    assert c.size_ratio == 1.0 and c.w4_weight_share == 0.0 and c.a8_layer_share == 0.0


def test_mixed_assignment_by_hand():
    a = Assignment({"model.0.conv": "W8A8", "model.1.conv": "W4A16"})
    c = analytic_cost(LAYERS, a)
    l0, l1, dfl = LAYERS
    w0 = l0.weight_params * 1 + 16 * 4 + 16 * 4  # int8 weights + per-channel scales + float biases
    w1 = l1.weight_params // 2 + 32 * 4 + 32 * 4
    wd = dfl.weight_params * 4 + 1 * 4
    assert c.weight_bytes == w0 + w1 + wd
    assert c.bops == l0.macs * 8 * 8 + l1.macs * 4 * 32 + dfl.macs * 32 * 32
    assert c.w4_weight_share == pytest.approx(l1.weight_params / (l0.weight_params + l1.weight_params))
    assert c.a8_layer_share == pytest.approx(0.5)
    assert 0 < c.size_ratio < 0.3
    d = c.to_dict()
    assert d["size_ratio"] == pytest.approx(c.size_ratio)


def test_float_bits_16_halves_float_storage():
    b32, _ = layer_cost(LAYERS[0], Precision(), float_bits=32)
    b16, o16 = layer_cost(LAYERS[0], Precision(), float_bits=16)
    assert b16 == LAYERS[0].weight_params * 2 + 16 * 4 < b32 and o16 == LAYERS[0].macs * 16 * 16


def test_bad_assignments_name_the_layer():
    with pytest.raises(UserError, match=r"'model.1.cnv'.*did you mean 'model.1.conv'"):
        analytic_cost(LAYERS, Assignment({"model.1.cnv": "W4A8"}))
    with pytest.raises(UserError, match="model.23.dfl.conv.*not quantizable"):
        analytic_cost(LAYERS, Assignment({"model.23.dfl.conv": "W4A16"}))
