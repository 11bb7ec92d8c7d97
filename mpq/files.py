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


def file_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a written artifact was: its name, SHA-256 and size (recorded where the file is written)."""
    path = Path(path)
    return {"file": path.name, "sha256": file_digest(path, 64), "bytes": path.stat().st_size}


def record_mismatch(path: str | os.PathLike[str], record: Any) -> str | None:
    """Why the file at ``path`` is not the one ``record`` (:func:`file_record`) describes, or ``None``.

    A missing record counts as a mismatch: a file whose content cannot be checked is not reused.
    """
    path = Path(path)
    if not isinstance(record, dict) or "sha256" not in record or "bytes" not in record:
        return "no recorded digest (written before artifacts were checked)"
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes, {record['bytes']} recorded (truncated or replaced)"
    if file_digest(path, 64) != record["sha256"]:
        return "content differs from its recorded SHA-256"
    return None


def json_digest(data: Any) -> str:
    """SHA-256 of JSON data in canonical form (sorted keys): seals a JSON file's content."""
    text = json.dumps(data, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def write_sealed_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` with a ``sha256`` of its own content, so :func:`read_sealed_json` finds any change."""
    return write_json(path, {**data, "sha256": json_digest(data)})


def read_sealed_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The data :func:`write_sealed_json` wrote; ``ValueError`` saying why when the file is not intact."""
    try:
        data = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable ({exc})") from None
    if not isinstance(data, dict) or "sha256" not in data:
        raise ValueError("no recorded digest (written before results were checked)")
    seal = data.pop("sha256")
    if json_digest(data) != seal:
        raise ValueError("content differs from its recorded SHA-256")
    return data


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
