"""Errors raised by the evaluators; each names the file or setting at fault and what is expected."""

from __future__ import annotations

from mpq.errors import UserError


class EvaluatorError(UserError):
    """An evaluation that cannot run as asked."""


class ModelFormatError(EvaluatorError):
    """An ONNX file that cannot be loaded, or whose input/output is not what the evaluator expects."""


class ProviderError(EvaluatorError):
    """Asked-for ONNX Runtime providers that this machine or build does not have."""


class EvaluatorUnavailable(EvaluatorError):
    """An evaluator whose runtime (TensorRT, CUDA) is not installed or has no device here.

    ``reason`` says what is missing; tests use it as their skip reason.
    """

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)
