"""Graph helpers shared by every lowering target: read each layer's quantization out of a
Q/DQ (or QCDQ) graph, write quantization nodes and initializers, clean up.

:func:`read_layers` turns a backend's export into one :class:`LayerQuant` per compute node
(``Conv`` / ``Gemm`` / ``MatMul`` with a weight), backend-agnostic: it follows graph edges,
whatever the exporter named the nodes:

- **input**: ``QuantizeLinear -> (Clip) -> DequantizeLinear`` feeding the data input
  (Brevitas, ModelOpt torch and ONNX all write this), with its scale, zero point and
  integer type;
- **weight**: an integer constant (optionally through ``Clip``, which Brevitas writes for
  sub-8-bit grids; the clip is applied to the integers here) or a float constant through
  ``QuantizeLinear`` (computed exactly as ONNX's QuantizeLinear does), then
  ``DequantizeLinear`` (per-channel on ``axis``); or a float constant (not quantized);
- **bias**: a float constant, or an int32 constant behind ``DequantizeLinear``;
- **output**: a ``QuantizeLinear`` that is the node's only consumer (a backend that models
  an output quantizer), with the ``DequantizeLinear`` nodes after it.

Targets then rewrite each layer with :class:`GraphEditor`, which adds initializers and
nodes with fresh names, rewires consumers, removes what became dead and sorts the graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import onnx

COMPUTE_OPS = ("Conv", "Gemm", "MatMul")


class LoweringError(UserError):
    """A graph the lowering cannot convert; the message names the file, layer and node."""


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor: ``real = (q - zero_point) * scale``.

    ``scale`` and ``zero_point`` are numpy arrays (0-d for per-tensor, 1-d for per-channel
    along ``axis``); ``qtype`` is the integer type's numpy name (``int8``, ``uint8``,
    ``int32``, ``int4``...).
    """

    scale: Any
    zero_point: Any
    qtype: str
    axis: int | None = None

    @property
    def per_tensor(self) -> bool:
        return int(self.scale.size) == 1

    @property
    def symmetric(self) -> bool:
        import numpy as np

        return bool(np.all(np.asarray(self.zero_point, dtype=np.int64) == 0))

    @property
    def bits(self) -> int:
        return 4 if "int4" in self.qtype else 8 if "int8" in self.qtype else 16 if "int16" in self.qtype else 32

    def to_uint8(self) -> QParams:
        """The same grid as uint8: int8 ``q`` with zero point ``z`` is uint8 ``q + 128`` with
        zero point ``z + 128`` (exact: same scale, same real values, same saturation)."""
        import numpy as np

        if self.qtype == "uint8":
            return self
        if self.qtype != "int8":
            raise ValueError(f"cannot express a {self.qtype} grid as uint8")
        zp = (np.asarray(self.zero_point, dtype=np.int32) + 128).astype(np.uint8)
        return QParams(self.scale, zp, "uint8", self.axis)

    def to_dict(self) -> dict[str, Any]:
        import numpy as np

        s = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        z = np.asarray(self.zero_point, dtype=np.int64).reshape(-1)
        d: dict[str, Any] = {"qtype": self.qtype, "axis": self.axis}
        if s.size == 1:
            d.update(scale=float(s[0]), zero_point=int(z[0]))
        else:
            d.update(channels=int(s.size), scale_min=float(s.min()), scale_max=float(s.max()),
                     zero_points=sorted({int(v) for v in z}))
        return d


@dataclass
class LayerQuant:
    """What the source graph holds for one compute node (see the module docstring)."""

    node: Any                       # the Conv/Gemm/MatMul NodeProto (in the source graph)
    layer: str | None               # our layer name, when known
    x: str                          # the float tensor the layer reads (before any input quantizer)
    x_q: QParams | None = None      # input quantizer
    x_clip: tuple[int, int] | None = None
    weight_int: Any = None          # integer weight values (np.int32), clip already applied
    w_q: QParams | None = None      # weight quantization (per-channel axis, scale, zero point, container)
    w_clip: tuple[int, int] | None = None
    weight_float: Any = None        # float weight when the weight is not quantized
    bias: Any = None                # float bias (dequantized if the source stored int32)
    bias_int: Any = None            # int32 bias as the source stored it
    bias_q: QParams | None = None
    y_q: QParams | None = None      # output quantizer (the node's only consumer is a QuantizeLinear)
    y_q_node: Any = None
    y_dq_nodes: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.layer or self.node.name

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_int is not None

    @property
    def quantizes_inputs(self) -> bool:
        return self.x_q is not None

    @property
    def w_bits(self) -> int:
        """The bit width of the weight grid: from the Clip bounds or the values' range for
        8-bit containers, from the container type otherwise; 16 for float weights."""
        import numpy as np

        if self.weight_int is None or self.w_q is None:
            return 16
        if self.w_q.bits == 4:
            return 4
        lo, hi = (self.w_clip if self.w_clip else (int(np.min(self.weight_int)), int(np.max(self.weight_int))))
        zp = np.asarray(self.w_q.zero_point, dtype=np.int64)
        span = max(abs(int(lo) - int(zp.min())), abs(int(hi) - int(zp.max())))
        return 4 if span <= 8 and self.w_q.bits == 8 else self.w_q.bits

    def dequantized_weight(self) -> Any:
        """The float weight the source graph computes (``(q - zp) * scale`` in float32, as
        ``DequantizeLinear`` does), or the float weight itself."""
        if self.weight_int is None:
            return self.weight_float
        assert self.w_q is not None
        return dequantize(self.weight_int, self.w_q)


def dequantize(q: Any, p: QParams) -> Any:
    """``(q - zero_point) * scale`` in float32, broadcast along ``p.axis`` (DequantizeLinear)."""
    import numpy as np

    q = np.asarray(q)
    scale = np.asarray(p.scale, dtype=np.float32)
    zp = np.asarray(p.zero_point).astype(np.float32)
    if scale.size > 1:
        axis = p.axis if p.axis is not None else 1
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    return ((q.astype(np.float32) - zp) * scale).astype(np.float32)


def quantize_like_onnx(x: Any, p: QParams) -> Any:
    """``saturate(round_half_even(x / scale) + zero_point)`` as ONNX QuantizeLinear, as int32."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(p.scale, dtype=np.float32)
    zp = np.asarray(p.zero_point).astype(np.int32)
    if scale.size > 1:
        axis = p.axis if p.axis is not None else 1
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    lo, hi = int_range(p.qtype)
    return np.clip(np.rint(x / scale).astype(np.int64) + zp, lo, hi).astype(np.int32)


def int_range(qtype: str) -> tuple[int, int]:
    """The value range of an integer type name."""
    table = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15), "int16": (-32768, 32767),
             "uint16": (0, 65535), "int32": (-(2 ** 31), 2 ** 31 - 1)}
    if qtype not in table:
        raise ValueError(f"not an integer quantization type: {qtype}")
    return table[qtype]


# --------------------------------------------------------------------------------------
# Reading a graph
# --------------------------------------------------------------------------------------
def load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        try:
            return onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - protobuf raises several types
            raise LoweringError(f"{model}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from None
    return model


class GraphIndex:
    """Producer / consumer / constant lookups over one graph (rebuilt after edits)."""

    def __init__(self, model: onnx.ModelProto):
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.initializers = {i.name: i for i in g.initializer}
        self.graph_outputs = {o.name for o in g.output}
        self._consts: dict[str, Any] = {}
        self._numpy_helper = numpy_helper

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a ``Constant`` node's output (through Identity), or ``None``."""
        if not name:
            return None
        if name in self._consts:
            return self._consts[name]
        value = None
        if name in self.initializers:
            value = self._numpy_helper.to_array(self.initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        value = self._numpy_helper.to_array(attr.t)
            elif node is not None and node.op_type == "Identity":
                value = self.const(node.input[0])
        self._consts[name] = value
        return value

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def only_consumer(self, tensor: str) -> Any:
        """The single node reading ``tensor`` (and ``tensor`` is not a graph output), else ``None``."""
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.graph_outputs:
            return None
        return users[0]


def _qparams(index: GraphIndex, node: Any, tensor_type: str | None = None) -> QParams:
    """The scale / zero point / type of a QuantizeLinear or DequantizeLinear node."""
    import numpy as np

    scale = index.const(node.input[1])
    if scale is None:
        raise LoweringError(f"node '{node.name}' ({node.op_type}): its scale is not a constant")
    zp = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zp is None:
        qtype = tensor_type or "uint8"  # ONNX default when the zero point is absent
        zp = np.zeros(scale.shape, dtype=np.dtype(qtype) if "4" not in qtype else np.int8)
    else:
        qtype = str(zp.dtype)
    axis = None
    for attr in node.attribute:
        if attr.name == "axis":
            axis = int(attr.i)
    if scale.size > 1 and axis is None:
        axis = 1
    return QParams(np.asarray(scale, dtype=np.float32), np.asarray(zp), qtype, axis if scale.size > 1 else None)


def _clip_bounds(index: GraphIndex, clip: Any) -> tuple[int, int] | None:
    lo = index.const(clip.input[1]) if len(clip.input) > 1 and clip.input[1] else None
    hi = index.const(clip.input[2]) if len(clip.input) > 2 and clip.input[2] else None
    if lo is None or hi is None:
        return None
    return int(lo), int(hi)


def _read_input(index: GraphIndex, lq: LayerQuant) -> None:
    dq = index.producer.get(lq.node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear":
        return
    src = index.producer.get(dq.input[0])
    clip = None
    if src is not None and src.op_type == "Clip":
        clip = _clip_bounds(index, src)
        src = index.producer.get(src.input[0])
    if src is None or src.op_type != "QuantizeLinear":
        lq.notes.append(f"input DequantizeLinear '{dq.name}' is not fed by a QuantizeLinear; left as is")
        return
    q = _qparams(index, src)
    d = _qparams(index, dq)
    if not (q.scale.shape == d.scale.shape and (q.scale == d.scale).all() and q.qtype == d.qtype
            and (q.zero_point == d.zero_point).all()):
        raise LoweringError(f"layer '{lq.name}': its input QuantizeLinear '{src.name}' and DequantizeLinear "
                            f"'{dq.name}' use different scales or zero points")
    if not q.per_tensor:
        raise LoweringError(f"layer '{lq.name}': per-channel activation quantization ('{src.name}') is not "
                            "supported; activations are quantized per tensor")
    lq.x = src.input[0]
    lq.x_q = q
    lq.x_clip = clip


def _read_weight(index: GraphIndex, lq: LayerQuant) -> None:
    import numpy as np

    wname = lq.node.input[1]
    dq = index.producer.get(wname)
    if dq is None or dq.op_type != "DequantizeLinear":
        w = index.const(wname)
        if w is None:
            raise LoweringError(f"layer '{lq.name}': its weight '{wname}' is neither a constant nor a "
                                "DequantizeLinear of one")
        lq.weight_float = np.asarray(w, dtype=np.float32)
        return
    w_q = _qparams(index, dq)
    src_name = dq.input[0]
    src = index.producer.get(src_name)
    clip = None
    if src is not None and src.op_type == "Clip":
        clip = _clip_bounds(index, src)
        if clip is None:
            raise LoweringError(f"layer '{lq.name}': the Clip '{src.name}' on its weight has no constant bounds")
        src_name = src.input[0]
        src = index.producer.get(src_name)
    if src is not None and src.op_type == "QuantizeLinear":
        wf = index.const(src.input[0])
        if wf is None:
            raise LoweringError(f"layer '{lq.name}': its weight QuantizeLinear '{src.name}' does not read a "
                                "constant")
        q_q = _qparams(index, src)
        q = quantize_like_onnx(wf, q_q)
    else:
        arr = index.const(src_name)
        if arr is None:
            raise LoweringError(f"layer '{lq.name}': its weight DequantizeLinear '{dq.name}' does not read a "
                                "constant (through QuantizeLinear / Clip)")
        q = np.asarray(arr).astype(np.int32)
    if clip is not None:
        q = np.clip(q, clip[0], clip[1])
    lq.weight_int = q.astype(np.int32)
    lq.w_q = w_q
    lq.w_clip = clip


def _read_bias(index: GraphIndex, lq: LayerQuant) -> None:
    import numpy as np

    if len(lq.node.input) < 3 or not lq.node.input[2]:
        return
    bname = lq.node.input[2]
    dq = index.producer.get(bname)
    if dq is not None and dq.op_type == "DequantizeLinear":
        arr = index.const(dq.input[0])
        if arr is None:
            raise LoweringError(f"layer '{lq.name}': its bias DequantizeLinear '{dq.name}' does not read a constant")
        p = _qparams(index, dq)
        lq.bias_int = np.asarray(arr).astype(np.int64)
        lq.bias_q = p
        lq.bias = dequantize(arr, p)
        return
    b = index.const(bname)
    if b is None:
        raise LoweringError(f"layer '{lq.name}': its bias '{bname}' is not a constant")
    lq.bias = np.asarray(b, dtype=np.float32)


def _read_output(index: GraphIndex, lq: LayerQuant) -> None:
    out = lq.node.output[0]
    q = index.only_consumer(out)
    if q is None or q.op_type != "QuantizeLinear" or q.input[0] != out:
        return
    dqs = index.consumers.get(q.output[0], [])
    if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in index.graph_outputs:
        return
    qp = _qparams(index, q)
    if not qp.per_tensor:
        return
    for d in dqs:
        dp = _qparams(index, d)
        if not ((dp.scale == qp.scale).all() and (dp.zero_point == qp.zero_point).all()):
            raise LoweringError(f"layer '{lq.name}': its output QuantizeLinear '{q.name}' and DequantizeLinear "
                                f"'{d.name}' use different scales or zero points")
    lq.y_q = qp
    lq.y_q_node = q
    lq.y_dq_nodes = list(dqs)


def read_layers(model: onnx.ModelProto, names: Mapping[str, str] | None = None,
                asked: Mapping[str, str] | None = None) -> list[LayerQuant]:
    """One :class:`LayerQuant` per Conv/Gemm/MatMul whose second input is a (dequantized) constant.

    ``names`` maps node names to layer names (from :func:`layer_names`); nodes it does not
    name keep ``layer=None``. ``asked`` (layer -> ``W8A16``...) settles whose quantizer a
    ``Q -> DQ`` between two layers is: a layer asked for A16 whose input comes through
    ``Q -> DQ`` reads the *previous* layer's output quantizer (e.g. a Conv without
    activation feeding another Conv); it has no input quantizer of its own.
    """
    index = GraphIndex(model)
    out = []
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        producer = index.producer.get(w)
        if not (index.is_const(w) or (producer is not None and producer.op_type == "DequantizeLinear")):
            continue  # an activation x activation MatMul (attention): not a weighted layer
        lq = LayerQuant(node=node, layer=(names or {}).get(node.name), x=node.input[0])
        _read_input(index, lq)
        want = (asked or {}).get(lq.layer or "")
        if lq.x_q is not None and want is not None and not want.endswith("A8"):
            lq.notes.append("its input comes through the previous layer's output quantizer; it has none of its own")
            lq.x, lq.x_q, lq.x_clip = node.input[0], None, None
        _read_weight(index, lq)
        _read_bias(index, lq)
        _read_output(index, lq)
        out.append(lq)
    return out


def layer_names(model: onnx.ModelProto, layers: Iterable[Any] | None = None, source: str = "") -> dict[str, str]:
    """Node name -> layer name: through :func:`quantizers.onnx_names.map_layers_to_nodes` when
    the layer table is given, else from the exporter's scope names."""
    if layers is not None:
        from quantizers.onnx_names import map_layers_to_nodes

        nmap = map_layers_to_nodes(model, list(layers), source=source or "the graph to lower")
        return {m.node: m.layer for m in nmap.matches.values()}
    from mpq.onnx_nodes import module_name_from_node

    out = {}
    for node in model.graph.node:
        if node.op_type in COMPUTE_OPS and node.name:
            name = module_name_from_node(node.name)
            if name:
                out[node.name] = name
    return out


# --------------------------------------------------------------------------------------
# Editing a graph
# --------------------------------------------------------------------------------------
class GraphEditor:
    """Adds initializers and nodes with fresh names, rewires tensors, then cleans up."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self._names = ({i.name for i in g.initializer} | {o for n in g.node for o in n.output}
                       | {i.name for i in g.input} | {n.name for n in g.node})
        self._new_inits: dict[str, Any] = {}
        self._before: dict[int, list[Any]] = {}   # id(node) -> nodes to insert before it
        self._after: dict[int, list[Any]] = {}
        self._shared: dict[Any, str] = {}
        self._alias: dict[str, str] = {}
        self._alias_skip: dict[str, set[str]] = {}
        self._new_producer: dict[str, Any] = {}

    def fresh(self, name: str) -> str:
        """``name``, or ``name__N`` if taken."""
        base, k = name, 1
        while name in self._names or name in self._new_inits:
            name = f"{base}__{k}"
            k += 1
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Make ``name`` free for a new tensor: an existing initializer or node output of that
        name is renamed (everywhere it is read) to a fresh name. Graph inputs and outputs
        keep their names (then ``name__N`` is returned)."""
        g = self.model.graph
        if name in self._new_inits or name in {i.name for i in g.input} | {o.name for o in g.output}:
            return self.fresh(name)
        if name not in self._names:
            self._names.add(name)
            return name
        other = self.fresh(f"{name}__source")
        for init in g.initializer:
            if init.name == name:
                init.name = other
        for node in g.node:
            for k, v in enumerate(node.input):
                if v == name:
                    node.input[k] = other
            for k, v in enumerate(node.output):
                if v == name:
                    node.output[k] = other
        for vi in g.value_info:
            if vi.name == name:
                vi.name = other
        return name

    def initializer(self, name: str, value: Any, *, exact: bool = False) -> str:
        """A new initializer named ``name`` (``exact``: that very name, renaming whatever held
        it; else a fresh variant of it)."""
        from onnx import numpy_helper

        name = self.reserve(name) if exact else self.fresh(name)
        self._new_inits[name] = numpy_helper.from_array(value, name)
        return name

    def node(self, op_type: str, inputs: Sequence[str], output: str, name: str, *, before: Any = None,
             after: Any = None, **attrs: Any) -> str:
        """A new node with one output (fresh names), inserted before or after ``before``/``after``."""
        from onnx import helper

        out = self.fresh(output)
        node = helper.make_node(op_type, list(inputs), [out], name=self.fresh(name), **attrs)
        self._new_producer[out] = node
        if before is not None:
            self._before.setdefault(id(before), []).append(node)
        elif after is not None:
            self._after.setdefault(id(after), []).append(node)
        else:
            raise ValueError("say where the node goes (before= or after=)")
        return out

    def producer_of(self, tensor: str) -> str:
        """The first input of the new node producing ``tensor`` (for a DQ: its Q's output)."""
        return str(self._new_producer[tensor].input[0])

    def shared(self, key: Any, build: Any) -> str:
        """The tensor built once per ``key`` (e.g. one input quantizer shared by several layers)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def rewire(self, old: Sequence[str], new: str, *, skip: Iterable[str] = ()) -> None:
        """Every node reading one of ``old`` reads ``new`` instead (nodes added later too),
        except the nodes producing one of ``skip`` (e.g. the quantizer that reads ``old``)."""
        outputs = {o.name for o in self.model.graph.output}
        for name in old:
            if name in outputs:
                raise LoweringError(f"cannot rewire '{name}': it is a graph output")
            self._alias[name] = new
            self._alias_skip[name] = set(skip)

    def _resolve(self, name: str, node_outputs: set[str]) -> str:
        seen = set()
        while name in self._alias and name not in seen and not (self._alias_skip[name] & node_outputs):
            seen.add(name)
            name = self._alias[name]
        return name

    def finish(self) -> int:
        """Insert the new nodes, apply the rewiring, add the initializers, remove dead nodes
        and initializers, sort topologically. Returns the number of nodes removed."""
        g = self.model.graph
        ordered = []
        for node in g.node:
            ordered.extend(self._before.get(id(node), []))
            ordered.append(node)
            ordered.extend(self._after.get(id(node), []))
        if self._alias:
            for node in ordered:
                outs = set(node.output)
                for k, v in enumerate(node.input):
                    if v in self._alias:
                        node.input[k] = self._resolve(v, outs)
        del g.node[:]
        g.node.extend(ordered)
        removed = remove_dead(self.model, keep=set(self._new_inits))
        existing = {i.name for i in g.initializer}
        clash = sorted(set(self._new_inits) & existing)
        if clash:
            raise LoweringError(f"internal: new initializers clash with existing ones: {clash[:5]}")
        g.initializer.extend(self._new_inits.values())
        topological_sort(self.model)
        return removed


def remove_dead(model: onnx.ModelProto, keep: set[str] | None = None) -> int:
    """Remove nodes none of whose outputs are used, and unused initializers; return nodes removed."""
    g = model.graph
    outputs = {o.name for o in g.output}
    removed = 0
    while True:
        used = set(outputs)
        for node in g.node:
            used.update(i for i in node.input if i)
        dead = [n for n in g.node if n.output and not any(o in used for o in n.output)]
        if not dead:
            break
        dead_ids = {id(n) for n in dead}
        keep_nodes = [n for n in g.node if id(n) not in dead_ids]
        del g.node[:]
        g.node.extend(keep_nodes)
        removed += len(dead)
    used = {i for n in g.node for i in n.input} | outputs | (keep or set())
    unused = [i for i in g.initializer if i.name not in used]
    for init in unused:
        g.initializer.remove(init)
    return removed


def topological_sort(model: onnx.ModelProto) -> None:
    """Order the nodes so every input is produced before it is read (stable otherwise)."""
    g = model.graph
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    nodes = list(g.node)
    produced_by = {o: k for k, n in enumerate(nodes) for o in n.output}
    done: list[Any] = []
    placed: set[int] = set()
    pending = list(range(len(nodes)))
    while pending:
        progress = False
        rest = []
        for k in pending:
            node = nodes[k]
            if all(i in available or i not in produced_by for i in node.input):
                done.append(node)
                placed.add(k)
                available.update(node.output)
                progress = True
            else:
                rest.append(k)
        if not progress:
            raise LoweringError(f"internal: the lowered graph has a cycle around node '{nodes[rest[0]].name}'")
        pending = rest
    del g.node[:]
    g.node.extend(done)


def set_metadata(model: onnx.ModelProto, values: Mapping[str, str]) -> None:
    """Set ``metadata_props`` entries (replacing same keys)."""
    props = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in props:
            props[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def add_qdq(ed: GraphEditor, tensor: str, p: QParams, *, prefix: str, scope: str, before: Any = None,
            after: Any = None) -> tuple[str, str]:
    """A per-tensor ``QuantizeLinear -> DequantizeLinear`` on ``tensor`` with ``p`` (scalar
    scale, zero point of ``p.qtype``); returns (the Q output, the DQ output)."""
    import numpy as np

    s = ed.initializer(f"{prefix}_scale", np.asarray(p.scale, dtype=np.float32).reshape(()))
    z = ed.initializer(f"{prefix}_zero_point", np.asarray(p.zero_point).astype(np.dtype(p.qtype)).reshape(()))
    where = {"before": before} if before is not None else {"after": after}
    q = ed.node("QuantizeLinear", [tensor, s, z], f"{prefix}_quantized", f"{scope}/QuantizeLinear", **where)
    dq = ed.node("DequantizeLinear", [q, s, z], f"{prefix}_dequantized", f"{scope}/DequantizeLinear", **where)
    return q, dq


def add_weight_dq(ed: GraphEditor, name: str, q: Any, p: QParams, *, scope: str, before: Any,
                  clip: tuple[int, int] | None = None) -> str:
    """An integer weight initializer named ``{name}.weight`` (exactly) -> (``Clip`` to ``clip``, as
    Brevitas' QCDQ writes sub-8-bit grids) -> ``DequantizeLinear`` (per-channel on ``p.axis`` or
    per tensor, zero point of the weight's type)."""
    import numpy as np

    w = ed.initializer(f"{name}.weight", q, exact=True)
    if clip is not None:
        lo = ed.initializer(f"{name}.weight_min", np.asarray(clip[0], dtype=q.dtype))
        hi = ed.initializer(f"{name}.weight_max", np.asarray(clip[1], dtype=q.dtype))
        w = ed.node("Clip", [w, lo, hi], f"{name}.weight_clipped", f"{scope}/weight_clip/Clip", before=before)
    scale = np.asarray(p.scale, dtype=np.float32)
    s = ed.initializer(f"{name}.weight_scale", scale)
    z = ed.initializer(f"{name}.weight_zero_point", np.zeros(scale.shape, dtype=q.dtype))
    attrs = {"axis": int(p.axis if p.axis is not None else 0)} if scale.size > 1 else {}
    return ed.node("DequantizeLinear", [w, s, z], f"{name}.weight_dequantized",
                   f"{scope}/weight_dequant/DequantizeLinear", before=before, **attrs)


def add_bias_dq(ed: GraphEditor, name: str, b: Any, scale: Any, *, scope: str, before: Any) -> str:
    """An int32 bias initializer named ``{name}.bias`` (exactly) -> ``DequantizeLinear`` at the
    per-channel ``scale`` (axis 0, zero point 0), what ``QLinearConv`` adds to its accumulator."""
    import numpy as np

    b_name = ed.initializer(f"{name}.bias", np.asarray(b).astype(np.int32), exact=True)
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    s = ed.initializer(f"{name}.bias_scale", scale)
    z = ed.initializer(f"{name}.bias_zero_point", np.zeros(scale.shape, dtype=np.int32))
    return ed.node("DequantizeLinear", [b_name, s, z], f"{name}.bias_dequantized",
                   f"{scope}/bias_dequant/DequantizeLinear", before=before, axis=0)
