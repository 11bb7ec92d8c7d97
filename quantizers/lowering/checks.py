"""Static rule checkers for the deployment targets: pure ``onnx``, no runtime needed.

:func:`check_tensorrt` verifies TensorRT's explicit-quantization conventions (see
:mod:`quantizers.lowering.tensorrt` for where each rule comes from) and
:func:`check_ort_cpu` the patterns ONNX Runtime's CPU provider fuses into integer kernels
(see :mod:`quantizers.lowering.ort_cpu`). Each returns a list of :class:`Violation`
(rule id, node, message); an empty list means the graph follows every rule.

The ONNX Runtime check is a static prediction; :func:`evaluators.runtime.int8_layers` reads
back the graph ONNX Runtime actually runs and is the proof.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import GraphIndex, load

if TYPE_CHECKING:
    import os

    import onnx

#: TensorRT rules: id -> what it requires.
TENSORRT_RULES: Mapping[str, str] = {
    "zero-point": "every QuantizeLinear/DequantizeLinear has zero point 0 (TensorRT quantization is symmetric)",
    "int8-type": "Q/DQ integer types are INT8 (INT4 only for the weights of weight-only MatMul/Gemm; no uint8)",
    "scale": "scales are constant, finite and positive",
    "activation-per-tensor": "activations are quantized per tensor (scalar scale)",
    "weight-axis": "a Conv weight's DequantizeLinear is per tensor or per output channel (axis 0, one scale per "
                   "output channel)",
    "weight-direct": "a quantized weight is a constant -> DequantizeLinear, or a float constant -> QuantizeLinear -> "
                     "DequantizeLinear: nothing in between (no Clip)",
    "weight-range": "INT8 weights lie in [-127, 127]",
    "qdq-pairs": "an activation DequantizeLinear is fed by a QuantizeLinear, and a QuantizeLinear feeds only "
                 "DequantizeLinear nodes",
    "weight-only-conv": "a Conv with a dequantized weight also has a dequantized input (TensorRT has no weight-only "
                        "INT8/INT4 convolution)",
    "bias-float": "Conv biases are float (no DequantizeLinear on a bias)",
    "opset": "opset >= 13 (per-channel QuantizeLinear/DequantizeLinear)",
}

#: ONNX Runtime CPU rules (for the convolutions whose input is dequantized).
ORT_CPU_RULES: Mapping[str, str] = {
    "dq-inputs": "every input of an A8 Conv (activation, weight, bias) comes from a DequantizeLinear",
    "u8-activations": "activations are uint8 (x86 ONNX Runtime fuses int8 activations only with "
                      "session.qdqisint8allowed)",
    "s8-weights": "the weight is an int8 constant directly behind its DequantizeLinear (no Clip), per tensor or "
                  "per output channel (axis 0), zero point 0",
    "int32-bias": "the bias is an int32 constant behind a DequantizeLinear with zero point 0 and scale = input "
                  "scale x weight scale",
    "output-q": "the Conv's output goes only to QuantizeLinear nodes of the input's type and is not a graph output",
    "no-weight-only-dq": "a Conv whose input is float has a float weight (a DequantizeLinear on an initializer "
                         "is recomputed on every run)",
    "activation-unit": "a Sigmoid, Mul, Add or Concat whose inputs are all dequantized and whose output is "
                       "quantized (the int8 SiLU: QLinearSigmoid, QLinearMul; deploy.int8_ops: QLinearAdd, "
                       "QLinearConcat) reads uint8 and writes only to uint8 QuantizeLinear nodes, and its output "
                       "is not a graph output",
}

#: the elementwise ops ONNX Runtime's CPU QDQ transformers run on integers (com.microsoft.QLinear<op>)
ORT_ACTIVATION_OPS = ("Sigmoid", "Mul", "Add", "Concat")


@dataclass(frozen=True)
class Violation:
    """One broken rule: its id, the node at fault and what is wrong."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "message": self.message}


def _qtype(index: GraphIndex, node: Any) -> str | None:
    """The integer type of a Q/DQ node (its zero point's type; uint8 when absent)."""
    if len(node.input) > 2 and node.input[2]:
        zp = index.const(node.input[2])
        return str(zp.dtype) if zp is not None else None
    return "uint8"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_tensorrt(model: onnx.ModelProto | str | os.PathLike[str]) -> list[Violation]:
    """Every TensorRT explicit-quantization rule :data:`TENSORRT_RULES` the graph breaks."""
    import numpy as np

    model = load(model)
    index = GraphIndex(model)
    out: list[Violation] = []
    if _opset(model) < 13 and any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        out.append(Violation("opset", "(model)", f"opset {_opset(model)} < 13: per-channel Q/DQ needs 13"))
    consumers_of = index.consumers
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = node.name or node.output[0]
        scale = index.const(node.input[1])
        zp = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        qtype = _qtype(index, node)
        if scale is None or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
            out.append(Violation("scale", name, "scale is not a constant, finite, positive value"))
        if zp is not None and not np.all(np.asarray(zp, dtype=np.int64) == 0):
            zps = sorted({int(v) for v in np.asarray(zp).reshape(-1)})[:4]
            out.append(Violation("zero-point", name, f"zero point(s) {zps} are not 0"))
        weight_of = [c for c in consumers_of.get(node.output[0], []) if c.op_type in ("Conv", "MatMul", "Gemm")
                     and len(c.input) > 1 and c.input[1] == node.output[0]]
        is_weight = node.op_type == "DequantizeLinear" and (
            index.is_const(node.input[0]) or (index.producer.get(node.input[0]) is not None and index.is_const(
                index.producer[node.input[0]].input[0])))
        is_const_q = node.op_type == "QuantizeLinear" and index.is_const(node.input[0])
        if qtype == "int8" or (qtype is not None and qtype.startswith("float8")):
            pass
        elif qtype is not None and "int4" in qtype and (is_weight or is_const_q) and weight_of and all(
                c.op_type in ("MatMul", "Gemm") for c in weight_of):
            pass
        elif qtype == "int32" and node.op_type == "DequantizeLinear":
            pass  # reported as bias-float below
        else:
            where = " on a Conv weight (TensorRT has no INT4 convolution)" if qtype and "int4" in qtype else ""
            out.append(Violation("int8-type", name, f"{qtype} quantization{where}"))
        if not (is_weight or is_const_q) and scale is not None and np.asarray(scale).size != 1:
            out.append(Violation("activation-per-tensor", name, f"activation scale has {np.asarray(scale).size} "
                                                                "values"))
        if node.op_type == "QuantizeLinear" and not is_const_q:
            bad = [c.name or c.op_type for c in consumers_of.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                out.append(Violation("qdq-pairs", name, f"QuantizeLinear feeds {bad[:3]}, not DequantizeLinear"))
        if node.op_type == "DequantizeLinear" and not is_weight:
            src = index.producer.get(node.input[0])
            if src is None or src.op_type != "QuantizeLinear":
                what = src.op_type if src is not None else "a graph input"
                out.append(Violation("qdq-pairs", name, f"DequantizeLinear of {what}, not of a QuantizeLinear"
                                     + (" (a Clip between a weight and its DequantizeLinear?)"
                                        if src is not None and src.op_type == "Clip" else "")))
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.name or node.output[0]
        w_dq = index.producer.get(node.input[1])
        x_dq = index.producer.get(node.input[0])
        if len(node.input) > 2 and node.input[2]:
            b = index.producer.get(node.input[2])
            if b is not None and b.op_type == "DequantizeLinear":
                out.append(Violation("bias-float", name, "the bias is dequantized (TensorRT takes float biases)"))
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            continue
        if node.op_type == "Conv" and (x_dq is None or x_dq.op_type != "DequantizeLinear"):
            out.append(Violation("weight-only-conv", name, "dequantized weight, float input"))
        src = index.producer.get(w_dq.input[0])
        if index.is_const(w_dq.input[0]):
            arr = np.asarray(index.const(w_dq.input[0]))
            if arr.dtype == np.int8 and (int(arr.min()) < -127 or int(arr.max()) > 127):
                out.append(Violation("weight-range", name, f"INT8 weights in [{int(arr.min())}, {int(arr.max())}]"))
        elif not (src is not None and src.op_type == "QuantizeLinear" and index.is_const(src.input[0])):
            what = src.op_type if src is not None else "a non-constant tensor"
            out.append(Violation("weight-direct", name, f"the weight reaches its DequantizeLinear through {what}"))
        if node.op_type == "Conv":
            scale = index.const(w_dq.input[1])
            axis = next((int(a.i) for a in w_dq.attribute if a.name == "axis"), 1)
            w = index.const(w_dq.input[0])
            if w is None and src is not None:
                w = index.const(src.input[0])
            channels = int(np.asarray(w).shape[0]) if w is not None else None
            if scale is not None and np.asarray(scale).size != 1 and (
                    axis != 0 or (channels is not None and np.asarray(scale).size != channels)):
                out.append(Violation("weight-axis", name, f"per-channel weight scale on axis {axis} with "
                                                          f"{np.asarray(scale).size} values"))
    return out


def check_ort_cpu(model: onnx.ModelProto | str | os.PathLike[str], a8_nodes: set[str] | None = None
                  ) -> list[Violation]:
    """Every ONNX Runtime CPU fusion rule :data:`ORT_CPU_RULES` an A8 Conv of the graph breaks
    (and weight-only DQ weights, which cost a dequantization per run).

    A8 Convs are those whose input is dequantized, or, given ``a8_nodes`` (the node names of
    the layers asked for A8), exactly those: a Conv asked for A16 may read the previous
    layer's dequantized output.
    """
    import numpy as np

    model = load(model)
    index = GraphIndex(model)
    out: list[Violation] = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        name = node.name or node.output[0]
        x_dq = index.producer.get(node.input[0])
        w_dq = index.producer.get(node.input[1])
        if a8_nodes is not None and node.name not in a8_nodes:
            if w_dq is not None and w_dq.op_type == "DequantizeLinear" and (
                    x_dq is None or x_dq.op_type != "DequantizeLinear"):
                out.append(Violation("no-weight-only-dq", name, "float input with a dequantized weight: the weight "
                                                                "is dequantized on every run"))
            continue
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            if w_dq is not None and w_dq.op_type == "DequantizeLinear":
                out.append(Violation("no-weight-only-dq", name, "float input with a dequantized weight: the weight "
                                                                "is dequantized on every run"))
            continue
        has_bias = len(node.input) > 2 and bool(node.input[2])
        b_dq = index.producer.get(node.input[2]) if has_bias else None
        missing = [what for what, p in (("weight", w_dq), ("bias", b_dq)) if (what == "weight" or has_bias)
                   and (p is None or p.op_type != "DequantizeLinear")]
        if missing:
            out.append(Violation("dq-inputs", name, f"the {' and '.join(missing)} is not dequantized"))
        x_type = _qtype(index, x_dq)
        if x_type != "uint8":
            out.append(Violation("u8-activations", name, f"{x_type} input (x86 fuses uint8 activations)"))
        x_scale = index.const(x_dq.input[1])
        w_scale = None
        if w_dq is not None and w_dq.op_type == "DequantizeLinear":
            w = index.const(w_dq.input[0])
            w_scale = index.const(w_dq.input[1])
            zp = index.const(w_dq.input[2]) if len(w_dq.input) > 2 and w_dq.input[2] else None
            axis = next((int(a.i) for a in w_dq.attribute if a.name == "axis"), 1)
            problems = []
            if w is None:
                src = index.producer.get(w_dq.input[0])
                problems.append(f"reaches its DequantizeLinear through {src.op_type if src is not None else '?'}")
            elif np.asarray(w).dtype != np.int8:
                problems.append(f"is {np.asarray(w).dtype}")
            if zp is not None and not np.all(np.asarray(zp, dtype=np.int64) == 0):
                problems.append("has non-zero zero points")
            if w_scale is not None and np.asarray(w_scale).size > 1 and axis != 0:
                problems.append(f"is per-channel on axis {axis}")
            if problems:
                out.append(Violation("s8-weights", name, "the weight " + ", ".join(problems)))
        if b_dq is not None and b_dq.op_type == "DequantizeLinear":
            b = index.const(b_dq.input[0])
            b_scale = index.const(b_dq.input[1])
            b_zp = index.const(b_dq.input[2]) if len(b_dq.input) > 2 and b_dq.input[2] else None
            problems = []
            if b is None or np.asarray(b).dtype != np.int32:
                problems.append(f"is {np.asarray(b).dtype if b is not None else 'not a constant'}")
            if b_zp is not None and not np.all(np.asarray(b_zp, dtype=np.int64) == 0):
                problems.append("has non-zero zero points")
            if b_scale is not None and x_scale is not None and w_scale is not None:
                want = (np.float32(np.asarray(x_scale).reshape(())) * np.asarray(w_scale, np.float32).reshape(-1))
                got = np.broadcast_to(np.asarray(b_scale, np.float32).reshape(-1), want.shape)
                if not np.allclose(got, want, rtol=1e-5, atol=0):
                    problems.append("has a scale other than input scale x weight scale")
            if problems:
                out.append(Violation("int32-bias", name, "the bias " + ", ".join(problems)))
        users = index.consumers.get(node.output[0], [])
        graph_out = node.output[0] in index.graph_outputs
        if graph_out or not users or any(u.op_type != "QuantizeLinear" for u in users):
            what = "is a graph output" if graph_out else f"goes to {[u.op_type for u in users][:3]}"
            out.append(Violation("output-q", name, f"the output {what}"))
        elif any(_qtype(index, u) != x_type for u in users):
            out.append(Violation("output-q", name, "the output quantizer's type differs from the input's"))
    out.extend(_check_activation_units(index))
    return out


def _check_activation_units(index: GraphIndex) -> list[Violation]:
    """Rule ``activation-unit``: the Sigmoid / Mul / Add / Concat nodes meant to run on integers (every input
    dequantized, some output quantized) form whole QDQ units ONNX Runtime fuses."""
    out: list[Violation] = []
    for node in index.model.graph.node:
        if node.op_type not in ORT_ACTIVATION_OPS:
            continue
        dqs = [index.producer.get(i) for i in node.input]
        if not dqs or any(d is None or d.op_type != "DequantizeLinear" or index.is_const(d.input[0]) for d in dqs):
            continue
        users = index.consumers.get(node.output[0], [])
        if not any(u.op_type == "QuantizeLinear" for u in users):
            continue
        name = node.name or node.output[0]
        problems = []
        if node.output[0] in index.graph_outputs:
            problems.append("its output is a graph output")
        if any(u.op_type != "QuantizeLinear" for u in users):
            problems.append(f"its output also goes to {sorted({u.op_type for u in users} - {'QuantizeLinear'})}")
        types = {_qtype(index, d) for d in dqs if d is not None} | {_qtype(index, u) for u in users
                                                                   if u.op_type == "QuantizeLinear"}
        if types != {"uint8"}:
            problems.append(f"integer types {sorted(str(t) for t in types)} (uint8 expected)")
        if problems:
            out.append(Violation("activation-unit", name, "; ".join(problems)))
    return out


CHECKERS: Mapping[str, Callable[[Any], list[Violation]]] = {"ort-cpu": check_ort_cpu, "tensorrt": check_tensorrt}
RULES: Mapping[str, Mapping[str, str]] = {"ort-cpu": ORT_CPU_RULES, "tensorrt": TENSORRT_RULES}
