"""The ``tensorrt`` target: TensorRT explicit quantization (Q/DQ) conventions.

What TensorRT's ONNX parser and builder take (NVIDIA, "Explicit Quantization" in the
TensorRT developer guide, and the 10.x -> 11.x migration guide):

- symmetric quantization only: every ``QuantizeLinear``/``DequantizeLinear`` has zero
  point 0; INT8 activations in [-128, 127] and INT8 weights in [-127, 127];
- activations per tensor; weights per tensor or per output channel (``axis`` 0 for Conv);
- a quantized weight is a constant followed directly by its ``DequantizeLinear`` (or a float
  constant through ``QuantizeLinear -> DequantizeLinear``): nothing in between (no
  ``Clip``, which Brevitas writes for sub-8-bit grids);
- INT4 (and FP4) weights exist for weight-only GEMM / MatMul (block-wise); TensorRT has no
  INT4 convolution kernels (ModelOpt: "no plan for int4 conv support"), so 4-bit Conv
  weights go in INT8 containers (values in [-7, 7] or [-8, 7]): on TensorRT a W4 Conv runs
  as INT8, buying neither speed nor engine size over W8, only the packed size;
- biases stay float (TensorRT quantizes them itself);
- a Conv runs INT8 when its input and its weight are both dequantized: there is no
  weight-only INT8/INT4 convolution, so a weight-only (A16) layer holds float values of its
  quantized grid (exact) and runs in the engine's float precision;
- TensorRT 10: ``BuilderFlag.INT8`` (and ``FP16`` for the float layers) on a weakly typed
  network; TensorRT 11 removed those flags and implicit INT8 calibration: the network is
  strongly typed and the Q/DQ nodes alone decide (see :mod:`evaluators.tensorrt`).

The lowering writes exactly that; :func:`quantizers.lowering.checks.check_tensorrt`
verifies it on any graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import (
    GraphEditor,
    LayerQuant,
    LoweringError,
    QParams,
    add_qdq,
    add_weight_dq,
)
from quantizers.lowering.ort_cpu import scope_of

if TYPE_CHECKING:
    import onnx

NAME = "tensorrt"
NEEDS_OUTPUT_QUANT = False
W4_NOTE = ("TensorRT has no INT4 convolution (INT4 weights are for weight-only GEMM/MatMul): 4-bit Conv weights are "
           "INT8 containers holding 4-bit values, which run as INT8 (W4 buys packed size only on this target)")
A16_NOTE = ("TensorRT has no weight-only convolution: weight-only (A16) layers hold float values of their quantized "
            "grid and run in the engine's float precision")


def _sym_int8(p: QParams, what: str, layer: str) -> QParams:
    """``p`` as int8 with zero point 0 (uint8 with zero point 128 is the same grid)."""
    import numpy as np

    zp = np.asarray(p.zero_point, dtype=np.int64)
    if p.qtype == "uint8" and np.all(zp == 128):
        return QParams(p.scale, np.zeros(zp.shape, dtype=np.int8), "int8", p.axis)
    if p.qtype == "int8" and np.all(zp == 0):
        return p
    raise LoweringError(f"layer '{layer}': its {what} quantizer is {p.qtype} with zero point(s) "
                        f"{sorted({int(v) for v in zp.reshape(-1)})[:4]}; TensorRT takes symmetric int8 only "
                        "(zero point 0; for Brevitas set backend.act_quant_type: sym)")


def lower(model: onnx.ModelProto, layers: list[LayerQuant]) -> dict[str, dict[str, Any]]:
    """Rewrite ``model`` in place for TensorRT; return what each layer became."""
    import numpy as np

    ed = GraphEditor(model)
    out: dict[str, dict[str, Any]] = {}
    for lq in layers:
        node = lq.node
        scope = scope_of(node)
        name = lq.name
        info: dict[str, Any] = {"node": node.name, "op": node.op_type, "w_bits": lq.w_bits,
                                "a_bits": 8 if lq.quantizes_inputs else 16}
        out[name] = info
        if lq.quantizes_weights and lq.quantizes_inputs:
            assert lq.x_q is not None and lq.w_q is not None
            if lq.x_q.bits != 8:
                raise LoweringError(f"layer '{name}': {lq.x_q.qtype} activations; TensorRT INT8 takes 8-bit ones")
            if lq.x_clip is not None and lq.x_clip not in ((-128, 127), (0, 255)):
                raise LoweringError(f"layer '{name}': its input is clipped to {list(lq.x_clip)} (a sub-8-bit grid); "
                                    "TensorRT takes int8 activations")
            x_q = _sym_int8(lq.x_q, "input", name)
            if not lq.w_q.symmetric:
                raise LoweringError(f"layer '{name}': weights with non-zero zero points; TensorRT takes symmetric "
                                    "weights")
            q = np.asarray(lq.weight_int)
            clipped = int(((q < -127) | (q > 127)).sum())
            q = np.clip(q, -127, 127).astype(np.int8)
            scale = np.asarray(lq.w_q.scale, dtype=np.float32).reshape(-1)
            if scale.size > 1 and lq.w_q.axis not in (0, None):
                raise LoweringError(f"layer '{name}': per-channel weight scales on axis {lq.w_q.axis}; TensorRT "
                                    "takes axis 0 for Conv weights")
            w_q = QParams(scale if scale.size > 1 else scale.reshape(()), np.zeros(scale.shape, np.int8), "int8",
                          0 if scale.size > 1 else None)
            key = ("in", lq.x, np.asarray(x_q.scale, dtype=np.float32).tobytes())
            x_dq = ed.shared(key, lambda lq=lq, x_q=x_q, node=node, scope=scope, name=name: add_qdq(
                ed, lq.x, x_q, prefix=f"{name}.input", scope=f"{scope}/input_quant", before=node)[1])
            node.input[0] = x_dq
            node.input[1] = add_weight_dq(ed, name, q, w_q, scope=scope, before=node)
            if lq.bias_int is not None and lq.bias is not None:
                node.input[2] = ed.initializer(f"{name}.bias", np.asarray(lq.bias, np.float32), exact=True)
            info.update(form="qdq-int8", input=x_q.to_dict(), weight=w_q.to_dict())
            if lq.y_q is not None:
                y_q = _sym_int8(lq.y_q, "output", name)
                readers = [d.output[0] for d in lq.y_dq_nodes]
                y_qn, y_dq = add_qdq(ed, node.output[0], y_q, prefix=f"{name}.output", scope=f"{scope}/output_quant",
                                     after=node)
                ed.rewire(readers, y_dq, skip=[y_qn])
                info["output"] = y_q.to_dict()
            if clipped:
                info["note"] = f"{clipped} weight integers at -128 clipped to -127 (TensorRT's INT8 weight range)"
            if lq.w_bits == 4:
                info["note"] = (info.get("note", "") + "; " if "note" in info else "") + "4-bit values in an INT8 " \
                                                                                          "container"
        elif lq.quantizes_weights:
            node.input[1] = ed.initializer(f"{name}.weight", np.asarray(lq.dequantized_weight(), np.float32),
                                           exact=True)
            if lq.bias_int is not None and lq.bias is not None:
                node.input[2] = ed.initializer(f"{name}.bias", np.asarray(lq.bias, np.float32), exact=True)
            info.update(form="float-grid", weight=lq.w_q.to_dict() if lq.w_q is not None else None)
        elif lq.quantizes_inputs:
            assert lq.x_q is not None
            x_q = _sym_int8(lq.x_q, "input", name)
            key = ("in", lq.x, np.asarray(x_q.scale, dtype=np.float32).tobytes())
            node.input[0] = ed.shared(key, lambda lq=lq, x_q=x_q, node=node, scope=scope, name=name: add_qdq(
                ed, lq.x, x_q, prefix=f"{name}.input", scope=f"{scope}/input_quant", before=node)[1])
            info.update(form="fake-quant", reason="float weights (W16A8): TensorRT runs the Conv in float")
        else:
            info.update(form="float")
    ed.finish()
    return out

