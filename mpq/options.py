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
    threads: int | None = Field(default=None, gt=0)
    fp16: bool = Field(default=True, description="TensorRT: allow FP16 kernels beside INT8.")
    reference: Literal["float", "none"] = Field(
        default="float", description="ort: time every trial's model in alternation with the float model and "
        "report its latency as (its ratio to float, measured in the same window) x the float baseline's "
        "milliseconds, so that a CPU whose speed drifts (shared machines, frequency boosting) does not "
        "reorder trials measured minutes apart; the raw milliseconds are kept too. none: raw only.")
