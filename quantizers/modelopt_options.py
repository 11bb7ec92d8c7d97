"""The ModelOpt (torch) backend's declaration: its options and capabilities.

Imports no framework, so the spec can be validated without ModelOpt or torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mpq.assignment import Precision
from mpq.options import BackendOptions
from quantizers.base import Capabilities
from quantizers.registry import BackendInfo, register

INSTALL_HINT = "install the 'modelopt' extra: pip install -e '.[modelopt]'"

NAME = "modelopt"

#: What ModelOpt can build here and ONNX Runtime can run from the export, per Conv2d/Linear.
SUPPORTED_PRECISIONS: frozenset[Precision] = frozenset(
    Precision(w, a) for w in (4, 8, 16) for a in (8, 16) if (w, a) != (16, 16))

CAPABILITIES = Capabilities(
    backend=NAME,
    precisions={"Conv2d": SUPPORTED_PRECISIONS, "Linear": SUPPORTED_PRECISIONS},
    notes="ModelOpt torch PTQ: per-channel symmetric weights (4 or 8 bits) as integer initializers + "
          "DequantizeLinear (integers by cached float-input GPTQ with ModelOpt's per-channel amax by default, "
          "weight_rounding; loaded as the layer's weights with that amax, which ModelOpt's quantizer maps back "
          "to the same integers), per-tensor INT8 input quantizer for A8 (W16A8 quantizes the input only). "
          "Layers marked not quantizable (the DFL conv) stay float.",
)


class ModelOptOptions(BackendOptions):
    """NVIDIA ModelOpt torch PTQ with per-layer quantizer rules, exported to QDQ ONNX."""

    name: Literal["modelopt"] = "modelopt"
    calibration: Literal["max", "entropy", "percentile"] = Field(
        default="percentile", description="How A8 input ranges are set from the calibration images (ModelOpt's "
        "max calibrator, or its histogram calibrator with percentile or entropy).")
    percentile: float = Field(default=99.999, gt=50.0, le=100.0, description="For calibration: percentile.")
    weight_calibration: Literal["max", "mse"] = Field(
        default="max", description="How per-channel weight ranges are set: max |w|, or ModelOpt's MSE search "
        "(algorithm 'mse': lower weight error, but on the demo model it clips the large weights that matter "
        "and loses more mAP at 4 bits than max; see docs/benchmarks.md).")
    weight_rounding: Literal["gptq", "gpfq", "nearest"] = Field(
        default="gptq", description="How weights become integers once ModelOpt's per-channel ranges are set: "
        "gptq (default) or gpfq minimize each layer's output error on the calibration images with the float "
        "model's inputs, computed once per model, calibration set and weight_calibration for every layer at 4 "
        "and 8 bits and cached (as the brevitas backend does); nearest: ModelOpt's own round to nearest.")
    w4_format: Literal["int8", "int4"] = Field(
        default="int8", description="How 4-bit weights are stored in the ONNX file: int8 initializers holding "
        "values in [-8, 7] (any opset, what TensorRT runs for Conv), or ONNX INT4 initializers (opset 21).")
    opset: int = Field(default=17, ge=13, le=20, description="ONNX opset of the export (legacy exporter; "
                       "w4_format int4 exports at 20 and converts to 21).")


register(BackendInfo(name=NAME, options=ModelOptOptions, capabilities=CAPABILITIES,
                     factory="quantizers.modelopt_backend:ModelOptBackend", install_hint=INSTALL_HINT))
