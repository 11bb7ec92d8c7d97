"""The Brevitas backend's declaration: its options (the spec's ``backend`` section) and capabilities.

Imports no framework, so the spec can be validated without Brevitas or torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mpq.assignment import Precision
from mpq.options import BackendOptions
from quantizers.base import Capabilities
from quantizers.registry import BackendInfo, register

NAME = "brevitas"

#: What this backend builds for every Conv2d and Linear (float W16A16 is always allowed).
SUPPORTED_PRECISIONS: frozenset[Precision] = frozenset(
    Precision(w, a) for w in (4, 8, 16) for a in (8, 16) if (w, a) != (16, 16))

CAPABILITIES = Capabilities(
    backend=NAME,
    precisions={"Conv2d": SUPPORTED_PRECISIONS, "Linear": SUPPORTED_PRECISIONS},
    notes="per-channel symmetric weights (4 or 8 bits, narrow range; integers by cached float-input GPTQ by "
          "default, weight_rounding); per-tensor INT8 input quantizer for A8; "
          "W16A8 quantizes the input only. Layers marked not quantizable (the DFL conv) stay float.",
)


class BrevitasOptions(BackendOptions):
    """Brevitas PTQ: per-channel weight scales, INT8 input quantizers, QCDQ export."""

    name: Literal["brevitas"] = "brevitas"
    weight_scale: Literal["max", "mse", "percentile"] = Field(
        default="mse", description="How 4-bit weight scales are chosen (mse: error-minimizing search).")
    weight_scale_8bit: Literal["max", "mse", "percentile"] = Field(
        default="max", description="Scale method for 8-bit weights (max is near-lossless at 8 bits).")
    weight_granularity: Literal["per_channel", "per_tensor"] = Field(
        default="per_channel", description="One weight scale per output channel (default) or per layer "
        "(per_tensor: what the seeds did for 4 bits; only for comparison).")
    weight_percentile: float = Field(
        default=99.9, gt=50.0, le=100.0, description="Percentile of |w| per channel for weight_scale: percentile.")
    act_calibration: Literal["auto", "max", "percentile", "mse"] = Field(
        default="auto", description="How activation ranges (A8 inputs, and outputs for deploy.target ort-cpu) are "
        "set from the calibration images. auto: MSE-clipped inputs and min..max outputs for ort-cpu, percentile "
        "otherwise.")
    act_percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    act_quant_type: Literal["auto", "sym", "asym"] = Field(
        default="auto", description="A8 activations as int8 with zero point 0 (sym: what TensorRT requires) or "
        "uint8 with a zero point (asym: what ONNX Runtime's CPU kernels take at no cost). auto: asym for "
        "deploy.target ort-cpu, sym otherwise.")
    bias_correction: bool = True
    weight_rounding: Literal["gptq", "gpfq", "nearest"] = Field(
        default="gptq", description="How weights become integers once the scales are chosen: gptq (default) "
        "or gpfq minimize each layer's output error on the calibration images with the float model's inputs, "
        "computed once per model, calibration set and scale options for every layer at 4 and 8 bits and "
        "cached (in memory and in the run's cache/weights folder), so a trial costs no more than nearest; "
        "nearest: round to nearest (the weight-MSE optimum). Ignored when gptq or gpfq is on (those rework "
        "the float weights sequentially in every build).")
    gptq: bool = Field(default=False, description="Sequential Brevitas GPTQ in every build (slow; each layer "
                       "sees the inputs of the already quantized layers before it).")
    gpfq: bool = Field(default=False, description="Sequential Brevitas GPFQ in every build (slower still).")
    optimize_onnx: bool = Field(default=True, description="Run onnxoptimizer passes that keep every Q/DQ node.")

    @model_validator(mode="after")
    def _one_gpxq(self) -> BrevitasOptions:
        if self.gptq and self.gpfq:
            raise ValueError("gptq and gpfq are alternatives; enable at most one")
        return self


register(BackendInfo(name=NAME, options=BrevitasOptions, capabilities=CAPABILITIES,
                     factory="quantizers.brevitas_backend:BrevitasBackend"))
