"""Quantizer backends: the contract (:mod:`quantizers.base`) and the registry of backends.

A backend is looked up by name and its framework is imported only when it is built::

    from quantizers import get_backend
    backend = get_backend(spec.backend, device="cpu")       # or get_backend("brevitas")
    qmodel = backend.materialize(model, assignment, calib)  # a fake-quant model
    backend.export(qmodel, "model.onnx")                    # Q/DQ ONNX + model.onnx.json

Every backend passes the contract suite of :mod:`quantizers.testing`.
"""

from __future__ import annotations

from mpq.data import CalibrationSet
from quantizers.base import (
    Capabilities,
    ExportResult,
    QuantizedModel,
    QuantizerBackend,
    UnsupportedPrecisionError,
    count_qdq_nodes,
)
from quantizers.registry import BackendInfo, backend_class, backend_info, backends, get_backend, register

__all__ = [
    "BackendInfo",
    "CalibrationSet",
    "Capabilities",
    "ExportResult",
    "QuantizedModel",
    "QuantizerBackend",
    "UnsupportedPrecisionError",
    "backend_class",
    "backend_info",
    "backends",
    "count_qdq_nodes",
    "get_backend",
    "register",
]
