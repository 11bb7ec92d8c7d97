"""Brevitas backend options and the quantizers they choose (no model needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from quantizers.brevitas_options import BrevitasOptions


def test_defaults_are_the_good_ptq():
    o = BrevitasOptions()
    assert (o.weight_scale, o.weight_scale_8bit, o.weight_granularity) == ("mse", "max", "per_channel")
    assert (o.act_calibration, o.act_quant_type, o.bias_correction) == ("percentile", "sym", True)
    assert not o.gptq and not o.gpfq and o.optimize_onnx


def test_gptq_and_gpfq_are_alternatives():
    with pytest.raises(ValidationError, match="at most one"):
        BrevitasOptions(gptq=True, gpfq=True)


def test_unknown_option_is_named():
    with pytest.raises(ValidationError, match="weight_scal"):
        BrevitasOptions(weight_scal="mse")  # type: ignore[call-arg]


@pytest.mark.parametrize("opts, bits, cls, per_channel", [
    ({}, 4, "Int8WeightPerChannelFloatMSE", True),
    ({}, 8, "Int8WeightPerChannelFloat", True),
    ({"weight_scale": "max"}, 4, "Int8WeightPerChannelFloat", True),
    ({"weight_scale": "percentile"}, 4, "Int8WeightPerChannelFloat", True),
    ({"weight_granularity": "per_tensor", "weight_scale": "max"}, 4, "Int8WeightPerTensorFloat", False),
])
def test_weight_quantizer_choice(opts, bits, cls, per_channel):
    import torch

    from mpq.assignment import Precision
    from quantizers.brevitas_backend import quant_layer, weight_quantizer

    q = weight_quantizer(bits, BrevitasOptions(**opts))
    assert any(c.__name__ == cls for c in q.__mro__)
    layer = quant_layer(torch.nn.Conv2d(4, 6, 3), Precision(bits, 16), BrevitasOptions(**opts))
    qw = layer.quant_weight()
    assert int(qw.bit_width) == bits
    assert qw.scale.numel() == (6 if per_channel else 1)
    ints = (qw.value / qw.scale).round()
    assert ints.abs().max() <= 2 ** (bits - 1) - 1  # narrow range: [-7, 7] / [-127, 127]


@pytest.mark.parametrize("act_type, signed", [("sym", True), ("asym", False)])
@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_input_quantizer_choice(act_type, signed, method):
    import torch

    from mpq.assignment import Precision
    from quantizers.brevitas_backend import quant_layer

    layer = quant_layer(torch.nn.Conv2d(4, 6, 3), Precision(8, 8),
                        BrevitasOptions(act_quant_type=act_type, act_calibration=method))
    assert layer.input_quant.is_signed == signed
    assert int(layer.input_quant.bit_width()) == 8
