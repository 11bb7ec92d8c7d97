"""The ModelOpt backend's quantizers as numbers, for :mod:`quantizers.emit`.

:func:`layer_params` reads each quantized layer's ``TensorQuantizer`` values as ModelOpt's
ONNX export writes them (``export_int8``: scale ``amax / 127`` in float32, zero point 0,
a zero ``amax`` giving scale 1) and its integer weights as the backend's export rewrites
them (``quantizers.modelopt_backend.integer_weight``, passed in), so the file written by graph
emission holds the values of the traced export (``tests/integration/test_emit.py``).
4-bit weights in INT4 containers (``w4_format: int4``) are not emitted: those trials trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from quantizers.emit import EmitUnsupported, LayerParams

if TYPE_CHECKING:
    from quantizers.base import QuantizedModel


def layer_params(qmodel: QuantizedModel, w4_format: str, integer_weight: Callable[[Any], tuple[Any, Any, int]]
                 ) -> dict[str, LayerParams]:
    """Layer name -> :class:`~quantizers.emit.LayerParams` of every quantized layer of ``qmodel``;
    ``integer_weight``: the backend's ``(integers, per-channel step, bits)`` of a layer's weight."""
    import numpy as np

    from quantizers.lowering.graph import QParams

    if qmodel.module is None:
        raise EmitUnsupported("this QuantizedModel has no torch module")
    out: dict[str, LayerParams] = {}
    for name, precision in qmodel.assignment.items():
        if precision.is_float:
            continue
        layer: Any = qmodel.module.get_submodule(name)
        x_q = _act(layer.input_quantizer, name, "input") if precision.quantizes_inputs else None
        weight_int = w_q = weight_float = None
        if precision.quantizes_weights:
            if w4_format == "int4" and precision.w_bits == 4:
                raise EmitUnsupported(f"layer '{name}': 4-bit weights in INT4 containers (w4_format: int4)")
            q, step, _ = integer_weight(layer)
            step = np.asarray(step, dtype=np.float32).reshape(-1)
            per_channel = step.size > 1
            weight_int = q.astype(np.int32)
            zeros = np.zeros(step.shape if per_channel else (), dtype=np.int8)
            w_q = QParams(step if per_channel else step.reshape(()), zeros, "int8", 0 if per_channel else None)
        else:
            weight_float = layer.weight.detach().float().cpu().numpy()
        bias = layer.bias.detach().float().cpu().numpy() if getattr(layer, "bias", None) is not None else None
        oq = getattr(layer, "output_quantizer", None)
        y_q = _act(oq, name, "output") if oq is not None and oq.is_enabled else None
        out[name] = LayerParams(x_q=x_q, weight_int=weight_int, w_q=w_q, weight_float=weight_float, bias=bias, y_q=y_q)
    return out


def _act(q: Any, name: str, role: str) -> Any:
    """The per-tensor grid ModelOpt's ``export_int8`` writes for an activation quantizer."""
    import numpy as np
    import torch

    from quantizers.lowering.graph import QParams

    bits = int(q.num_bits)
    amax = q.amax
    if bits != 8 or amax is None or amax.numel() != 1 or bool(getattr(q, "_unsigned", False)):
        raise EmitUnsupported(f"layer '{name}': its {role} quantizer is not a signed per-tensor 8-bit one")
    scale = amax.detach().float().cpu() / ((1 << (bits - 1)) - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return QParams(np.asarray(float(scale.reshape(())), dtype=np.float32), np.asarray(0, dtype=np.int8), "int8")
