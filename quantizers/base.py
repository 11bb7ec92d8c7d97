"""The quantizer backend contract.

A backend turns the fused float model and an :class:`~mpq.assignment.Assignment` into a
:class:`QuantizedModel` (``materialize``) and writes it as a Q/DQ ONNX file with the same
input/output layout as the float ONNX (``export``). Each backend declares its
:class:`Capabilities` (which precisions per op type) so the search never asks for what it
cannot build; asking anyway raises :class:`UnsupportedPrecisionError` naming the layer and
the precision.

Backends declare themselves in :mod:`quantizers.registry`, which imports a backend's
framework only when the backend is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mpq.assignment import FLOAT, Assignment, LayerInfo, Precision
from mpq.data import CalibrationSet
from mpq.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from mpq.model import LoadedModel


class UnsupportedPrecisionError(UserError):
    """An assignment asks a backend for a precision it cannot build."""

    def __init__(self, backend: str, layer: str, precision: Precision, allowed: Iterable[Precision], kind: str = ""):
        allowed_s = ", ".join(str(p) for p in sorted(set(allowed)))
        what = f" ({kind})" if kind else ""
        super().__init__(f"backend '{backend}' cannot build layer '{layer}'{what} at {precision}; "
                         f"it supports {allowed_s} (W16A16 = float) for this layer")
        self.backend = backend
        self.layer = layer
        self.precision = precision


@dataclass(frozen=True)
class Capabilities:
    """What a backend can build: per op kind (``Conv2d``, ``Linear``), the allowed precisions.

    Float (W16A16) is always allowed.
    """

    backend: str
    precisions: Mapping[str, frozenset[Precision]]
    notes: str = ""

    def allowed(self, kind: str) -> frozenset[Precision]:
        """The precisions this backend builds for op kind ``kind``, float included."""
        return frozenset(self.precisions.get(kind, frozenset())) | {FLOAT}

    def supports(self, layer: LayerInfo, precision: Precision) -> bool:
        """Whether this backend builds ``layer`` at ``precision``."""
        return precision.is_float or (layer.quantizable and precision in self.allowed(layer.kind))

    def check(self, layers: Iterable[LayerInfo], assignment: Assignment) -> None:
        """Raise :class:`UnsupportedPrecisionError` for the first layer that cannot be built,
        or :class:`UserError` for a layer name that is not in the model."""
        by_name = {lay.name: lay for lay in layers}
        for name, precision in assignment.items():
            layer = by_name.get(name)
            if layer is None:
                import difflib

                near = difflib.get_close_matches(name, list(by_name), n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                raise UserError(f"assignment names layer '{name}', which is not a Conv2d/Linear of this model{hint}")
            if not layer.quantizable:
                raise UnsupportedPrecisionError(self.backend, name, precision, [], f"{layer.kind}, {layer.reason}")
            if not self.supports(layer, precision):
                raise UnsupportedPrecisionError(self.backend, name, precision, self.allowed(layer.kind), layer.kind)


@dataclass
class QuantizedModel:
    """The result of ``materialize``.

    ``module`` is a runnable torch fake-quant model (same input and output as the float
    :class:`mpq.model.YoloDetector`), or ``None`` for backends that work on ONNX only
    (those set ``onnx_path`` to the built artifact instead).
    """

    backend: str
    assignment: Assignment
    base: LoadedModel
    module: nn.Module | None = None
    onnx_path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportResult:
    """A written Q/DQ ONNX file and what is in it."""

    path: Path
    seconds: float
    node_counts: Mapping[str, int]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class QuantizerBackend(Protocol):
    """What every backend implements (the contract suite: :mod:`quantizers.testing`)."""

    name: str
    capabilities: Capabilities

    def materialize(self, model: LoadedModel, assignment: Assignment, calib: CalibrationSet) -> QuantizedModel:
        """Build ``assignment`` on a copy of ``model`` (never modifying it), calibrated on ``calib``."""
        ...

    def export(self, qmodel: QuantizedModel, path: Path) -> ExportResult:
        """Write the quantized model as Q/DQ (QCDQ) ONNX at ``path``, atomically."""
        ...


def count_qdq_nodes(onnx_path: Path | str) -> dict[str, int]:
    """Count QuantizeLinear / DequantizeLinear / Clip (and other quantization ops) in an ONNX file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip", "QLinearConv", "ConvInteger",
                            "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export_metadata(proto: Any, path: Path, qmodel: QuantizedModel, *, backend: str, fmt: str, exporter: str,
                    options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The export metadata every backend writes, as (graph part, provenance part).

    Graph: format, backend, exporter, opset, input/output layout, Q/DQ node counts (read
    back from the saved file at ``path``) and op counts of ``proto``. Provenance: the
    assignment (digest, label, summary, layers), the backend options, library versions,
    materialize timings, file size and source model. Backends put their own keys between.
    """
    from mpq.files import versions

    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    base = qmodel.base
    layers = base.layers
    graph = {
        "format": fmt, "backend": backend, "exporter": exporter,
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "input": {"name": "images", "shape": ["batch", 3, base.imgsz, base.imgsz]},
        "output": {"name": "output0", "layout": base.layout, "shape": ["batch", *base.output_shape(1)[1:]]},
        "node_counts": count_qdq_nodes(path),
        "op_counts": dict(sorted(ops.items())),
    }
    provenance = {
        "assignment": {"digest": qmodel.assignment.digest(), "label": qmodel.assignment.label(layers),
                       "summary": qmodel.assignment.summary(layers), "layers": qmodel.assignment.to_dict()},
        "options": options.model_dump(mode="json"),
        "versions": versions(),
        "materialize_seconds": dict(qmodel.timings),
        "file_bytes": path.stat().st_size,
        "source_model": str(base.source),
    }
    return graph, provenance


def metadata_path(onnx_path: Path | str) -> Path:
    """Where a backend's ``export`` writes the metadata of ``onnx_path``: ``<file>.json`` beside it."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def stamp_metadata(proto: Any, qmodel: QuantizedModel, extra: Mapping[str, str] | None = None) -> None:
    """Record the backend, the assignment and ``extra`` in an ONNX model's ``metadata_props``."""
    import json

    props = {p.key: p for p in proto.metadata_props}
    values = {"yolo_mpq.backend": qmodel.backend, "yolo_mpq.assignment_digest": qmodel.assignment.digest(),
              "yolo_mpq.assignment": json.dumps(qmodel.assignment.to_dict(), sort_keys=True), **(extra or {})}
    for key, value in values.items():
        if key in props:
            props[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
