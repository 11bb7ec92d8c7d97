"""Quantizer backends: name -> import path, imported only when chosen.

>>> from quantizers import get_backend
>>> backend = get_backend(spec.backend, device="cpu")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from quantizers.base import (
    CalibrationSet,
    Capabilities,
    ExportResult,
    QuantizedModel,
    QuantizerBackend,
    UnsupportedPrecisionError,
    count_qdq_nodes,
)
from search.errors import UserError

BACKENDS: dict[str, str] = {
    "brevitas": "quantizers.brevitas_backend:BrevitasBackend",
    "modelopt": "quantizers.modelopt_backend:ModelOptBackend",
    "modelopt-onnx": "quantizers.modelopt_onnx_backend:ModelOptOnnxBackend",
}

__all__ = [
    "BACKENDS",
    "CalibrationSet",
    "Capabilities",
    "ExportResult",
    "QuantizedModel",
    "QuantizerBackend",
    "UnsupportedPrecisionError",
    "count_qdq_nodes",
    "backend_class",
    "get_backend",
]


def backend_class(name: str) -> Any:
    """The backend class registered under ``name`` (its framework is imported now)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend '{name}'; known backends: {', '.join(BACKENDS)}") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = " (install the 'modelopt' extra: pip install -e '.[modelopt]')" if "modelopt" in name else ""
        raise UserError(f"backend '{name}' cannot be imported: {exc}{extra}") from exc
    return getattr(module, attr)


def get_backend(options: Any, device: str = "cpu", **extra: Any) -> QuantizerBackend:
    """Instantiate the backend for a spec's ``backend`` section (or a bare name).

    ``extra`` keyword arguments (``cache_dir``: where a backend may keep what it computes
    once per model and calibration set; ``progress``: rich progress bars) go to the backends
    whose constructor takes them, and are ignored by the others.
    """
    import inspect

    if isinstance(options, str):
        from search.spec import BrevitasOptions, ModelOptOnnxOptions, ModelOptOptions

        options = {"brevitas": BrevitasOptions, "modelopt": ModelOptOptions,
                   "modelopt-onnx": ModelOptOnnxOptions}.get(options, BrevitasOptions)(name=options)
    cls = backend_class(options.name)
    accepted = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in extra.items() if k in accepted}
    return cls(options=options, device=device, **kwargs)
