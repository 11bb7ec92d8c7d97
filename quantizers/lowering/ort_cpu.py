"""The ``ort-cpu`` target: what ONNX Runtime's CPU provider runs as integer kernels.

ONNX Runtime fuses a ``DequantizeLinear -> Conv -> QuantizeLinear`` group into one
``QLinearConv`` only when (``onnxruntime/core/optimizer/qdq_transformer/selectors_actions/
qdq_selectors.cc``, ``ConvNodeGroupSelector`` and ``NodeGroupSelector::CheckQDQNodes``):

- *every* input of the Conv comes from a ``DequantizeLinear``: the activation, the weight
  and, if there is one, the bias, which must be **int32**;
- the Conv's output goes to ``QuantizeLinear`` nodes only (as many as its output edges), and
  is not a graph output;
- the activation input and output have the same integer type; int8 activations are fused
  only where ``QDQIsInt8Allowed()`` (ARM) or the session option ``session.qdqisint8allowed``
  says so, and then the weight must be int8 too. On x86 the default is **uint8 activations
  with int8 weights** (u8s8, MLAS' fast path);
- the weight is 8-bit (4-bit weights are refused for Conv unless explicitly allowed).

A ``Clip`` between a weight's integers and its ``DequantizeLinear`` (Brevitas' sub-8-bit
QCDQ) hides the weight from the selector, so nothing fuses. Per-channel weight scales on
axis 0 and per-tensor activation scales are what ``QLinearConv`` takes.

The lowering (one rule per layer kind, all here):

- **A8 layer with integer weights** (W4A8, W8A8): input ``Q -> DQ`` as uint8 (a symmetric
  int8 grid with zero point 0 is the uint8 grid with zero point 128: exact); weights as an
  int8 initializer (the backend's integers, clipped offline) -> ``DequantizeLinear`` (axis
  0, the backend's per-channel scales, zero point 0); bias as int32 at scale
  ``input scale x weight scale`` per channel, zero point 0 (the backend's int32 bias when it
  modelled one at that scale, else the float bias rounded to it); the output quantizer the
  backend calibrated (or the lowering, see :mod:`quantizers.lowering.calibrate`), as uint8.
  4-bit weights are int8 values in [-8, 7]: ``QLinearConv`` multiplies 8-bit integers, so
  on this target W4 buys weight size, not speed.
- **Weight-only layer** (W4A16, W8A16): the weights as float32 values of the quantized grid
  (``(q - zp) * scale``, exactly what ``DequantizeLinear`` would compute), no
  ``DequantizeLinear`` in the graph. ONNX Runtime does not constant-fold a
  ``DequantizeLinear`` of an initializer by default (its ``ConstantFolding`` skips DQ nodes to
  keep QDQ groups; only ``session.disable_quant_qdq`` lifts that), so a DQ weight would be
  dequantized on every run (measured: docs/benchmarks.md). Such a layer costs exactly
  what its float twin costs; its file bytes are float bytes, its packed size is reported
  apart.
- **W16A8** (input quantizer, float weights): left as the backend wrote it, noted: it
  cannot run as an integer kernel (the weight is float) and the runtime report shows it.
- float layers: untouched.
- **SiLU between A8 layers** (``deploy.int8_silu``, default on): :func:`int8_silu` completes the
  ``DQ -> Sigmoid -> Q`` and ``DQ, DQ -> Mul -> Q`` units ONNX Runtime fuses into
  ``com.microsoft.QLinearSigmoid`` / ``QLinearMul``, so the activation stays 8-bit from one
  ``QLinearConv`` to the next (measured: docs/benchmarks.md, "Deployment targets").
- **the ops between A8 layers** (``deploy.int8_ops``, default on, with ``int8_silu``):
  :mod:`quantizers.lowering.ort_cpu_ops` keeps the activations on uint8 through ``Concat``,
  ``Add``, ``Split``/``Slice``, ``MaxPool``, ``Resize``, ``Reshape``, ``Transpose`` and the SiLU
  before them (``QLinearConcat``, ``QLinearAdd``, Q/DQ dropped around data movement).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import (
    GraphEditor,
    GraphIndex,
    LayerQuant,
    LoweringError,
    QParams,
    add_bias_dq,
    add_qdq,
    add_weight_dq,
    dequantize,
)

if TYPE_CHECKING:
    import onnx

NAME = "ort-cpu"
#: The target needs a quantizer on the output of every A8 convolution (``DQ -> Conv -> Q``).
NEEDS_OUTPUT_QUANT = True
W4_NOTE = ("4-bit weights are int8 values in [-8, 7] (an 8-bit container): QLinearConv multiplies 8-bit integers, "
           "so on ort-cpu W4 buys weight size (packed), not speed; W4A16 layers hold float values of the 4-bit grid")
A16_NOTE = ("weight-only (A16) layers hold their quantized weights as float32 values of the grid ((q - zp) * scale, "
            "exactly what DequantizeLinear computes): ONNX Runtime does not constant-fold a DequantizeLinear of an "
            "initializer by default, so a DQ weight would be recomputed on every run; such a layer runs as fast as "
            "its float twin, and its size in the file is float")


def scope_of(node: Any) -> str:
    """``/model.0/conv/Conv`` -> ``/model.0/conv`` (the exporter's module scope), for new node names."""
    name = node.name or ""
    return name.rsplit("/", 1)[0] if "/" in name else (name or node.op_type)


def _int8_weight(lq: LayerQuant) -> tuple[Any, QParams]:
    import numpy as np

    assert lq.w_q is not None and lq.weight_int is not None
    if not lq.w_q.symmetric:
        raise LoweringError(f"layer '{lq.name}': its weights have non-zero zero points; ort-cpu lowering takes "
                            "symmetric weights (zero point 0)")
    q = lq.weight_int
    lo, hi = int(q.min()), int(q.max())
    if lo < -128 or hi > 127:
        raise LoweringError(f"layer '{lq.name}': weight integers in [{lo}, {hi}] do not fit int8")
    scale = np.asarray(lq.w_q.scale, dtype=np.float32).reshape(-1)
    zp = np.zeros(scale.shape, dtype=np.int8)
    axis = 0 if scale.size > 1 else None
    if scale.size > 1 and lq.w_q.axis not in (0, None):
        raise LoweringError(f"layer '{lq.name}': per-channel weight scales on axis {lq.w_q.axis}; QLinearConv takes "
                            "axis 0 (output channels)")
    return q.astype(np.int8), QParams(scale if scale.size > 1 else scale.reshape(()), zp if scale.size > 1
                                      else zp.reshape(()), "int8", axis)


def int32_bias(lq: LayerQuant, x_q: QParams, w_q: QParams, channels: int) -> tuple[Any, Any, bool]:
    """(int32 bias, its float32 scale per channel, whether the source's integers were kept).

    The scale is ``input scale x weight scale`` (float32), what ``QLinearConv`` assumes: it
    adds the bias integers to the int32 accumulator as they are.
    """
    import numpy as np

    w_scale = np.asarray(w_q.scale, dtype=np.float32).reshape(-1)
    scale = (np.float32(np.asarray(x_q.scale, dtype=np.float32).reshape(())) * w_scale).astype(np.float32)
    if scale.size == 1 and channels > 1:
        scale = np.full(channels, scale[0], dtype=np.float32)
    if lq.bias_int is not None and lq.bias_q is not None:
        src = np.broadcast_to(np.asarray(lq.bias_q.scale, dtype=np.float32).reshape(-1), scale.shape)
        if lq.bias_q.symmetric and np.allclose(src, scale, rtol=1e-6, atol=0):
            return lq.bias_int.astype(np.int32), scale, True
    bias = np.asarray(lq.bias, dtype=np.float32).reshape(-1)
    q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
    return np.clip(q, -(2 ** 31), 2 ** 31 - 1).astype(np.int32), scale, False


def lower(model: onnx.ModelProto, layers: list[LayerQuant], *, output_ranges: Mapping[str, QParams] | None = None
          ) -> dict[str, dict[str, Any]]:
    """Rewrite ``model`` in place for ONNX Runtime's CPU provider; return what each layer became.

    ``output_ranges``: calibrated output quantizers (uint8 or int8) by layer name, for A8
    layers whose source graph has none (see :mod:`quantizers.lowering.calibrate`).
    """
    import numpy as np

    ed = GraphEditor(model)
    out: dict[str, dict[str, Any]] = {}
    graph_outputs = {o.name for o in model.graph.output}
    for lq in layers:
        node = lq.node
        scope = scope_of(node)
        name = lq.name
        info: dict[str, Any] = {"node": node.name, "op": node.op_type, "w_bits": lq.w_bits,
                                "a_bits": 8 if lq.quantizes_inputs else 16}
        out[name] = info
        if lq.quantizes_inputs and lq.quantizes_weights:
            x_q = lq.x_q
            assert x_q is not None
            if x_q.qtype not in ("int8", "uint8"):
                raise LoweringError(f"layer '{name}': {x_q.qtype} activations; ort-cpu runs 8-bit activations")
            if lq.x_clip is not None and lq.x_clip != (-128, 127) and lq.x_clip != (0, 255):
                raise LoweringError(f"layer '{name}': its input is clipped to {list(lq.x_clip)} between QuantizeLinear "
                                    "and DequantizeLinear (a sub-8-bit activation grid); ort-cpu runs 8-bit "
                                    "activations")
            y_q = lq.y_q if lq.y_q is not None else (output_ranges or {}).get(name)
            if y_q is None:
                raise LoweringError(f"layer '{name}': an A8 layer needs a calibrated quantizer on its output for "
                                    "ort-cpu, and neither the backend nor the lowering calibrated one (pass "
                                    "calibration images to the lowering)")
            if node.output[0] in graph_outputs:
                info.update(form="fake-quant", reason="its output is a graph output; no output quantizer possible")
                continue
            xu = x_q.to_uint8()
            w_int8, w_q = _int8_weight(lq)
            yu = y_q.to_uint8()
            # input: one Q -> DQ per (tensor, scale, zero point), shared by the layers reading it
            key = ("in", lq.x, np.asarray(xu.scale, dtype=np.float32).reshape(()).tobytes(),
                   np.asarray(xu.zero_point, dtype=np.uint8).reshape(()).tobytes())
            x_dq = ed.shared(key, lambda lq=lq, xu=xu, node=node, scope=scope, name=name: add_qdq(
                ed, lq.x, xu, prefix=f"{name}.input", scope=f"{scope}/input_quant", before=node)[1])
            w_dq = add_weight_dq(ed, name, w_int8, w_q, scope=scope, before=node)
            node.input[0] = x_dq
            node.input[1] = w_dq
            kept = None
            if lq.bias is not None:
                b_int, b_scale, kept = int32_bias(lq, xu, w_q, int(w_int8.shape[0]))
                node.input[2] = add_bias_dq(ed, name, b_int, b_scale, scope=scope, before=node)
            # output: one Q (the Conv's only consumer) -> DQ, read by everything that read the output
            readers = [d.output[0] for d in lq.y_dq_nodes] if lq.y_q is not None else [node.output[0]]
            y_key = ("in", node.output[0], np.asarray(yu.scale, dtype=np.float32).reshape(()).tobytes(),
                     np.asarray(yu.zero_point, dtype=np.uint8).reshape(()).tobytes())
            y_pair: list[str] = []

            def build_output(node: Any = node, yu: QParams = yu, name: str = name, scope: str = scope,
                             y_pair: list[str] = y_pair) -> str:
                y_pair.extend(add_qdq(ed, node.output[0], yu, prefix=f"{name}.output",
                                      scope=f"{scope}/output_quant", after=node))
                return y_pair[1]

            # a layer reading this output with the same grid (ModelOpt ONNX quantizes the input of the next
            # layer, which is this layer's output) shares the pair: one Q is the Conv's only consumer
            y_dq = ed.shared(y_key, build_output)
            y_qn = y_pair[0] if y_pair else ed.producer_of(y_dq)
            ed.rewire(readers, y_dq, skip=[y_qn])
            info.update(form="qdq-int8", input=xu.to_dict(), output=yu.to_dict(), weight=w_q.to_dict(),
                        output_quant="backend" if lq.y_q is not None else "lowering",
                        bias="int32" + (" (backend's integers)" if kept else " (rounded from float)" if kept is not None
                                        else ""))
            if lq.w_bits == 4:
                info["note"] = "4-bit values in an int8 container"
        elif lq.quantizes_weights:
            w = dequantize(lq.weight_int, lq.w_q) if lq.w_q is not None else lq.weight_float
            node.input[1] = ed.initializer(f"{name}.weight", np.asarray(w, dtype=np.float32), exact=True)
            if lq.bias_int is not None and lq.bias is not None:
                node.input[2] = ed.initializer(f"{name}.bias", np.asarray(lq.bias, dtype=np.float32), exact=True)
            info.update(form="float-grid", weight=lq.w_q.to_dict() if lq.w_q is not None else None)
        elif lq.quantizes_inputs:
            info.update(form="fake-quant", reason="float weights (W16A8): no integer kernel takes a float weight")
        else:
            info.update(form="float")
    ed.finish()
    return out



def int8_silu(model: onnx.ModelProto) -> dict[str, Any]:
    """Run the SiLU after an A8 convolution on integers: ``QLinearSigmoid`` + ``QLinearMul``.

    ONNX Runtime's CPU QDQ transformers (``qdq_selector_action_transformer.cc``) turn
    ``DQ -> Sigmoid -> Q`` into ``com.microsoft.QLinearSigmoid`` (a 256-entry lookup table
    on 8-bit inputs) and ``DQ, DQ -> Mul -> Q`` into ``com.microsoft.QLinearMul``; there is no
    fused SiLU rule. A lowered ``DQ -> Conv -> Q`` unit's output is read back as
    ``Q -> DQ -> {Sigmoid, Mul}``: on its own the SiLU runs in float between a dequantization
    and the next layer's quantization. This pass completes both patterns where the ``Mul``'s
    output goes only to ``QuantizeLinear`` nodes of one grid (the next A8 layers' input
    quantizer, which then is the ``Mul``'s output quantizer: no new range to calibrate):

    - the ``Sigmoid`` reads its own copy of the convolution's ``DequantizeLinear`` (a QDQ
      node unit owns its DQ nodes);
    - its output gets ``Q -> DQ`` on uint8 over ``[0, sigmoid(hi)]``, where ``hi`` is the top
      of the convolution's output grid (Sigmoid is monotonic: nothing is clipped; the grid
      holds 0 so that its zero point is a uint8);
    - other readers of the ``Mul`` output that do not compute on it (``Shape``) read the
      quantizer's uint8 output instead (a ``DequantizeLinear`` there would run on every call
      just to give a shape).

    A SiLU whose output feeds float ops (``Add``, ``Concat``, ``Split``...) is left in float here;
    :func:`quantizers.lowering.ort_cpu_ops.int8_ops` quantizes those ops' tensors and applies
    this pass again. Returns ``{"silu_int8": n, "silu_float": m}``.
    """
    import numpy as np
    from onnx import helper

    g = model.graph
    index = GraphIndex(model)
    ed = GraphEditor(model)
    done = skipped = 0
    for sig in [n for n in g.node if n.op_type == "Sigmoid"]:
        x = sig.input[0]
        dq = index.producer.get(x)
        users = index.consumers.get(x, [])
        muls = [u for u in users if u.op_type == "Mul" and sig.output[0] in u.input and x in u.input]
        if (dq is None or dq.op_type != "DequantizeLinear" or len(muls) != 1 or len(users) != 2
                or len(index.consumers.get(sig.output[0], [])) != 1):
            continue
        mul = muls[0]
        q_src = index.producer.get(dq.input[0])
        m_users = index.consumers.get(mul.output[0], [])
        qs = [u for u in m_users if u.op_type == "QuantizeLinear" and u.input[0] == mul.output[0]]
        others = [u for u in m_users if u.op_type != "QuantizeLinear"]
        y_p = _node_qparams(index, dq)
        if (q_src is None or q_src.op_type != "QuantizeLinear" or y_p is None or y_p.qtype != "uint8" or not qs
                or any(u.op_type != "Shape" for u in others) or mul.output[0] in index.graph_outputs
                or len({_key(_node_qparams(index, q)) for q in qs}) != 1
                or getattr(_node_qparams(index, qs[0]), "qtype", None) != "uint8"):
            skipped += 1
            continue
        scope = scope_of(sig)
        s, z = float(np.asarray(y_p.scale).reshape(())), int(np.asarray(y_p.zero_point).reshape(()))
        hi = (255 - z) * s
        sig_q = _range_uint8(0.0, float(1.0 / (1.0 + np.exp(-hi))))
        # the Sigmoid's own DequantizeLinear (the node unit of QLinearSigmoid)
        dq2 = ed.node("DequantizeLinear", list(dq.input), f"{x}.for_sigmoid", f"{scope}/sigmoid_input/DequantizeLinear",
                      before=sig, **{a.name: helper.get_attribute_value(a) for a in dq.attribute})
        sig.input[0] = dq2
        _, s_dq = add_qdq(ed, sig.output[0], sig_q, prefix=f"{scope.strip('/').replace('/', '.')}.sigmoid_output",
                          scope=f"{scope}/sigmoid_quant", after=sig)
        for k, v in enumerate(mul.input):
            if v == sig.output[0]:
                mul.input[k] = s_dq
        for u in others:  # a Shape reads the quantized tensor (no dequantization just for its shape)
            for k, v in enumerate(u.input):
                if v == mul.output[0]:
                    u.input[k] = qs[0].output[0]
        done += 1
    ed.finish()
    return {"silu_int8": done, "silu_float": skipped}


def activations_to_uint8(model: onnx.ModelProto) -> int:
    """Put every per-tensor int8 activation ``QuantizeLinear -> DequantizeLinear`` pair on uint8
    (zero point + 128: the same grid, exactly), as ONNX Runtime's x86 kernels take activations.

    The lowering's own units are uint8 already; this reaches the activation quantizers a backend
    wrote between layers (ModelOpt's ONNX PTQ quantizes ``Add``, ``Split``... outputs in int8),
    so that a unit mixing them with uint8 ones is not left float for a type mismatch. Returns
    how many pairs changed.
    """
    import numpy as np

    index = GraphIndex(model)
    ed = GraphEditor(model)
    changed = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        if index.is_const(q.input[0]) or len(q.input) < 3 or not q.input[2] or q.output[0] in index.graph_outputs:
            continue
        p = _node_qparams(index, q)
        dqs = index.consumers.get(q.output[0], [])
        if (p is None or p.qtype != "int8" or not dqs
                or any(d.op_type != "DequantizeLinear" or _key(_node_qparams(index, d)) != _key(p) for d in dqs)):
            continue
        zp = ed.initializer(f"{q.output[0]}.zero_point_uint8", np.asarray(int(p.zero_point) + 128, dtype=np.uint8))
        for n in (q, *dqs):
            n.input[2] = zp
        changed += 1
    ed.finish()
    return changed


def _node_qparams(index: GraphIndex, node: Any) -> QParams | None:
    import numpy as np

    scale = index.const(node.input[1])
    zp = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or np.asarray(scale).size != 1:
        return None
    zp = np.zeros((), dtype=np.uint8) if zp is None else np.asarray(zp)
    return QParams(np.asarray(scale, dtype=np.float32), zp, str(zp.dtype))


def _key(p: QParams | None) -> Any:
    import numpy as np

    if p is None:
        return None
    return (p.qtype, np.asarray(p.scale, dtype=np.float32).tobytes(), np.asarray(p.zero_point).tobytes())


def _range_uint8(lo: float, hi: float) -> QParams:
    """uint8 over ``[lo, hi]`` (widened to hold 0, as ONNX Runtime's own calibration does)."""
    import numpy as np

    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return QParams(np.asarray(scale, dtype=np.float32), np.asarray(zp, dtype=np.uint8), "uint8")
