"""``ort-cpu``: the activation path kept on uint8 through the ops between A8 layers.

After :func:`quantizers.lowering.ort_cpu.lower` and :func:`~quantizers.lowering.ort_cpu.int8_silu`
the tensors *between* layers that do not go straight into the next convolution (the C2f /
C3k2 ``Split``/``Slice`` and ``Concat``, the bottleneck shortcut ``Add``, SPPF's
``MaxPool``, the neck's ``Resize`` and ``Concat``) still run in float, each costing a
``DequantizeLinear``, the float op and a ``QuantizeLinear``. ONNX Runtime's CPU QDQ
transformers (``onnxruntime/core/optimizer/qdq_transformer/selectors_actions/
qdq_selector_action_transformer.cc``, ONNX Runtime 1.32) have integer forms for these:

- ``DQ... -> Concat -> Q``: ``com.microsoft.QLinearConcat`` (inputs on any grids);
- ``DQ, DQ -> Add -> Q``: ``com.microsoft.QLinearAdd``;
- ``DQ -> {Slice, Reshape, Transpose, Resize, MaxPool (opset 12-21)} -> Q`` with the *same*
  scale and zero point on both sides: the DQ and Q are dropped and the op runs on uint8;
  ``Split`` likewise (every output on the input's grid);
- the SiLU in front of them then runs as ``QLinearSigmoid`` + ``QLinearMul``
  (:func:`~quantizers.lowering.ort_cpu.int8_silu`, applied again).

Every such unit needs: each input from its own ``DequantizeLinear``, each output read by
exactly one ``QuantizeLinear`` (other readers read that quantizer's ``DequantizeLinear``; a
``Shape`` reads the uint8 tensor itself), uint8 per-tensor grids.
:func:`int8_ops` finds the largest set of these ops whose inputs
come from quantized tensors (8-bit layer outputs) or from ops of the set, and whose outputs
go only to ops of the set, to A8 layers' input quantizers or to ``Shape`` (a greatest fixed
point: an op next to a float op, a graph output or a weight-only layer stays float), then
gives every tensor they produce a grid:

- tensors joined by data-movement ops share one grid (what the dropped Q/DQ needs); the
  group's grid is one its readers already quantize it to: the input quantizer of the A8
  layers reading it (what the backend modelled, kept exact: the layer sees what it saw
  before), else the output grid of the ``Concat`` reading it (quantizing a Concat's inputs
  on its output grid is exactly quantizing its output: no new error); several such grids:
  the one whose range holds the others' (else their union). A ``Concat`` whose inputs are
  on other grids re-quantizes them (``QLinearConcat`` takes any input grids). Measured on
  the demo (uniform W8A8, issue 12): taking the Concat's grid before the layers' re-quantizes
  13 layer inputs (``DQ -> Q``, two roundings), is slower and costs 0.15 mAP points more;
- a group no quantizer reads (a SiLU or an Add read only by an Add): uint8 over the
  smallest..largest value seen on the calibration images
  (:func:`quantizers.lowering.calibrate.tensor_ranges`, cached); without images such ops
  stay float;
- an A8 layer's input quantizer on another grid than its input's group re-quantizes it
  (``DQ -> Q``).

Measured on the demo (uniform W8A8, 1 intra-op thread, interleaved with float): x0.67-0.69 of
float's latency instead of x0.75-0.76, ONNX Runtime's kernel time 5.7 ms instead of 6.2 (float
7.4); mAP50-95 0.17 points lower than without this pass (0.25 over 200 images; the widest grid
first, or only for groups an ``Add`` reads, lost more).

Float -> float ``Cast`` nodes (ModelOpt's exported quantizers) are removed first
(:func:`drop_identity_casts`; ONNX Runtime removes them anyway). Nothing here is specific to
a model: the ops are found by their types and connections (checked on the demo, and on
random-init ``yolov8n.yaml`` / ``yolo11n.yaml`` with Brevitas and ModelOpt: every Concat, Add,
Slice/Split, MaxPool and Resize between A8 layers becomes integer, every A8 layer stays int8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import GraphEditor, GraphIndex, QParams
from quantizers.lowering.ort_cpu import _key, _node_qparams, _range_uint8, int8_silu, scope_of

if TYPE_CHECKING:
    import onnx

#: ops ONNX Runtime runs on uint8 when input and output share one grid (DQ and Q dropped)
DATA_MOVEMENT_OPS = ("Slice", "Split", "MaxPool", "Resize", "Reshape", "Transpose")
#: ops with a QLinear kernel that takes inputs on any grids
COMBINE_OPS = ("Concat", "Add")
#: MaxPool's DQ/Q are dropped for its opset-12 version only (``{"MaxPool", {12}}``)
MAXPOOL_LAST_OPSET = 21

Ranges = Callable[[Sequence[str]], dict[str, QParams]]


@dataclass
class _Plan:
    """The ops to run on uint8 (graph order) and the grid of every tensor they touch."""

    nodes: list[Any]
    silu: dict[int, Any]                                   # id(Mul) -> its Sigmoid
    root: dict[str, str] = field(default_factory=dict)     # tensor -> the first tensor of its grid group
    grid: dict[str, QParams] = field(default_factory=dict)  # group root -> grid


def _act_grid(index: GraphIndex, node: Any) -> QParams | None:
    """The per-tensor uint8 grid of an activation ``QuantizeLinear`` / ``DequantizeLinear`` (not a weight's)."""
    if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or index.is_const(node.input[0]):
        return None
    p = _node_qparams(index, node)
    return p if p is not None and p.qtype == "uint8" else None


def _silu_of(index: GraphIndex, mul: Any) -> Any:
    """The Sigmoid of a float SiLU ``x * sigmoid(x)`` ending in ``mul`` (x read by those two only), else None."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for k in (0, 1):
        sig = index.producer.get(mul.input[k])
        x = mul.input[1 - k]
        if (sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x
                and len(index.consumers.get(sig.output[0], [])) == 1 and sig.output[0] not in index.graph_outputs
                and {id(u) for u in index.consumers.get(x, [])} == {id(sig), id(mul)}):
            return sig
    return None


def data_inputs(node: Any, silu: bool = False) -> list[str]:
    """The activation inputs of a candidate op (a data-movement op's first input only; a SiLU's ``x``)."""
    if silu:
        return [next(i for i in node.input if i)]  # both read x and sigmoid(x); x is what matters
    return list(node.input) if node.op_type in COMBINE_OPS else [node.input[0]]


def _candidates(model: onnx.ModelProto, index: GraphIndex) -> tuple[list[Any], dict[int, Any]]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes, silu = [], {}
    for n in model.graph.node:
        if n.op_type == "Mul" and (sig := _silu_of(index, n)) is not None:
            silu[id(n)] = sig
            nodes.append(n)
        elif n.op_type in COMBINE_OPS + DATA_MOVEMENT_OPS:
            if n.op_type == "Add" and len(n.input) != 2:
                continue
            if n.op_type == "MaxPool" and (opset > MAXPOOL_LAST_OPSET or len(n.output) != 1):
                continue
            if any(not t or index.is_const(t) for t in data_inputs(n)):
                continue
            nodes.append(n)
    return nodes, silu


def _accepted(index: GraphIndex, nodes: list[Any], silu: dict[int, Any]) -> list[Any]:
    """The greatest set of ``nodes`` whose inputs are quantized tensors or outputs of the set and
    whose outputs go only to the set, to uint8 activation quantizers or to ``Shape``."""
    ok = {id(n) for n in nodes}

    def inputs_ready(n: Any) -> bool:
        if id(n) in silu:
            x = silu[id(n)].input[0]
            return _act_grid(index, index.producer.get(x)) is not None
        for t in data_inputs(n):
            p = index.producer.get(t)
            if not (id(p) in ok if p is not None and p.op_type != "DequantizeLinear" else _act_grid(index, p)):
                return False
        return True

    def outputs_ok(n: Any) -> bool:
        for o in n.output:
            if o in index.graph_outputs:
                return False
            for u in index.consumers.get(o, []):
                if not (id(u) in ok or u.op_type == "Shape"
                        or (u.op_type == "QuantizeLinear" and u.input[0] == o and _act_grid(index, u))):
                    return False
        return True

    changed = True
    while changed:
        changed = False
        for n in nodes:
            if id(n) in ok and not (inputs_ready(n) and outputs_ok(n)):
                ok.discard(id(n))
                changed = True
    return [n for n in nodes if id(n) in ok]


def _groups(index: GraphIndex, plan: _Plan) -> dict[str, list[str]]:
    """Join the tensors a data-movement op links (one grid); return root -> members."""
    for n in plan.nodes:
        if n.op_type in DATA_MOVEMENT_OPS:
            src = n.input[0]
            root = plan.root.setdefault(src, src)
            for o in n.output:
                plan.root[o] = root
        else:
            for t in ([] if id(n) in plan.silu else data_inputs(n)):
                plan.root.setdefault(t, t)
            plan.root[n.output[0]] = n.output[0]
    members: dict[str, list[str]] = {}
    for t, r in plan.root.items():
        members.setdefault(r, []).append(t)
    return members


def _desired(index: GraphIndex, plan: _Plan, members: list[str], accepted: set[int]) -> list[QParams]:
    """The grids the readers of a group already quantize it to: the A8 layers' input quantizers
    (what the backend modelled: kept exact), else the outputs of the Concats of the set reading it."""
    layers, concats = [], []
    for t in members:
        for u in index.consumers.get(t, []):
            if u.op_type == "QuantizeLinear" and (g := _act_grid(index, u)) is not None:
                layers.append(g)
            elif u.op_type == "Concat" and id(u) in accepted and plan.root.get(u.output[0]) in plan.grid:
                concats.append(plan.grid[plan.root[u.output[0]]])
    return layers or concats


def _widest(grids: list[QParams]) -> QParams:
    """The grid whose range holds every other one's, else the union of their ranges."""
    import numpy as np

    def span(p: QParams) -> tuple[float, float]:
        s, z = float(np.asarray(p.scale).reshape(())), int(np.asarray(p.zero_point).reshape(()))
        return -z * s, (255 - z) * s

    lo, hi = min(span(p)[0] for p in grids), max(span(p)[1] for p in grids)
    for p in sorted(grids, key=lambda p: float(np.asarray(p.scale).reshape(()))):
        a, b = span(p)
        if a <= lo + 1e-12 and b >= hi - 1e-12:
            return p
    return _range_uint8(lo, hi)


def _needs_range(index: GraphIndex, root: str, members: list[str], accepted: set[int]) -> bool:
    """A group whose grid no quantizer of the graph gives (its first tensor is computed, nothing reads it
    through a quantizer or a Concat of the set)."""
    p = index.producer.get(root)
    if p is None or p.op_type == "DequantizeLinear":
        return False
    return not any((u.op_type == "QuantizeLinear" and _act_grid(index, u) is not None)
                   or (u.op_type == "Concat" and id(u) in accepted)
                   for t in members for u in index.consumers.get(t, []))


def _resolve(model: onnx.ModelProto, index: GraphIndex, plan: _Plan, members: dict[str, list[str]],
             calibrated: dict[str, QParams]) -> None:
    """Every group's grid, the readers' first (a Concat's output before its inputs: reverse graph order)."""
    pos = {id(n): k for k, n in enumerate(model.graph.node)}
    accepted = {id(n) for n in plan.nodes}
    order = sorted(members, key=lambda r: -pos.get(id(index.producer.get(r)), -1))
    for r in order:
        p = index.producer.get(r)
        if p is not None and p.op_type == "DequantizeLinear":
            plan.grid[r] = _act_grid(index, p)  # type: ignore[assignment]
            continue
        want = _desired(index, plan, members[r], accepted)
        plan.grid[r] = _widest(want) if want else calibrated[r]


def _qparam_inits(ed: GraphEditor, prefix: str, g: QParams) -> tuple[str, str]:
    import numpy as np

    s = ed.initializer(f"{prefix}_scale", np.asarray(g.scale, dtype=np.float32).reshape(()))
    z = ed.initializer(f"{prefix}_zero_point", np.asarray(g.zero_point).astype(np.uint8).reshape(()))
    return s, z


def _rewrite(model: onnx.ModelProto, index: GraphIndex, plan: _Plan) -> int:
    """Quantize every tensor the set produces on its group's grid (one Q, a DQ per reader), give
    every op of the set its own DQ of a quantized input. Returns how many A8 input quantizers
    re-quantize (read a group on another grid)."""
    from onnx import helper

    ed = GraphEditor(model)
    accepted = {id(n) for n in plan.nodes if id(n) not in plan.silu}
    requant = 0
    for t, r in plan.root.items():
        g, p, users = plan.grid[r], index.producer.get(t), list(index.consumers.get(t, []))
        if p is not None and p.op_type == "DequantizeLinear":  # a QDQ node unit owns its DQ nodes
            attrs = {a.name: helper.get_attribute_value(a) for a in p.attribute}
            for u in (u for u in users if id(u) in accepted):
                for k in _slots(u, t):
                    u.input[k] = ed.node("DequantizeLinear", list(p.input), f"{t}.for_int8_op",
                                         f"{scope_of(u)}/int8_input/DequantizeLinear", before=u, **attrs)
            continue
        prefix, scope = t.strip("/").replace("/", "."), scope_of(p)
        same = [u for u in users if u.op_type == "QuantizeLinear" and u.input[0] == t
                and _key(_act_grid(index, u)) == _key(g)]
        if same:  # an A8 layer's input quantizer on this grid is the tensor's quantizer
            q_out, s, z = same[0].output[0], same[0].input[1], same[0].input[2]
            ed.rewire([u.output[0] for u in same[1:]], q_out)
        else:
            s, z = _qparam_inits(ed, prefix, g)
            q_out = ed.node("QuantizeLinear", [t, s, z], f"{prefix}_quantized", f"{scope}/int8_out/QuantizeLinear",
                            after=p)
        for u in users:
            if any(u is v for v in same):
                continue
            shape = u.op_type == "Shape"  # reads the uint8 tensor: no dequantization just for a shape
            requant += u.op_type == "QuantizeLinear"
            for k in _slots(u, t):
                u.input[k] = q_out if shape else ed.node(
                    "DequantizeLinear", [q_out, s, z], f"{prefix}_dequantized",
                    f"{scope_of(u)}/int8_input/DequantizeLinear", before=u)
    ed.finish()
    return requant


def _slots(node: Any, tensor: str) -> list[int]:
    """The input positions of ``node`` that read ``tensor``."""
    return [k for k, v in enumerate(node.input) if v == tensor]


def drop_identity_casts(model: onnx.ModelProto) -> int:
    """Remove the ``Cast`` nodes whose input already has the target type (ModelOpt's exported
    quantizers hold float -> float Casts, which ONNX Runtime's ``CastElimination`` removes
    anyway; here they would hide a tensor's readers). Returns how many were removed."""
    import onnx as _onnx

    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    if not casts:
        return 0
    try:
        inferred = _onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no types known: keep every Cast
        return 0
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    outputs = {o.name for o in model.graph.output}
    alias: dict[str, str] = {}
    for n in casts:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        src = alias.get(n.input[0], n.input[0])
        if to is not None and types.get(n.input[0]) == to and n.output[0] not in outputs:
            alias[n.output[0]] = src
    if not alias:
        return 0
    for node in model.graph.node:
        for k, v in enumerate(node.input):
            while v in alias:
                v = alias[v]
            node.input[k] = v
    keep = [n for n in model.graph.node if not (n.op_type == "Cast" and n.output[0] in alias)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return len(alias)


def int8_ops(model: onnx.ModelProto, ranges: Ranges | None = None) -> dict[str, Any]:
    """Run the ops between A8 layers on uint8 (see the module's docstring); rewrites ``model`` in place.

    ``ranges``: calibrates uint8 grids for tensors of ``model`` (as it is when called), for the
    groups no quantizer of the graph gives a grid; ``None``: those ops stay float.
    Returns ``{"int8_ops": {op type: n}, "int8_ops_calibrated": n, "int8_ops_requantized": n,
    "silu_int8": n, "silu_float": m}`` (the SiLUs made integer by this pass, those left float).
    """
    drop_identity_casts(model)
    index = GraphIndex(model)
    nodes, silu = _candidates(model, index)
    while True:
        plan = _Plan(_accepted(index, nodes, silu), {})
        plan.silu = {id(n): silu[id(n)] for n in plan.nodes if id(n) in silu}
        members = _groups(index, plan)
        ids = {id(n) for n in plan.nodes}
        need = [r for r, m in members.items() if _needs_range(index, r, m, ids)]
        if not need or ranges is not None:
            break
        drop = {id(index.producer[r]) for r in need}
        nodes = [n for n in nodes if id(n) not in drop]
    calibrated = ranges(need) if need and ranges is not None else {}
    _resolve(model, index, plan, members, calibrated)
    kinds: dict[str, int] = {}
    for n in plan.nodes:
        kind = "SiLU" if id(n) in plan.silu else n.op_type
        kinds[kind] = kinds.get(kind, 0) + 1
    requant = _rewrite(model, index, plan) if plan.nodes else 0
    silu_counts = int8_silu(model)
    return {"int8_ops": dict(sorted(kinds.items())), "int8_ops_calibrated": len(need),
            "int8_ops_requantized": requant, **silu_counts}
