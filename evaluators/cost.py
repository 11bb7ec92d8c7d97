"""Analytic cost of an assignment from the layer table: no model run, no hardware.

- **Weight bytes**: per layer, weights at ``w_bits`` (float layers at ``float_bits``,
  32 by default as the ONNX file stores them), plus, for quantized layers, one float32
  scale per output channel (per-channel quantization), plus float32 biases. Layers that
  are not quantizable (the DFL conv) are always float.
- **BOPs** (bit operations): ``MACs x weight bits x activation bits`` per layer, summed;
  a float operand (16 in a :class:`~mpq.assignment.Precision`) counts ``float_bits``.
  So a W4A16 layer costs ``MACs x 4 x 32``: weight-only quantization does not make the
  arithmetic integer, and the metric says so.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from evaluators.base import CostResult
from mpq.assignment import Assignment, LayerInfo, Precision
from mpq.errors import UserError

SCALE_BYTES = 4
BIAS_BYTES = 4


def _bits(b: int, float_bits: int) -> int:
    return float_bits if b >= 16 else b


def layer_cost(layer: LayerInfo, precision: Precision, *, float_bits: int = 32) -> tuple[float, float]:
    """``(weight bytes, BOPs)`` of one layer at ``precision``."""
    w = _bits(precision.w_bits, float_bits)
    a = _bits(precision.a_bits, float_bits)
    bias = max(layer.params - layer.weight_params, 0)
    wbytes = layer.weight_params * w / 8 + bias * BIAS_BYTES
    if precision.quantizes_weights:
        wbytes += layer.out_channels * SCALE_BYTES
    return wbytes, float(layer.macs) * w * a


def analytic_cost(layers: Iterable[LayerInfo], assignment: Assignment, *, float_bits: int = 32) -> CostResult:
    """Weight bytes and BOPs of ``assignment`` over the model's layer table.

    Raises:
        UserError: the assignment names a layer that is not in the table (nearest name
            suggested) or quantizes a layer that is not quantizable.
    """
    layers = list(layers)
    by_name = {lay.name: lay for lay in layers}
    for name, p in assignment.items():
        lay = by_name.get(name)
        if lay is None:
            near = difflib.get_close_matches(name, list(by_name), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise UserError(f"assignment names layer '{name}', which is not in the model's layer table{hint}")
        if not lay.quantizable and not p.is_float:
            raise UserError(f"assignment sets layer '{name}' to {p}, but it is not quantizable ({lay.reason})")
    float_p = Precision()
    wbytes = fbytes = bops = fbops = 0.0
    w4 = qw = a8 = nq = 0
    for lay in layers:
        p = assignment.get(lay.name)
        b, o = layer_cost(lay, p, float_bits=float_bits)
        fb, fo = layer_cost(lay, float_p, float_bits=float_bits)
        wbytes, bops, fbytes, fbops = wbytes + b, bops + o, fbytes + fb, fbops + fo
        if lay.quantizable:
            nq += 1
            qw += lay.weight_params
            w4 += lay.weight_params if p.w_bits == 4 else 0
            a8 += 1 if p.a_bits == 8 else 0
    return CostResult(weight_bytes=int(round(wbytes)), float_weight_bytes=int(round(fbytes)), bops=bops,
                      float_bops=fbops, w4_weight_share=w4 / qw if qw else 0.0, a8_layer_share=a8 / nq if nq else 0.0)
