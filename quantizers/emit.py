"""QDQ emission: a backend's per-layer quantization written into the float ONNX by graph surgery.

Tracing a fake-quant torch model to ONNX (Brevitas' ``export_onnx_qcdq``) costs seconds per
trial, more with every quantizer (docs/benchmarks.md, "Trial time"), while the float graph
around the layers is the same in every trial. A backend that can read its quantizers' values
(:class:`LayerParams`: integer weights and their per-channel scales, the input and output
quantizers, the bias) hands them to :func:`emit_qdq`, which writes them into a copy of the
float model's ONNX (exported once per study) in exactly the standard QDQ form that
:func:`quantizers.lowering.graph.read_layers` reads and every lowering target starts from:

- **input** (A8): ``QuantizeLinear -> DequantizeLinear`` on the tensor the layer reads, one
  pair per layer, as the backend's per-layer input quantizers are;
- **weight**: the integers in an int8 initializer -> ``DequantizeLinear`` (per channel on
  ``axis``, zero point 0); a float weight stays a float initializer;
- **bias**: a float initializer, or int32 -> ``DequantizeLinear`` when the backend quantized
  it (at ``input scale x weight scale``);
- **output** (the backend's output quantizer, ``ort-cpu``): ``QuantizeLinear ->
  DequantizeLinear`` after the layer, read by everything that read its output.

The file carries the same integers, scales and ranges as the backend's own export, so the
lowered file is the same; ``tests/integration/test_emit.py`` checks that, output for output.
A layer the emitter cannot express raises :class:`EmitUnsupported` (the caller then traces).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import QParams

if TYPE_CHECKING:
    import onnx


class EmitUnsupported(Exception):
    """A quantizer or layer the graph emission cannot write; the message says which."""


@dataclass(frozen=True)
class LayerParams:
    """What one quantized layer computes, as numbers (``real = (q - zero_point) * scale``)."""

    x_q: QParams | None = None        # per-tensor 8-bit input quantizer (A8)
    weight_int: Any = None            # integer weights (clipped to their grid), when quantized
    w_q: QParams | None = None        # their scales (per channel on ``axis``), zero point 0
    w_clip: tuple[int, int] | None = None  # the grid's bounds, written as a Clip (as Brevitas' QCDQ does)
    weight_float: Any = None          # the float weight (not quantized); None: keep the float graph's
    bias: Any = None                  # float bias (after bias correction), when there is one
    bias_int: Any = None              # int32 bias, when the backend quantized it
    bias_q: QParams | None = None     # its scale (per channel), zero point 0
    y_q: QParams | None = None        # per-tensor 8-bit output quantizer


def emit_qdq(float_onnx: str | os.PathLike[str], params: Mapping[str, LayerParams], layers: Iterable[Any]
             ) -> onnx.ModelProto:
    """A copy of ``float_onnx`` with every layer of ``params`` (layer name -> values) quantized.

    ``layers``: the model's layer table, to find each layer's node. Raises
    :class:`EmitUnsupported` for a layer that is not a node of the float graph or whose
    output is a graph output.
    """
    import numpy as np

    from quantizers.lowering import graph as G
    from quantizers.lowering.ort_cpu import scope_of

    proto = G.load(Path(float_onnx))
    by_layer = {layer: node for node, layer in G.layer_names(proto, list(layers), source=str(float_onnx)).items()}
    nodes = {n.name: n for n in proto.graph.node}
    outputs = {o.name for o in proto.graph.output}
    ed = G.GraphEditor(proto)
    for name, p in params.items():
        node = nodes.get(by_layer.get(name, ""))
        if node is None:
            raise EmitUnsupported(f"layer '{name}' is not a node of the float ONNX {float_onnx}")
        scope = scope_of(node)
        if p.x_q is not None:
            node.input[0] = G.add_qdq(ed, node.input[0], p.x_q, prefix=f"{name}.input", scope=f"{scope}/input_quant",
                                      before=node)[1]
        if p.weight_int is not None and p.w_q is not None:
            node.input[1] = G.add_weight_dq(ed, name, np.asarray(p.weight_int).astype(np.int8), p.w_q, scope=scope,
                                            before=node, clip=p.w_clip)
        elif p.weight_float is not None:
            node.input[1] = ed.initializer(f"{name}.weight", np.asarray(p.weight_float, dtype=np.float32), exact=True)
        _emit_bias(ed, node, name, p, scope)
        if p.y_q is not None:
            if node.output[0] in outputs:
                raise EmitUnsupported(f"layer '{name}': its output is a graph output; no output quantizer possible")
            q, dq = G.add_qdq(ed, node.output[0], p.y_q, prefix=f"{name}.output", scope=f"{scope}/output_quant",
                              after=node)
            ed.rewire([node.output[0]], dq, skip=[q])
    ed.finish()
    return proto


def _emit_bias(ed: Any, node: Any, name: str, p: LayerParams, scope: str) -> None:
    import numpy as np

    from quantizers.lowering.graph import add_bias_dq

    if p.bias_int is not None and p.bias_q is not None:
        value = add_bias_dq(ed, name, p.bias_int, p.bias_q.scale, scope=scope, before=node)
    elif p.bias is not None:
        value = ed.initializer(f"{name}.bias", np.asarray(p.bias, dtype=np.float32).reshape(-1), exact=True)
    else:
        return
    if len(node.input) > 2:
        node.input[2] = value
    else:
        node.input.append(value)


def write_emitted(qmodel: Any, params: Mapping[str, LayerParams], float_onnx: str | os.PathLike[str],
                  path: str | os.PathLike[str], *, backend: str, options: Any) -> Any:
    """Emit ``params`` into ``float_onnx``, save it at ``path`` (atomically) with the backend's
    metadata stamped in and ``<path>.json`` beside it; an :class:`~quantizers.base.ExportResult`."""
    import time

    import onnx

    from mpq.files import atomic_path, write_json
    from quantizers.base import ExportResult, export_metadata, metadata_path, stamp_metadata

    start = time.perf_counter()
    path = Path(path)
    proto = emit_qdq(float_onnx, params, qmodel.base.layers)
    stamp_metadata(proto, qmodel)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    seconds = time.perf_counter() - start
    graph_meta, provenance = export_metadata(
        proto, path, qmodel, backend=backend, fmt="QDQ",
        exporter=f"graph emission (quantizers.emit) into the float ONNX {Path(float_onnx).name}", options=options)
    metadata = {**graph_meta, **provenance, "float_onnx": str(float_onnx),
                "export_seconds": {"total": round(seconds, 4)}}
    write_json(metadata_path(path), metadata)
    return ExportResult(path=path, seconds=seconds, node_counts=graph_meta["node_counts"], metadata=metadata)
