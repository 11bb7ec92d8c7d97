"""The ModelOpt ONNX backend's declaration: its options and capabilities (W8A8 or float per Conv).

Imports no framework, so the spec can be validated without ModelOpt or ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from mpq.assignment import Assignment, LayerInfo, Precision
from mpq.options import BackendOptions
from quantizers.base import Capabilities, UnsupportedPrecisionError
from quantizers.modelopt_options import INSTALL_HINT
from quantizers.registry import BackendInfo, register

NAME = "modelopt-onnx"
W8A8 = Precision(8, 8)


def int8_conv_supported(layer: LayerInfo) -> tuple[bool, str]:
    """ModelOpt's INT8 rule for Conv nodes (``find_nodes_from_convs_to_exclude``), on a
    :class:`LayerInfo`: convolutions with fewer than 16 input (per group) or output channels
    are quantized only in the shapes TensorRT has INT8 kernels for."""
    if layer.kind != "Conv2d":
        return False, f"{layer.kind}: this backend quantizes Conv nodes only"
    oc = layer.out_channels
    ic = layer.in_channels // max(layer.groups, 1)
    if oc >= 16 and ic >= 16:
        return True, ""
    square = len(set(layer.kernel)) == 1
    first = layer.index == 0  # the conv that reads the graph input
    if layer.groups == 1 and (oc % 8 == 0 or ic % 8 == 0) and (first or oc >= 16 or ic >= 16) and square:
        return True, ""
    if layer.groups > 1 and oc % 8 == 0 and all(k >= 3 for k in layer.kernel):
        return True, ""
    return False, (f"ModelOpt does not quantize this Conv to INT8 ({ic} input channels per group, {oc} output "
                   f"channels, groups {layer.groups}, kernel {'x'.join(map(str, layer.kernel))})")


@dataclass(frozen=True)
class OnnxInt8Capabilities(Capabilities):
    """W8A8 for the Conv layers ModelOpt's INT8 mode accepts; float for everything else."""

    def supports(self, layer: LayerInfo, precision: Precision) -> bool:
        """W8A8 only for Conv layers ModelOpt's INT8 mode accepts; float always."""
        if precision.is_float:
            return True
        return super().supports(layer, precision) and int8_conv_supported(layer)[0]

    def check(self, layers: Iterable[LayerInfo], assignment: Assignment) -> None:
        """Raise for the first layer ModelOpt's INT8 mode would refuse, then the common checks."""
        layers = list(layers)
        by_name = {lay.name: lay for lay in layers}
        for name, precision in assignment.items():
            lay = by_name.get(name)
            if lay is not None and lay.quantizable and precision in self.allowed(lay.kind):
                ok, why = int8_conv_supported(lay)
                if not ok:
                    raise UnsupportedPrecisionError(self.backend, name, precision, [], why)
        super().check(layers, assignment)  # unknown names, other precisions, fixed layers


CAPABILITIES = OnnxInt8Capabilities(
    backend=NAME,
    precisions={"Conv2d": frozenset({W8A8})},
    notes="ModelOpt ONNX INT8 PTQ: each Conv layer W8A8 (per-channel int8 weights, per-tensor int8 input) "
          "or float; no 4-bit weights, no weight-only or activation-only INT8. Non-Conv ops and the DFL conv "
          "stay float. Weights are ModelOpt's own round-to-nearest: its ONNX PTQ computes the integers inside "
          "quantize() and takes no given weights, so the cached GPTQ rounding of the torch backends "
          "(weight_rounding) does not apply here.",
)


class ModelOptOnnxOptions(BackendOptions):
    """NVIDIA ModelOpt ONNX PTQ: INT8 (W8A8) or float per node, with node exclusions."""

    name: Literal["modelopt-onnx"] = "modelopt-onnx"
    calibration: Literal["max", "entropy"] = Field(
        default="entropy", description="ModelOpt's calibration method (the seeds: max collapsed on CPU, "
        "entropy recovered).")
    high_precision_dtype: Literal["fp32", "fp16"] = Field(
        default="fp32", description="Float type of the non-quantized parts (fp16 runs slower on ORT CPU).")
    calibration_eps: list[str] = Field(
        default_factory=lambda: ["cpu"], min_length=1,
        description="ONNX Runtime providers ModelOpt calibrates with, in order ('cpu', 'cuda:0', 'trt').")
    dq_only: bool = Field(
        default=True, description="Store weights as int8 initializers + DequantizeLinear (ModelOpt's dq_only; "
        "4x smaller) instead of float + QuantizeLinear + DequantizeLinear.")


register(BackendInfo(name=NAME, options=ModelOptOnnxOptions, capabilities=CAPABILITIES,
                     factory="quantizers.modelopt_onnx_backend:ModelOptOnnxBackend", install_hint=INSTALL_HINT,
                     fake_quant=False))
