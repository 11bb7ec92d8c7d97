"""What actually runs: per layer, did the runtime execute an integer kernel or a float one?

A Q/DQ file says what was *asked*; the runtime decides what *runs*. ONNX Runtime fuses a
``DQ -> Conv -> Q`` group into an integer ``QLinearConv`` only when every rule of its QDQ
selectors holds, and silently runs the float ``Conv`` otherwise. So after creating the
session the way the evaluators do (same providers, same graph optimization level), this
module reads back the graph ONNX Runtime runs (``SessionOptions.optimized_model_filepath``)
and finds, for every weighted layer, the node that computes it:

- integer kernels: ``QLinearConv``, ``ConvInteger``, ``QLinearMatMul``, ``MatMulInteger``,
  ``MatMulIntegerToFloat``, ``DynamicQuantizeMatMul``, ``QGemm`` (ONNX or ``com.microsoft``);
- anything else (``Conv``, ``com.microsoft.FusedConv``, ``com.microsoft.nchwc.Conv``,
  ``MatMul``, ``FusedMatMul``, ``Gemm``) is float.

Nodes are mapped back to layer names by their weight initializer (names survive ONNX
Runtime's optimizations: the lowered files name them ``<layer>.weight``; other exports are
matched by the initializer the source graph's layer node reads) and, failing that, by
the exporter's scope name. A layer asked for A8 that runs as float is a warning in
:attr:`RuntimeReport.warnings`, never silent.

TensorRT: :func:`evaluators.tensorrt.engine_layer_precisions` builds the same report from
the engine inspector (where TensorRT exists).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evaluators.session import CPU

INT8_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                      "DynamicQuantizeMatMul", "QGemm", "NhwcQLinearConv"})
#: elementwise integer kernels ONNX Runtime's CPU QDQ transformers make (the int8 SiLU: QLinearSigmoid + QLinearMul)
INT8_ACTIVATION_OPS = frozenset({"QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearLeakyRelu", "QLinearConcat",
                                 "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax"})
COMPUTE_HINTS = ("Conv", "MatMul", "Gemm")
#: ONNX ops that only move a weight between its initializer and the compute node
_WEIGHT_PATH = frozenset({"DequantizeLinear", "QuantizeLinear", "Clip", "Cast", "Identity", "Reshape", "Transpose",
                          "Unsqueeze", "Squeeze", "Flatten"})


@dataclass(frozen=True)
class LayerRuntime:
    """How one layer runs."""

    layer: str
    asked: str          # the precision asked (``W8A8``) or ``?`` when unknown
    kernel: str         # the op that runs it (``com.microsoft.QLinearConv``, ``Conv``...) or ``missing``
    int8: bool          # an integer kernel

    @property
    def asked_a8(self) -> bool:
        return self.asked.endswith("A8")


@dataclass(frozen=True)
class RuntimeReport:
    """Per layer, what the runtime executes; counts of A8 asked and integer kernels run."""

    engine: str
    provider: str
    per_layer: Mapping[str, LayerRuntime]
    ops: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def asked_a8(self) -> int:
        return sum(1 for v in self.per_layer.values() if v.asked_a8)

    @property
    def ran_int8(self) -> int:
        return sum(1 for v in self.per_layer.values() if v.int8)

    @property
    def int8_activation_ops(self) -> dict[str, int]:
        """Elementwise ops the runtime runs on integers (``QLinearSigmoid``: 44...): the int8 SiLU."""
        return {k: v for k, v in self.ops.items() if k.rsplit(".", 1)[-1] in INT8_ACTIVATION_OPS}

    @property
    def a8_ran_float(self) -> list[str]:
        """Layers asked for A8 whose kernel is float."""
        return [k for k, v in self.per_layer.items() if v.asked_a8 and not v.int8]

    @property
    def warnings(self) -> list[str]:
        bad = self.a8_ran_float
        if not bad:
            return []
        shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
        kernels = sorted({self.per_layer[b].kernel for b in bad})
        return [f"{len(bad)} of {self.asked_a8} layers asked for A8 run as float on {self.provider} "
                f"({', '.join(kernels)}): {shown}"]

    def label(self) -> str:
        """``A8 asked 82 / ran int8 82``."""
        return f"A8 asked {self.asked_a8} / ran int8 {self.ran_int8}"

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "provider": self.provider, "asked_a8": self.asked_a8,
                "ran_int8": self.ran_int8, "a8_ran_float": self.a8_ran_float, "warnings": self.warnings,
                "int8_activation_ops": self.int8_activation_ops,
                "ops": dict(self.ops), "notes": list(self.notes),
                "per_layer": {k: asdict(v) for k, v in self.per_layer.items()}}


def asked_from_metadata(model: Any) -> dict[str, str]:
    """Layer -> precision asked, from the ``yolo_mpq.assignment`` the backends stamp into the file."""
    from mpq.onnx_nodes import assignment_from_metadata

    return assignment_from_metadata({p.key: p.value for p in model.metadata_props})


def _weight_initializer(graph: Any, producer: Mapping[str, Any], inits: set[str], tensor: str) -> str | None:
    seen: set[str] = set()
    name = tensor
    while name not in inits:
        if name in seen:
            return None
        seen.add(name)
        node = producer.get(name)
        if node is None or node.op_type not in _WEIGHT_PATH or not node.input:
            return None
        name = node.input[0]
    return name


def layer_weights(model: Any, layers: Sequence[str] | None = None) -> dict[str, str]:
    """Weight initializer (or Constant) name -> layer name, from a (source) ONNX graph.

    Layers are found by :func:`quantizers.onnx_names.module_name_from_node` on the compute
    nodes' scope names; ``layers`` restricts the result to those names.
    """
    wanted = set(layers) if layers is not None else None
    g = model.graph
    inits = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    out: dict[str, str] = {}
    for node in g.node:
        if not any(h in node.op_type for h in COMPUTE_HINTS) or len(node.input) < 2:
            continue
        layer = module_from_scope(node.name) if node.name else None
        if layer is None or (wanted is not None and layer not in wanted):
            continue
        w = _weight_initializer(g, producer, inits, node.input[1])
        if w:
            out[w] = layer
    return out


def layer_nodes(model: Any) -> dict[str, str]:
    """Layer name -> the name of the Conv/Gemm/MatMul node computing it (from scope names)."""
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.name:
            layer = module_from_scope(node.name)
            if layer:
                out[layer] = node.name
    return out


def module_from_scope(node_name: str) -> str | None:
    """The module path a legacy-exporter node name was made from (``/model.8/m.1/cv1/cv1.0/conv/Conv``
    -> ``model.8.m.1.cv1.0.conv``), or ``None``; the rule of
    ``quantizers.onnx_names.module_name_from_node`` (evaluators do not import quantizers)."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2 or not node_name.startswith("/"):
        return None
    scopes = parts[:-1]
    kept = [s for i, s in enumerate(scopes) if not (i + 1 < len(scopes) and scopes[i + 1].startswith(s + "."))]
    return ".".join(kept) or None


def read_optimized(onnx_path: str | os.PathLike[str], *, providers: Sequence[str] = (CPU,), threads: int | None = None,
                   keep: str | os.PathLike[str] | None = None) -> Any:
    """Create a session as the evaluators do and return the graph ONNX Runtime runs (an ONNX
    ModelProto; written to ``keep`` if given, else to a temporary file removed afterwards)."""
    import onnx

    from evaluators.session import open_session

    if keep is not None:
        path = Path(keep)
        path.parent.mkdir(parents=True, exist_ok=True)
        _, report, _ = open_session(onnx_path, providers=providers, threads=threads, optimized_model_path=path)
        return onnx.load(str(path), load_external_data=False), report
    with tempfile.TemporaryDirectory(prefix="yolo-mpq-ortopt-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        _, report, _ = open_session(onnx_path, providers=providers, threads=threads, optimized_model_path=path)
        return onnx.load(str(path), load_external_data=False), report


def int8_layers(onnx_path: str | os.PathLike[str], *, providers: Sequence[str] = (CPU,), threads: int | None = None,
                asked: Mapping[str, Any] | None = None, keep_optimized: str | os.PathLike[str] | None = None
                ) -> RuntimeReport:
    """Per weighted layer of ``onnx_path``: the kernel ONNX Runtime runs it with, int8 or float.

    Args:
        onnx_path: the file the trial evaluates (the lowered one).
        providers: as the evaluators use them (the optimized graph depends on the provider).
        threads: ORT intra-op threads (as the evaluators).
        asked: layer -> precision asked (default: the assignment stamped in the file; layers
            it does not name were asked float).
        keep_optimized: also keep ONNX Runtime's optimized graph at this path.
    """
    from evaluators.onnx_graph import load

    source = load(onnx_path)
    asked_map = {k: str(v) for k, v in (asked if asked is not None else asked_from_metadata(source)).items()}
    by_weight = layer_weights(source)
    layers_in_graph = sorted(set(by_weight.values()))
    opt, report = read_optimized(onnx_path, providers=providers, threads=threads, keep=keep_optimized)
    g = opt.graph
    inits = {i.name for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            inits.update(n.output)
    producer = {o: n for n in g.node for o in n.output}
    ops: dict[str, int] = {}
    found: dict[str, tuple[str, bool]] = {}
    notes: list[str] = []
    for node in g.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
        if not any(h in node.op_type for h in COMPUTE_HINTS):
            continue
        int8 = node.op_type in INT8_OPS
        layer = None
        # the weight input: QLinearConv (x, x_scale, x_zp, w, ...), ConvInteger (x, w, ...), float ops (x, w, ...)
        weight_inputs = [node.input[3]] if node.op_type in ("QLinearConv", "NhwcQLinearConv", "QLinearMatMul") \
            and len(node.input) > 3 else list(node.input[1:2])
        for w in weight_inputs:
            src = _weight_initializer(g, producer, inits, w)
            if src is not None:
                layer = by_weight.get(src) or (src[: -len(".weight")] if src.endswith(".weight") else None)
        if layer is None and node.name:
            layer = module_from_scope(node.name.split("_token_")[0])
        if layer is None:
            continue
        prev = found.get(layer)
        if prev is None or (int8 and not prev[1]):
            found[layer] = (key, int8)
    names = sorted(set(layers_in_graph) | set(asked_map) | set(found))
    per_layer: dict[str, LayerRuntime] = {}
    for name in names:
        kernel, int8 = found.get(name, ("missing", False))
        per_layer[name] = LayerRuntime(layer=name, asked=asked_map.get(name, "W16A16" if asked_map else "?"),
                                       kernel=kernel, int8=int8)
    missing = [n for n, v in per_layer.items() if v.kernel == "missing" and v.asked_a8]
    if missing:
        notes.append(f"{len(missing)} A8 layers not found in ONNX Runtime's optimized graph: {missing[:4]}")
    return RuntimeReport(engine="ort", provider=report.provider, per_layer=per_layer, ops=dict(sorted(ops.items())),
                         notes=tuple(notes))


def report_from_dict(data: Mapping[str, Any]) -> RuntimeReport:
    """Rebuild a report stored with :meth:`RuntimeReport.to_dict`."""
    per_layer = {k: LayerRuntime(**v) for k, v in data.get("per_layer", {}).items()}
    return RuntimeReport(engine=data.get("engine", "ort"), provider=data.get("provider", ""), per_layer=per_layer,
                         ops=data.get("ops", {}), notes=tuple(data.get("notes", ())))
