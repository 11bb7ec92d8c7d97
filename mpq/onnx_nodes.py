"""ONNX graph helpers shared by the backends and evaluators: node name -> layer name, lookups, extra outputs.

The legacy TorchScript exporter (``dynamo=False``, what :func:`mpq.model.export_onnx` and the
torch backends use) names nodes after the module scopes they ran in:
``/model.8/m.1/cv1/cv1.0/conv/Conv`` for the module ``model.8.m.1.cv1.0.conv``.
:func:`module_name_from_node` inverts this; :class:`OnnxGraph` answers "who produces this
tensor" and "which constant is this" over one graph. ``onnx`` is imported only when needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import onnx

#: Shape-only ops that :meth:`OnnxGraph.source` looks through.
PASS_THROUGH_OPS = frozenset({"Reshape", "Transpose", "Identity", "Cast", "Unsqueeze", "Squeeze", "Flatten"})


def module_name_from_node(node_name: str) -> str | None:
    """The module path a legacy-exporter node name was made from, or ``None``.

    Each scope is the module's qualified name from its last non-numeric part on; a
    container that was called itself (a ``Sequential``) adds a scope that the next one
    repeats (``cv1`` then ``cv1.0``), which is dropped:

    - ``/model.8/m.1/cv1/cv1.0/conv/Conv`` -> ``model.8.m.1.cv1.0.conv``;
    - ``/model.23/one2one_cv2.0/one2one_cv2.0.2/Conv`` -> ``model.23.one2one_cv2.0.2``;
    - names without scopes (``Conv_12``, ``node_conv2d``) give ``None``.
    """
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2 or not node_name.startswith("/"):
        return None
    scopes = parts[:-1]
    kept = [s for i, s in enumerate(scopes) if not (i + 1 < len(scopes) and scopes[i + 1].startswith(s + "."))]
    return ".".join(kept) or None


class OnnxGraph:
    """Producer, initializer and constant lookups over one ONNX graph."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {i.name: i for i in model.graph.initializer}
        self.producer: dict[str, Any] = {out: node for node in model.graph.node for out in node.output}

    def constant_array(self, name: str) -> np.ndarray | None:
        """The value of an initializer or of a ``Constant`` node's output, else ``None``."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def source(self, name: str) -> Any:
        """The node producing ``name``, looking through shape-only ops (:data:`PASS_THROUGH_OPS`)."""
        node = self.producer.get(name)
        while node is not None and node.op_type in PASS_THROUGH_OPS:
            node = self.producer.get(node.input[0])
        return node

    def const(self, name: str) -> np.ndarray | None:
        """The constant behind ``name``, looking through shape-only ops, else ``None``."""
        value = self.constant_array(name)
        if value is not None:
            return value
        node = self.source(name)
        if node is not None and node.op_type == "Constant":
            return self.constant_array(node.output[0])
        return None


def with_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` with ``tensors`` added as (float) graph outputs, for per-layer checks."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in tensors:
        if name not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            present.add(name)
    return out


def assignment_from_metadata(props: Mapping[str, str]) -> dict[str, str]:
    """Layer -> precision asked, from the ``yolo_mpq.assignment`` metadata property the backends
    stamp into their files (``props``: the file's metadata as a dict); ``{}`` if absent or unreadable."""
    raw = props.get("yolo_mpq.assignment")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    layers = data.get("layers", data) if isinstance(data, dict) else {}
    return {str(k): str(v) for k, v in layers.items()} if isinstance(layers, dict) else {}
