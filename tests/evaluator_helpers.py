"""Shared, session-cached artifacts for the evaluator tests: exported ONNX variants of the demo model."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

_ROOT: Path | None = None
_CACHE: dict[str, Any] = {}


def workdir() -> Path:
    """One temporary folder per test session for exported models and caches."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="yolo-mpq-evaluators-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def cached(key: str, build: Any) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def export(module: Any, name: str, imgsz: int, *, batch: int | None = None) -> Path:
    """Export ``module`` once per session: dynamic batch, or a fixed ``batch``."""

    def build() -> Path:
        import warnings

        import torch

        from mpq.model import export_onnx

        path = workdir() / f"{name}.onnx"
        if batch is None:
            return export_onnx(module, path, imgsz)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros(batch, 3, imgsz, imgsz),), str(path), opset_version=17,
                              input_names=["images"], output_names=["output0"], dynamo=False)
        return path

    return cached(f"onnx:{name}", build)
