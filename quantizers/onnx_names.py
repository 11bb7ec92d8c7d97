"""Map layer names (``model.8.m.0.cv1.conv``) to the ONNX nodes that compute them.

Node exclusions (ModelOpt ONNX PTQ), weight rewrites after export and per-layer numeric
checks need to know which ``Conv`` (or ``Gemm``/``MatMul``) node is which layer. A wrong
mapping silently quantizes the wrong layer, so :func:`map_layers_to_nodes` collects up to
three independent clues per node and requires a one-to-one map covering every requested
layer, with matching weight shapes:

1. **weight initializer name**: the legacy exporter keeps parameter names
   (``model.0.conv.weight``), possibly behind Q/DQ, Clip, Cast or Reshape, which
   :func:`weight_source` walks through;
2. **scope name**: ``/model.8/m.1/cv1/cv1.0/conv/Conv`` is ``model.8.m.1.cv1.0.conv``
   (:func:`mpq.onnx_nodes.module_name_from_node`);
3. **weight content** (optional, given the float weights): survives renamed initializers.

A layer without exactly one node, or a node claimed by two layers, raises
:class:`OnnxNameError` naming them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError
from mpq.onnx_nodes import OnnxGraph, module_name_from_node

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from mpq.assignment import LayerInfo

#: ONNX op types that compute a layer of each kind.
OP_TYPES: Mapping[str, tuple[str, ...]] = {"Conv2d": ("Conv",), "Linear": ("Gemm", "MatMul")}

#: Ops a weight may pass through between its initializer and the compute node.
WEIGHT_PATH_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "Clip", "Cast", "Identity", "Reshape",
                             "Transpose", "Unsqueeze", "Squeeze", "Flatten"})


class OnnxNameError(UserError):
    """Layers that cannot be matched one-to-one to ONNX nodes; the message names them."""


@dataclass(frozen=True)
class NodeMatch:
    """One layer's node and the clues that agreed on it."""

    layer: str
    node: str
    op_type: str
    weight: str | None
    methods: tuple[str, ...]


@dataclass(frozen=True)
class LayerNodeMap:
    """A one-to-one map between layer names and ONNX node names."""

    matches: Mapping[str, NodeMatch]

    def node(self, layer: str) -> str:
        """The node name of ``layer`` (``KeyError`` if the layer was not mapped)."""
        return self.matches[layer].node

    def layer(self, node: str) -> str | None:
        """The layer computed by ``node``, or ``None``."""
        for m in self.matches.values():
            if m.node == node:
                return m.layer
        return None

    @property
    def nodes(self) -> dict[str, str]:
        """Layer name -> node name."""
        return {k: m.node for k, m in self.matches.items()}

    def __len__(self) -> int:
        return len(self.matches)


def weight_source(model_or_graph: onnx.ModelProto | OnnxGraph, tensor: str) -> str | None:
    """The initializer (or ``Constant`` output) a weight input comes from, walking back
    through Q/DQ, Clip, Cast, Reshape and similar ops along their first input."""
    g = model_or_graph if isinstance(model_or_graph, OnnxGraph) else OnnxGraph(model_or_graph)
    seen = set()
    name = tensor
    while name not in g.initializers:
        if name in seen:
            return None
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return name
        # standard ops, and ModelOpt's trt::DequantizeLinear (4-bit weights), are walked through
        if node.op_type not in WEIGHT_PATH_OPS or not node.input:
            return None
        name = node.input[0]
    return name


def _expected_shape(layer: LayerInfo) -> tuple[int, ...]:
    if layer.kind == "Conv2d":
        return (layer.out_channels, layer.in_channels // max(layer.groups, 1), *layer.kernel)
    return (layer.out_channels, layer.in_channels)


def _shape_ok(layer: LayerInfo, shape: tuple[int, ...] | None, op_type: str) -> bool:
    if shape is None:
        return True  # nothing to contradict the other clues
    want = _expected_shape(layer)
    if layer.kind == "Linear" and op_type == "MatMul":
        return tuple(shape) in (want, want[::-1])
    return tuple(shape) == want


def _load(model: onnx.ModelProto | str | os.PathLike[str]) -> onnx.ModelProto:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model))
    return model


@dataclass(frozen=True)
class _Node:
    """A candidate compute node: its weight initializer, that weight's shape, and its scope's module name."""

    node: Any
    weight: str | None
    shape: tuple[int, ...] | None
    scope: str | None


def _candidate_nodes(proto: onnx.ModelProto, g: OnnxGraph, layers: list[LayerInfo]) -> dict[str, _Node]:
    wanted_ops = {op for lay in layers for op in OP_TYPES.get(lay.kind, ())}
    out: dict[str, _Node] = {}
    for i, node in enumerate(n for n in proto.graph.node if n.op_type in wanted_ops):
        key = node.name or f"<unnamed {node.op_type} #{i}>"
        wname = weight_source(g, node.input[1]) if len(node.input) > 1 else None
        arr = g.constant_array(wname) if wname else None
        shape = tuple(int(d) for d in arr.shape) if arr is not None else None
        out[key] = _Node(node, wname, shape, module_name_from_node(node.name) if node.name else None)
    return out


def _clues(lay: LayerInfo, nodes: dict[str, _Node], g: OnnxGraph,
           weights: Mapping[str, np.ndarray] | None) -> dict[str, set[str]]:
    """Node key -> the clues (weight-name, scope, weight-content) that point from ``lay`` to it."""
    import numpy as np

    clues: dict[str, set[str]] = {}
    for key, info in nodes.items():
        if info.weight and info.weight == f"{lay.name}.weight":
            clues.setdefault(key, set()).add("weight-name")
        if info.scope and info.scope == lay.name:
            clues.setdefault(key, set()).add("scope")
    if weights is not None and lay.name in weights and not clues:
        ref = np.asarray(weights[lay.name])
        for key, info in nodes.items():
            if info.shape == tuple(ref.shape) and info.weight:
                arr = g.constant_array(info.weight)
                if arr is not None and arr.dtype == ref.dtype and np.array_equal(arr, ref):
                    clues.setdefault(key, set()).add("weight-content")
    return clues


def _pick(lay: LayerInfo, nodes: dict[str, _Node], clues: dict[str, set[str]]) -> tuple[str, set[str]] | str:
    """The node of ``lay`` and the clues that agree on it, or the problem (a message)."""
    ops = OP_TYPES.get(lay.kind, ())
    fitting = {k: v for k, v in clues.items()
               if k in nodes and _shape_ok(lay, nodes[k].shape, nodes[k].node.op_type) and nodes[k].node.op_type in ops}
    if not fitting:
        hint = ""
        if clues:
            shapes = {nodes[k].shape for k in clues if k in nodes}
            hint = f" (nodes {sorted(clues)} have weight shapes {sorted(map(str, shapes))}, " \
                   f"expected {_expected_shape(lay)})"
        return f"layer '{lay.name}' ({lay.kind}) matches no {'/'.join(ops)} node{hint}"
    if len(fitting) > 1:
        # prefer the node on which most clues agree, if unique
        best = max(len(v) for v in fitting.values())
        top = [k for k, v in fitting.items() if len(v) == best]
        if len(top) > 1:
            return f"layer '{lay.name}' matches several nodes: {sorted(top)}"
        fitting = {top[0]: fitting[top[0]]}
    return next(iter(fitting.items()))


def map_layers_to_nodes(model: onnx.ModelProto | str | os.PathLike[str], layers: Iterable[LayerInfo], *,
                        weights: Mapping[str, np.ndarray] | None = None, source: str = "") -> LayerNodeMap:
    """Match each layer to exactly one ONNX compute node (see the module docstring).

    Args:
        model: an ONNX model or its path.
        layers: the layers to map (e.g. ``LoadedModel.layers`` or only the quantizable ones).
        weights: optional float weights by layer name, enabling the content clue.
        source: how to name the model in errors (defaults to its path, if given one).

    Raises:
        OnnxNameError: a layer with no node or several, a node claimed twice, or a weight
            shape that does not fit.
    """
    where = source or (str(model) if isinstance(model, (str, os.PathLike)) else "ONNX model")
    proto = _load(model)
    g = OnnxGraph(proto)
    layers = list(layers)
    nodes = _candidate_nodes(proto, g, layers)
    problems: list[str] = []
    matches: dict[str, NodeMatch] = {}
    claimed: dict[str, str] = {}
    for lay in layers:
        picked = _pick(lay, nodes, _clues(lay, nodes, g, weights))
        if isinstance(picked, str):
            problems.append(picked)
            continue
        key, methods = picked
        if key in claimed:
            problems.append(f"node '{key}' matches both layer '{claimed[key]}' and layer '{lay.name}'")
            continue
        claimed[key] = lay.name
        info = nodes[key]
        matches[lay.name] = NodeMatch(lay.name, info.node.name, info.node.op_type, info.weight, tuple(sorted(methods)))
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise OnnxNameError(f"{where}: cannot map layers to ONNX nodes one-to-one:\n"
                            + "\n".join(f"  - {p}" for p in shown)
                            + "\n(export with mpq.model.export_onnx, the legacy exporter, which keeps module "
                              "scopes and parameter names)")
    return LayerNodeMap(matches)
