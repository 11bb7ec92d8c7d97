"""Read back, from a Q/DQ ONNX graph, the precision each layer was built at.

Backend-agnostic: it follows graph edges, not exporter-specific node names, except to map
a ``Conv``/``Gemm``/``MatMul`` node to its layer: the legacy TorchScript exporter names
nodes after the module scopes they ran in (``/model.23/one2one_cv2.0/one2one_cv2.0.2/Conv``
for the module ``model.23.one2one_cv2.0.2``), which :func:`mpq.onnx_nodes.module_name_from_node` inverts.

- weights: ``DequantizeLinear`` feeding the weight input, fed by an integer initializer
  (optionally through ``Clip``, whose range gives the bit width: [-7, 7] or [-8, 7] is 4
  bits) or by a ``QuantizeLinear`` of a float initializer; int4/uint4 tensors are 4 bits;
  int8 values all within [-8, 7] are 4 bits held in an int8 container. No DQ: float (16).
- inputs: ``QuantizeLinear -> (Clip) -> DequantizeLinear`` feeding the data input is 8 bits
  (a ``Clip`` narrower than 8 bits gives fewer); anything else is float (16).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from mpq.onnx_nodes import OnnxGraph, module_name_from_node

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class GraphPrecision:
    """What the graph holds for one layer: bit widths and how they were recognized."""

    layer: str
    node: str
    w_bits: int
    a_bits: int
    weight_detail: str = ""
    input_detail: str = ""

    @property
    def label(self) -> str:
        """``W4A8``-style label of the precision found."""
        return f"W{self.w_bits}A{self.a_bits}"


def _clip_bits(graph: OnnxGraph, clip: Any) -> tuple[int, str] | None:
    lo = graph.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    hi = graph.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    if lo is None or hi is None:
        return None
    lo_v, hi_v = int(lo), int(hi)
    bits = max(1, math.ceil(math.log2(hi_v - lo_v + 1)))
    return bits, f"Clip[{lo_v}, {hi_v}]"


def _int_bits(arr: Any) -> tuple[int, str]:
    import numpy as np

    dtype = str(arr.dtype)
    if "int4" in dtype:
        return 4, dtype
    if arr.dtype in (np.int8, np.uint8):
        lo, hi = int(arr.min()), int(arr.max())
        if arr.dtype == np.int8 and lo >= -8 and hi <= 7:
            return 4, f"int8 values in [{lo}, {hi}]"
        return 8, f"{dtype} values in [{lo}, {hi}]"
    return 8 * arr.dtype.itemsize, dtype


def _weight_bits(graph: OnnxGraph, name: str) -> tuple[int, str]:
    dq = graph.source(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return 16, "float"
    src_name = dq.input[0]
    src = graph.source(src_name)
    clip = None
    if src is not None and src.op_type == "Clip":
        clip = _clip_bits(graph, src)
        src_name = src.input[0]
        src = graph.source(src_name)
    if src is not None and src.op_type == "QuantizeLinear":
        zp = graph.const(src.input[2]) if len(src.input) > 2 else None
        if clip:
            return clip[0], f"QuantizeLinear -> {clip[1]} -> DequantizeLinear"
        # The container type decides (int4/uint4: 4 bits, int8/uint8: 8). The zero point's
        # *values* say nothing about the range of the quantized weights (they are usually 0).
        bits = 4 if zp is not None and "int4" in str(zp.dtype) else 8
        return bits, f"QuantizeLinear({zp.dtype if zp is not None else 'uint8'}) -> DequantizeLinear"
    arr = graph.const(src_name)
    if clip:
        return clip[0], f"{arr.dtype if arr is not None else '?'} -> {clip[1]} -> DequantizeLinear"
    if arr is None:
        return 8, "DequantizeLinear of a computed tensor"
    bits, detail = _int_bits(arr)
    return bits, f"{detail} -> DequantizeLinear"


def _input_bits(graph: OnnxGraph, name: str) -> tuple[int, str]:
    dq = graph.source(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return 16, "float"
    src = graph.source(dq.input[0])
    clip = None
    if src is not None and src.op_type == "Clip":
        clip = _clip_bits(graph, src)
        src = graph.source(src.input[0])
    if src is None or src.op_type != "QuantizeLinear":
        return 16, "DequantizeLinear without QuantizeLinear"
    zp = graph.const(src.input[2]) if len(src.input) > 2 and src.input[2] else None
    dtype = str(zp.dtype) if zp is not None else "uint8"
    if clip and clip[0] < 8:
        return clip[0], f"QuantizeLinear({dtype}) -> {clip[1]} -> DequantizeLinear"
    return 8, f"QuantizeLinear({dtype}) -> DequantizeLinear"


def compute_nodes_by_layer(model: Any) -> dict[str, Any]:
    """``{layer name: node}`` for every Conv/Gemm/MatMul whose name carries module scopes."""
    out: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS:
            name = module_name_from_node(node.name)
            if name is not None:
                out[name] = node
    return out


def layer_precisions(model_or_path: Any) -> dict[str, GraphPrecision]:
    """The precision of every Conv/Gemm/MatMul layer found in the graph, by layer name."""
    import onnx

    model = (onnx.load(str(model_or_path), load_external_data=False)
             if isinstance(model_or_path, (str, os.PathLike)) else model_or_path)
    graph = OnnxGraph(model)
    out: dict[str, GraphPrecision] = {}
    for layer, node in compute_nodes_by_layer(model).items():
        w_bits, w_detail = _weight_bits(graph, node.input[1])
        a_bits, a_detail = _input_bits(graph, node.input[0])
        out[layer] = GraphPrecision(layer, node.name, w_bits, a_bits, w_detail, a_detail)
    return out
