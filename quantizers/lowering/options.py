"""The ``deploy`` section of a study spec: which runtime every trial's ONNX is lowered for.

Kept in its own module (pydantic only, no torch, no onnx) so that it can move into the
shared options module of the restructure (``mpq/options.py``) unchanged:

- ``ort-cpu``: ONNX Runtime on a CPU. A8 layers become the ``DQ -> Conv -> Q`` units ONNX
  Runtime fuses into ``QLinearConv`` (u8 activations, s8 per-channel weights, int32 bias,
  a calibrated quantizer on the convolution's output); weight-only layers hold their
  quantized weights as float values of the grid (no per-run dequantization).
- ``tensorrt``: TensorRT explicit quantization (symmetric int8 Q/DQ on inputs and weights,
  zero point 0, per-channel weights on axis 0, nothing between a weight and its DQ).
- ``qcdq``: the backend's own export, unchanged (the research format: fake quantization
  that ONNX Runtime runs slower than float).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeployTarget = Literal["ort-cpu", "tensorrt", "qcdq"]
DEPLOY_TARGETS: tuple[str, ...] = ("ort-cpu", "tensorrt", "qcdq")


class DeploySpec(BaseModel):
    """Where the quantized models are deployed; every trial's ONNX is lowered for it."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    target: DeployTarget = Field(
        default="ort-cpu", description="ort-cpu: ONNX Runtime CPU (A8 layers run as QLinearConv); tensorrt: "
        "TensorRT explicit quantization (Q/DQ, zero point 0); qcdq: the backend's research export, unchanged.")
    output_calibration: Literal["minmax", "percentile", "max"] = Field(
        default="minmax", description="ort-cpu, for backends that cannot model a quantizer on a convolution's "
        "output (modelopt-onnx): how the lowering calibrates it on the calibration images. minmax: uint8 with a "
        "zero point over the min..max seen (ONNX Runtime's own default); percentile / max: symmetric int8 over "
        "the percentile / max of |output|.")
    output_percentile: float = Field(
        default=99.999, gt=50.0, le=100.0, description="Percentile of |output| for output_calibration: percentile.")
    strict: bool = Field(
        default=False, description="Fail a trial whose lowered file breaks a rule of the target (the rules are "
        "always checked and recorded; by default a broken rule is a warning).")
