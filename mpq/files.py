"""Files: atomic writes, JSON, file digests, and the versions and machine a result was made on.

Every file is written to a temporary name in the same folder, then renamed, so an
interrupted run never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (paths, numpy scalars and dataclasses converted)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON content of ``path``."""
    return json.loads(Path(path).read_text())


def file_digest(path: str | os.PathLike[str], length: int = 16) -> str:
    """SHA-256 of a file's bytes (first ``length`` hex digits): names cached results and engines."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)


def versions() -> dict[str, str]:
    """Versions of the packages that decide results (only those already installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("yolo-mpq", "torch", "ultralytics", "brevitas", "nvidia-modelopt", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "optuna", "pycocotools", "numpy", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    """Versions, machine and accelerators, for ``env.json``."""
    env: dict[str, Any] = {"versions": versions(), "machine": platform.machine(),
                           "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    except Exception:  # noqa: BLE001
        env["ort_providers"] = []
    try:
        import torch

        env["cuda"] = torch.cuda.is_available()
        if env["cuda"]:
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        env["cuda"] = False
    return env
