"""Spec sections that the backends and evaluators read, and the base model of every section.

Every section is a frozen pydantic model with ``extra="forbid"``, so a typo in a study file
fails loudly and names the key. The search application's study spec
composes these with its own sections.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from mpq.assignment import Precision


class Section(BaseModel):
    """Base of every spec section: frozen, unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def parse_precision(value: Any) -> Precision:
    """A precision from ``"W4A8"``, ``[4, 8]`` or a :class:`Precision`."""
    if isinstance(value, Precision):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return Precision(int(value[0]), int(value[1]))
    return Precision.parse(str(value))


#: A spec field holding a precision, written as ``"W4A8"``.
PrecisionField = Annotated[Precision, BeforeValidator(parse_precision), PlainSerializer(str, return_type=str)]


class BackendOptions(Section):
    """Base of a quantizer backend's options (the spec's ``backend`` section); ``name`` picks the backend."""

    name: str


class EvaluationSpec(Section):
    """COCO accuracy of an ONNX model through ONNX Runtime."""

    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"],
                                 description="ONNX Runtime providers in order of preference.")
    disable_cpu_fallback: bool = Field(default=False, description="Fail instead of running on the CPU.")
    conf: float = Field(default=0.001, ge=0.0, le=1.0)
    iou: float = Field(default=0.7, gt=0.0, le=1.0)
    max_det: int = Field(default=300, gt=0)
    batch_size: int = Field(default=8, gt=0, description="Images per session.run where the model allows.")
    threads: int | None = Field(default=None, gt=0, description="ORT intra-op threads (None: ORT default).")


class LatencySpec(Section):
    """How latency is measured for the latency objective."""

    engine: Literal["ort", "tensorrt"] = "ort"
    providers: list[str] | None = Field(default=None, description="Defaults to evaluation.providers.")
    warmup: int = Field(default=10, ge=0)
    runs: int = Field(default=50, gt=0)
    batch_size: int = Field(default=1, gt=0)
    threads: int | None = Field(default=None, gt=0, description="ORT intra-op threads (None: ORT's default, one "
                                "per physical core).")
    block: int = Field(default=20, ge=2, description="ort with reference float: consecutive runs of one model per "
                       "block (the first untimed) when the trial and float alternate, so that neither is timed while "
                       "the other's thread pool still spins on the same cores.")
    fp16: bool = Field(default=True, description="TensorRT: allow FP16 kernels beside INT8.")
    reference: Literal["float", "none"] = Field(
        default="float", description="ort: time every trial's model in alternating blocks with the float model and "
        "report its latency as (its ratio to float, measured in the same window) x the float baseline's "
        "milliseconds, so that a CPU whose speed drifts (shared machines, frequency boosting) does not "
        "reorder trials measured minutes apart; the raw milliseconds are kept too. none: raw only.")


DeployTarget = Literal["ort-cpu", "tensorrt", "qcdq"]
#: The deployment targets every trial's ONNX can be lowered for (``quantizers.lowering``).
DEPLOY_TARGETS: tuple[str, ...] = ("ort-cpu", "tensorrt", "qcdq")


class DeploySpec(Section):
    """Where the quantized models are deployed (the spec's ``deploy`` section); every trial's ONNX is lowered for it.

    - ``ort-cpu``: ONNX Runtime on a CPU. A8 layers become the ``DQ -> Conv -> Q`` units ONNX
      Runtime fuses into ``QLinearConv`` (u8 activations, s8 per-channel weights, int32 bias,
      a calibrated quantizer on the convolution's output); weight-only layers hold their
      quantized weights as float values of the grid (no per-run dequantization).
    - ``tensorrt``: TensorRT explicit quantization (symmetric int8 Q/DQ on inputs and weights,
      zero point 0, per-channel weights on axis 0, nothing between a weight and its DQ).
    - ``qcdq``: the backend's own export, unchanged (the research format: fake quantization
      that ONNX Runtime runs slower than float).
    """

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
    int8_silu: bool = Field(
        default=True, description="ort-cpu: where an A8 convolution's output goes through SiLU into A8 layers only, "
        "quantize the Sigmoid's output (its exact range) so that ONNX Runtime runs the SiLU as QLinearSigmoid + "
        "QLinearMul on integers, the next layers' input quantizer being the Mul's output quantizer; false: the "
        "SiLU runs in float between a DequantizeLinear and a QuantizeLinear.")
    export: Literal["emit", "trace"] = Field(
        default="emit", description="How a trial's Q/DQ graph is written before it is lowered (ort-cpu, tensorrt). "
        "emit: the backend's quantizers (integers, scales, calibrated ranges) are written into the float model's ONNX "
        "by graph surgery, without tracing (a fraction of a second); trace: through the backend's own torch export "
        "(Brevitas export_onnx_qcdq: seconds per trial, more with every A8 layer). Both give the same file (tested); "
        "a backend or quantizer emission cannot write is traced. qcdq always traces (the backend's own format).")
    int8_ops: bool = Field(
        default=True, description="ort-cpu, with int8_silu: keep the activations on uint8 through the ops between "
        "A8 layers that ONNX Runtime runs on integers (Concat -> QLinearConcat, Add -> QLinearAdd; Split, Slice, "
        "MaxPool, Resize, Reshape, Transpose with their Q/DQ dropped) and the SiLU in front of them, where every "
        "input is an 8-bit tensor and every output goes to such ops or to A8 layers. Grids: the one the readers "
        "already quantize to (an A8 layer's input quantizer, a Concat's output), else uint8 min..max on the "
        "calibration images (cached). false: those ops run in float between DequantizeLinear and QuantizeLinear.")
    strict: bool = Field(
        default=False, description="Fail a trial whose lowered file breaks a rule of the target (the rules are "
        "always checked and recorded; by default a broken rule is a warning).")
