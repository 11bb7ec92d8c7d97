"""Small ONNX graph utilities: Ultralytics metadata, and the raw head tensor of an end-to-end graph.

- :func:`ultralytics_metadata` / :func:`write_metadata` put the ``metadata_props`` that
  Ultralytics' ``AutoBackend`` reads (names, stride, imgsz, batch, end2end) into an ONNX
  file, so ``YOLO("model.onnx")`` predicts and validates our exports exactly as it would
  its own.
- :func:`find_raw_head_tensor` finds, in a YOLOv10 end-to-end graph, the ``(N, 4 + nc,
  anchors)`` tensor the head builds before its top-k selection (the ``Concat`` of decoded
  boxes and class scores in ``Detect._inference``). The fidelity evaluator exposes it as an
  extra output of an in-memory copy of the graph and measures SQNR on it: the final
  ``(N, 300, 6)`` rows are re-sorted by score, so an element-wise error on them is
  meaningless. Found by shape (shape inference), not by name, so it works on float,
  Brevitas QCDQ and ModelOpt QDQ exports alike.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evaluators.errors import ModelFormatError


def load(path: str | os.PathLike[str]) -> Any:
    """``onnx.load`` with a clear error for a missing or corrupt file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise ModelFormatError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {exc}); "
                               "expected an ONNX file (re-export it)") from None


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (empty if none)."""
    model = load(path)
    return {p.key: p.value for p in model.metadata_props}


def ultralytics_metadata(*, names: Mapping[int, str], imgsz: int, end2end: bool, dynamic_batch: bool,
                         batch: int = 1) -> dict[str, str]:
    """Metadata as Ultralytics' exporter writes it (values are ``str()`` of Python literals)."""
    return {
        "description": "yolo-mpq export",
        "author": "yolo-mpq",
        "stride": "32",
        "task": "detect",
        "batch": str(int(batch)),
        "imgsz": str([int(imgsz), int(imgsz)]),
        "names": str({int(k): str(v) for k, v in names.items()}),
        "args": str({"batch": int(batch), "dynamic": bool(dynamic_batch), "nms": False, "half": False}),
        "channels": "3",
        "end2end": str(bool(end2end)),
    }


def write_metadata(src: str | os.PathLike[str], meta: Mapping[str, str], dst: str | os.PathLike[str] | None = None
                   ) -> Path:
    """Write ``meta`` into the ONNX file's ``metadata_props`` (replacing same keys), atomically."""
    import onnx

    from mpq.files import atomic_path

    model = load(src)
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update({str(k): str(v) for k, v in meta.items()})
    del model.metadata_props[:]
    for k, v in existing.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    out = Path(dst) if dst is not None else Path(src)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


def names_from_metadata(meta: Mapping[str, str]) -> dict[int, str] | None:
    """Class names from Ultralytics-style metadata, or ``None``."""
    import ast

    text = meta.get("names")
    if not text:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
    if isinstance(value, dict):
        return {int(k): str(v) for k, v in value.items()}
    if isinstance(value, list):
        return {i: str(v) for i, v in enumerate(value)}
    return None


def _shapes(model: Any) -> dict[str, list[int | str | None]]:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - custom domains can break inference; use what the file has
        inferred = model
    out: dict[str, list[int | str | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


def find_raw_head_tensor(model: Any, num_classes: int | None = None) -> str | None:
    """Name of the ``(N, 4 + nc, anchors)`` tensor before an end-to-end head's top-k, or ``None``.

    The last rank-3 ``Concat`` feeding a ``Transpose`` (``y.permute(0, 2, 1)`` in the head)
    whose known dims fit (``dim1 == 4 + nc``, more anchors than channels); else the last
    rank-3 ``Concat`` with static dims that fit. Shape inference often cannot tell the dims
    (anchors computed in the graph), so callers check the tensor's shape at run time.
    """
    shapes = _shapes(model)
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.op_type)
    best: str | None = None
    best_transposed: str | None = None
    for node in model.graph.node:
        if node.op_type != "Concat" or not node.output:
            continue
        name = node.output[0]
        shape = shapes.get(name)
        if not shape or len(shape) != 3:
            continue
        c, a = shape[1], shape[2]
        transposed = "Transpose" in consumers.get(name, [])
        if isinstance(c, int) and (not 5 <= c <= 4 + 4096 or (num_classes is not None and c != 4 + num_classes)):
            continue
        if isinstance(a, int) and (a <= 6 or (isinstance(c, int) and a <= c)):
            continue
        if isinstance(c, int) and isinstance(a, int):
            best = name
        if transposed:  # dims unknown statically (anchors computed in-graph): trust the head's permute pattern
            best_transposed = name
    return best_transposed or best
