"""Cache keys: what, besides its inputs, decides whether a cached result may be reused.

Every key the project stores or compares is built here, from plain values, so that one fact
(the model file, the data, the calibration images, the settings) is fingerprinted one way:

- :func:`data_digest`: the evaluation image ids, the annotations file, the calibration
  image paths and the image size;
- :func:`calibration_key`: a calibration set held in memory (backends key their cached
  statistics by it);
- :func:`context_key`: what decides a trial's result besides its assignment (``metrics.json``);
- :func:`sweep_key`: what decides a sensitivity table (``sensitivity.json``);
- :func:`study_key`: what an Optuna study was made with (checked when a worker joins it);
- :func:`float_export_key` / :func:`baseline_key`: the float ONNX and the float metrics;
- :func:`preprocess_key` / :func:`image_list_digest`: preprocessed image caches (``.npz``);
- :func:`per_image_key`: the per-image COCOeval records of one evaluated file (the bootstrap).
- :func:`weights_key` / :func:`weights_digest`: a backend's cached rounded weights
  (``cache/weights/<backend>-<digest>.pt``), from :func:`module_digest` (the float model's
  tensors), the calibration images (paths, file digests, pixels), the layer table and the
  options that decide the weights.

Keys are JSON-serializable dicts (stored beside the result they describe) or short hex digests.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.files import file_digest

if TYPE_CHECKING:
    import numpy as np
    from pydantic import BaseModel
    from torch import nn

    from mpq.assignment import LayerInfo, Precision


def _dump(section: BaseModel) -> dict[str, Any]:
    return section.model_dump(mode="json")


def model_digest(path: Path, head: str = "auto") -> str:
    """The model file's digest, or its name for a bundled Ultralytics architecture (``yolov10m.yaml``),
    and the spec's head (every key built on it changes with the head)."""
    digest = file_digest(path) if path.is_file() else str(path)
    return f"{digest}:head={head}"


def data_digest(image_ids: Sequence[int], annotations: Path, calibration_paths: Iterable[Path], imgsz: int) -> str:
    """The evaluation subset, the annotations file, the calibration images and the image size."""
    payload = {"ids": list(image_ids), "ann": str(annotations), "calib": [str(p) for p in calibration_paths],
               "imgsz": imgsz}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def calibration_key(images: np.ndarray, paths: Iterable[Path], batch_size: int) -> str:
    """A cheap fingerprint of a calibration set (``CalibrationSet``'s fields): its paths, shape,
    batch size and a strided sample of pixels."""
    import numpy as np

    h = hashlib.sha256()
    h.update(str(images.shape).encode())
    h.update(str(int(batch_size)).encode())
    h.update("\n".join(str(p) for p in paths).encode())
    h.update(np.ascontiguousarray(images[:, :, ::7, ::7]).tobytes())
    return h.hexdigest()[:16]


def context_key(*, model: str, data: str, imgsz: int, backend: BaseModel, evaluation: BaseModel,
                latency: BaseModel, deploy: BaseModel | None = None) -> dict[str, Any]:
    """What, besides the assignment, decides a trial's result (``deploy``: the target its file is lowered for)."""
    out = {"model": model, "data": data, "imgsz": imgsz, "backend": _dump(backend), "eval": _dump(evaluation),
           "latency": _dump(latency)}
    if deploy is not None:
        out["deploy"] = _dump(deploy)
    return out


def sweep_key(*, model: str, data: str, imgsz: int, granularity: str, groups: Sequence[str], backend: BaseModel,
              metric: str, candidates: Iterable[Precision], images: int, deploy: str | None = None) -> dict[str, Any]:
    """What decides a sensitivity table (``deploy``: the target its probes model and are lowered for)."""
    out = {"model": model, "data": data, "imgsz": imgsz, "granularity": granularity, "groups": list(groups),
           "backend": _dump(backend), "metric": metric, "candidates": [str(p) for p in candidates],
           "images": images}
    if deploy is not None:
        out["deploy"] = deploy
    return out


def study_key(*, context: dict[str, Any], objectives: Sequence[str], space: str, granularity: str,
              candidates: Iterable[Precision], sensitivity: BaseModel) -> dict[str, Any]:
    """What an Optuna study was made with; a worker joining it must agree on every entry."""
    return {"context": context, "objectives": list(objectives), "space": space, "granularity": granularity,
            "candidates": [str(p) for p in candidates], "sensitivity": _dump(sensitivity)}


def float_export_key(*, model: Path, model_digest: str, imgsz: int, max_det: int) -> dict[str, Any]:
    """What decides the float model's ONNX export."""
    return {"model": str(model), "digest": model_digest, "imgsz": imgsz, "max_det": max_det}


def worker_seed(study_seed: int, worker: str) -> int:
    """A sampler seed derived from the study's seed and a worker's id (stable, below 2**31)."""
    digest = hashlib.sha256(f"{study_seed}:{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


def baseline_key(*, onnx: Path, data: str, evaluation: BaseModel, latency: BaseModel) -> dict[str, Any]:
    """What decides the float model's metrics."""
    return {"onnx": file_digest(onnx), "data": data, "eval": _dump(evaluation), "latency": _dump(latency)}


def preprocess_key(paths: Iterable[Path], imgsz: int) -> str:
    """What decides a preprocessed image array: the image files, in order, and the size."""
    return json.dumps({"imgsz": imgsz, "paths": [str(p) for p in paths]})


def image_list_digest(paths: Iterable[Path]) -> str:
    """A short digest of a list of image files (names a cache file)."""
    return hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()[:12]


def per_image_key(image_ids: Sequence[int], annotations: Path, *, imgsz: int, category_ids: Sequence[int],
                  settings: str) -> str:
    """What, besides the model file, decides per-image COCOeval records: the images, the annotations
    (path and content), the image size, the class -> category map and the decoding settings."""
    payload = "\n".join([str(list(image_ids)), str(annotations), file_digest(annotations), str(imgsz),
                          str(list(category_ids)), settings])
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
_MODULE_DIGESTS: dict[int, tuple[Any, str]] = {}


def module_digest(module: nn.Module) -> str:
    """sha256 (16 hex) of a module's parameters and buffers, names, shapes and dtypes included
    (remembered per module object: the float model is hashed once per process)."""
    entry = _MODULE_DIGESTS.get(id(module))
    if entry is not None and entry[0]() is module:
        return str(entry[1])
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _MODULE_DIGESTS[id(module)] = (weakref.ref(module), digest)
    return digest


def weights_key(*, backend: str, module: nn.Module, imgsz: int, layers: Iterable[LayerInfo],
                calibration_images: np.ndarray, calibration_paths: Sequence[Path], batch_size: int,
                widths: Sequence[int], method: str, settings: dict[str, Any], scales: dict[str, Any]
                ) -> dict[str, Any]:
    """What decides a backend's cached rounded weights: the float model's tensors, the layer
    table (name, kind, shape of every quantizable layer), the calibration images (their list,
    each file's digest, the preprocessed pixels, the batching), the widths, the rounding method
    and its settings, and the options that set the scales."""
    table = [[lay.name, lay.kind, lay.in_channels, lay.out_channels, list(lay.kernel), list(lay.stride), lay.groups]
             for lay in layers if lay.quantizable]
    files = [[str(p), file_digest(p) if Path(p).is_file() else None] for p in calibration_paths]
    return {"backend": backend, "model": module_digest(module), "imgsz": imgsz, "layers": table,
            "calibration": {"images": files, "pixels": calibration_key(calibration_images, calibration_paths,
                                                                      batch_size)},
            "bits": [int(b) for b in widths], "method": method, "method_settings": settings, "scales": scales}


def weights_digest(key: dict[str, Any], version: int) -> str:
    """The short digest (16 hex) naming the cache file of the weights described by ``key``
    (``version``: the store's format, bumped when the algorithms or the file layout change)."""
    payload = json.dumps({"format": version, **key}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
