"""The Brevitas backend's quantizers as numbers, for :mod:`quantizers.emit`.

:func:`layer_params` runs each quantized layer's own Brevitas proxies the way the layer's
forward does (input quantizer, ``quant_weight``, ``bias_quant`` at ``input scale x weight
scale``, output quantizer) and returns their integers, scales and zero points, so the file
written by graph emission holds the values Brevitas' exporter would write
(``tests/integration/test_emit.py`` compares both files).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantizers.emit import EmitUnsupported, LayerParams

if TYPE_CHECKING:
    from quantizers.base import QuantizedModel


def layer_params(qmodel: QuantizedModel) -> dict[str, LayerParams]:
    """Layer name -> :class:`~quantizers.emit.LayerParams` of every quantized layer of ``qmodel``."""
    import torch

    if qmodel.module is None:
        raise EmitUnsupported("this QuantizedModel has no torch module")
    out: dict[str, LayerParams] = {}
    with torch.no_grad():
        for name, precision in qmodel.assignment.items():
            if precision.is_float:
                continue
            out[name] = _one(name, qmodel.module.get_submodule(name))
    return out


def _one(name: str, q: Any) -> LayerParams:
    import numpy as np
    import torch

    from quantizers.lowering.graph import QParams

    weight = q.weight
    probe = torch.zeros((1, weight.shape[1] * getattr(q, "groups", 1)) + (1,) * (weight.dim() - 2),
                        device=weight.device, dtype=weight.dtype)
    qx = q.input_quant(probe) if q.input_quant.is_quant_enabled else None
    x_q = _act(qx, q.input_quant, name, "input") if qx is not None else None
    w_q = w_clip = weight_int = weight_float = None
    qw = q.quant_weight(qx) if q.weight_quant.is_quant_enabled else None
    if qw is not None:
        bits = int(qw.bit_width)
        if bits > 8 or not bool(qw.signed) or bool(torch.any(qw.zero_point != 0)):
            raise EmitUnsupported(f"layer '{name}': {bits}-bit weights (signed {bool(qw.signed)}, zero point "
                                  "0 needed) are not written by graph emission")
        scale = qw.scale.detach().float().reshape(-1).cpu().numpy()
        weight_int = qw.int().detach().cpu().numpy().astype(np.int32)
        per_channel = scale.size > 1
        w_q = QParams(scale if per_channel else scale.reshape(()), np.zeros(scale.shape if per_channel else (),
                      dtype=np.int8), "int8", 0 if per_channel else None)
        narrow = bool(q.weight_quant.is_narrow_range)
        w_clip = (-(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1)
    else:
        weight_float = weight.detach().float().cpu().numpy()
    bias = bias_int = bias_q = None
    if q.bias is not None:
        bias = q.bias.detach().float().cpu().numpy()
        if q.bias_quant.is_quant_enabled:
            qb = q.bias_quant(q.bias, qx, qw)
            b_scale = qb.scale.detach().float().reshape(-1).cpu().numpy()
            bias_int = qb.int().detach().cpu().numpy().astype(np.int64).reshape(-1)
            bias_q = QParams(b_scale, np.zeros(b_scale.shape, dtype=np.int32), "int32", 0 if b_scale.size > 1 else None)
            bias = (bias_int * b_scale).astype(np.float32)
    y_q = None
    oq = getattr(q, "output_quant", None)
    if oq is not None and oq.is_quant_enabled:
        y_q = _act(oq(torch.zeros(1, device=weight.device, dtype=weight.dtype)), oq, name, "output")
    return LayerParams(x_q=x_q, weight_int=weight_int, w_q=w_q, w_clip=w_clip, weight_float=weight_float, bias=bias,
                       bias_int=bias_int, bias_q=bias_q, y_q=y_q)


def _act(qt: Any, proxy: Any, name: str, role: str) -> Any:
    """The per-tensor 8-bit grid of an activation quantizer's output ``qt`` (a QuantTensor)."""
    import numpy as np

    from quantizers.lowering.graph import QParams

    if not hasattr(qt, "scale") or qt.scale is None:
        raise EmitUnsupported(f"layer '{name}': its {role} quantizer returned no scale")
    bits = int(qt.bit_width)
    if bits != 8 or bool(proxy.is_narrow_range) or qt.scale.numel() != 1:
        raise EmitUnsupported(f"layer '{name}': its {role} quantizer is not a full-range per-tensor 8-bit grid")
    signed = bool(qt.signed)
    zp = float(qt.zero_point.detach().reshape(()).cpu())
    if zp != round(zp):
        raise EmitUnsupported(f"layer '{name}': its {role} quantizer has a fractional zero point {zp}")
    qtype = "int8" if signed else "uint8"
    return QParams(np.asarray(float(qt.scale.detach().reshape(()).cpu()), dtype=np.float32),
                   np.asarray(int(round(zp)), dtype=np.dtype(qtype)), qtype)
