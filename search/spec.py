"""Study specs: YAML files validated by pydantic (``extra="forbid"``).

A spec says which model, which data, which backend and which search. Every field has a
default that makes sense except the model and the data. Relative paths resolve against
the spec file's folder; ``${VAR}`` and ``${VAR:-default}`` expand from the environment;
``demo://PATH`` points into the bundled offline demo (its weights, or its synthetic
dataset, generated in the cache on first use).

:func:`validate_spec_file` returns every problem at once (unknown keys with the nearest
valid name, bad values, missing files); :func:`load_spec` raises :class:`SpecError`
carrying them.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from search.assignment import DEFAULT_CANDIDATES, Precision
from search.errors import UserError

DEMO_SCHEME = "demo://"


class SpecError(UserError):
    """A study spec with problems; ``problems`` lists each one as ``where: what``."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------
def _parse_precision(value: Any) -> Precision:
    if isinstance(value, Precision):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return Precision(int(value[0]), int(value[1]))
    return Precision.parse(str(value))


PrecisionField = Annotated[Precision, BeforeValidator(_parse_precision), PlainSerializer(str, return_type=str)]

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset ``${VAR}`` without default stays."""

    def repl(m: re.Match[str]) -> str:
        val = os.environ.get(m.group(1))
        if val:
            return val
        return m.group(2) if m.group(2) is not None else m.group(0)

    return _VAR_RE.sub(repl, text)


def resolve_path(value: Any, base: Path | None) -> Path:
    """Resolve a path from a spec: env vars, ``demo://``, then relative to ``base``."""
    text = expand_vars(str(value))
    if text.startswith(DEMO_SCHEME):
        from search.demo import resolve_demo_path

        return resolve_demo_path(text[len(DEMO_SCHEME):])
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return Path(os.path.normpath(path))


def _path_validator(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        return None
    base = (info.context or {}).get("base") if info.context else None
    return resolve_path(value, Path(base) if base else None)


SpecPath = Annotated[Path, BeforeValidator(_path_validator), PlainSerializer(str, return_type=str)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------
class DatasetSpec(_Base):
    """COCO-format evaluation data: an images folder and an instances json."""

    images: SpecPath = Field(description="Folder of the evaluation images (file_name in the json is relative to it).")
    annotations: SpecPath = Field(description="COCO instances json (e.g. instances_val2017.json).")
    max_images: int | None = Field(
        default=None, gt=0, description="Keep the first N image ids in sorted order (seeds: 100).")
    image_ids: SpecPath | None = Field(
        default=None, description="Text file of image ids (one per line, '#' comments); overrides max_images.")


class CalibrationSpec(_Base):
    """Unlabelled images used to calibrate activation ranges (and the fidelity proxy)."""

    source: SpecPath = Field(description="A text list of image paths (relative to the list) or a folder.")
    max_images: int = Field(default=64, gt=0, description="Use at most this many images, in list order.")
    batch_size: int = Field(default=16, gt=0)


class EvaluationSpec(_Base):
    """COCO accuracy of an ONNX model through ONNX Runtime."""

    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"],
                                 description="ONNX Runtime providers in order of preference.")
    disable_cpu_fallback: bool = Field(default=False, description="Fail instead of running on the CPU.")
    conf: float = Field(default=0.001, ge=0.0, le=1.0)
    iou: float = Field(default=0.7, gt=0.0, le=1.0)
    max_det: int = Field(default=300, gt=0)
    batch_size: int = Field(default=8, gt=0, description="Images per session.run where the model allows.")
    threads: int | None = Field(default=None, gt=0, description="ORT intra-op threads (None: ORT default).")


class LatencySpec(_Base):
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


class BrevitasOptions(_Base):
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
    act_calibration: Literal["max", "percentile", "mse"] = Field(
        default="percentile", description="How activation ranges are set from the calibration images.")
    act_percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    act_quant_type: Literal["sym", "asym"] = Field(
        default="sym", description="A8 inputs as int8 with zero point 0 (sym: what TensorRT requires) or "
        "uint8 with a zero point (asym).")
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


class ModelOptOptions(_Base):
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


class ModelOptOnnxOptions(_Base):
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


BackendSpec = Annotated[BrevitasOptions | ModelOptOptions | ModelOptOnnxOptions, Field(discriminator="name")]


class SensitivitySpec(_Base):
    """The per-layer sensitivity sweep."""

    metric: Literal["fidelity", "map", "fisher"] = Field(
        default="fidelity", description="fidelity: label-free agreement with float (default); map: mAP drop "
        "on a labelled subset; fisher: gradient (Fisher/Taylor) score on the detection loss.")
    candidates: list[PrecisionField] | None = Field(
        default=None, description="Low precisions to probe per layer (default: the study's candidates).")
    images: int = Field(default=32, gt=0, description="Images used per probe.")


Objective = Literal["map", "latency", "size", "bops"]
DEFAULT_OBJECTIVES: tuple[Objective, ...] = ("map", "latency")


class SearchSpec(_Base):
    """The Optuna multi-objective study."""

    budget: int = Field(default=50, gt=0, description="Number of trials.")
    objectives: list[Objective] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVES), min_length=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    space: Literal["ranked", "full"] = Field(
        default="ranked", description="ranked: choices driven by the sensitivity order; full: one choice per group.")
    seed_policies: bool = Field(default=True, description="Enqueue top-K and budget-constrained configurations first.")
    max_map_drop: float | None = Field(default=None, ge=0.0, description="Constraint: mAP50-95 drop vs float.")
    storage: str | None = Field(default=None, description="Optuna storage URL (default: SQLite in the run dir).")


class StudySpec(_Base):
    """A whole study: model, data, backend, evaluation and search."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Names the run directory.")
    model: SpecPath = Field(description="Ultralytics checkpoint (.pt) or architecture (.yaml).")
    imgsz: int = Field(default=640, ge=32, description="Square input size (multiple of 32).")
    granularity: Literal["layer", "block"] = "layer"
    candidates: list[PrecisionField] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES), min_length=1)
    keep_float: list[str] = Field(
        default_factory=list, description="Glob patterns of layer names never quantized.")
    dataset: DatasetSpec
    calibration: CalibrationSpec
    backend: BackendSpec = Field(default_factory=BrevitasOptions)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    sensitivity: SensitivitySpec = Field(default_factory=SensitivitySpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    device: str = Field(default="auto", description="Torch device for calibration: auto, cpu, cuda, cuda:N.")
    runs_dir: SpecPath | None = Field(
        default=None, description="Where run directories are made (default: ./runs in the working directory).")

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_shorthand(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @field_validator("imgsz")
    @classmethod
    def _imgsz_multiple(cls, v: int) -> int:
        if v % 32:
            near = max(32, round(v / 32) * 32)
            raise ValueError(f"must be a multiple of 32 (the model's largest stride), e.g. {near}")
        return v

    @field_validator("candidates")
    @classmethod
    def _no_float_candidate(cls, v: list[Precision]) -> list[Precision]:
        v = [p for p in v if not p.is_float]
        if not v:
            raise ValueError("needs at least one low precision (float W16A16 is always allowed)")
        return sorted(set(v))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _sensitivity_candidates(self) -> StudySpec:
        extra = [str(p) for p in (self.sensitivity.candidates or []) if p not in self.candidates]
        if extra:
            raise ValueError(f"sensitivity.candidates {extra} are not among the study's candidates "
                             f"{[str(p) for p in self.candidates]}")
        return self

    # -- derived ----------------------------------------------------------------------------
    @property
    def sweep_candidates(self) -> list[Precision]:
        return list(self.sensitivity.candidates or self.candidates)

    @property
    def latency_providers(self) -> list[str]:
        return list(self.latency.providers or self.evaluation.providers)

    def run_dir(self) -> Path:
        return (Path(self.runs_dir) if self.runs_dir else Path.cwd() / "runs") / self.name

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------
def _model_fields(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def _submodel_at(loc: Iterable[Any]) -> type[BaseModel] | None:
    """The pydantic model class that owns the given location (for key suggestions)."""
    cls: type[BaseModel] | None = StudySpec
    for part in loc:
        if cls is None or not isinstance(part, str):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            # discriminated-union tags appear in locations ('brevitas', ...)
            if cls is StudySpec:
                return None
            for option in (BrevitasOptions, ModelOptOptions, ModelOptOnnxOptions):
                if part == option.model_fields["name"].default:
                    cls = option
                    break
            else:
                return None
            continue
        ann = field.annotation
        nxt = None
        for candidate in (ann, *getattr(ann, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                nxt = candidate
                break
        cls = nxt
    return cls


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"]]
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            owner = _submodel_at(loc[:-1])
            key = str(loc[-1])
            valid = sorted(owner.model_fields) if owner else []
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            problems.append(f"{where}: unknown key{hint} (valid keys here: {', '.join(valid)})")
        elif err["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg} (got {err.get('input')!r})")
    return problems


def _check_files(spec: StudySpec) -> list[str]:
    problems = []

    def need(where: str, path: Path | None, kind: str, hint: str = "") -> None:
        if path is None:
            return
        ok = path.is_dir() if kind == "dir" else path.is_file() if kind == "file" else path.exists()
        if not ok:
            what = {"dir": "folder", "file": "file"}.get(kind, "file or folder")
            problems.append(f"{where}: {what} not found: {path}{hint}")

    need("model", spec.model, "file", " (an Ultralytics .pt checkpoint or .yaml architecture)")
    if spec.model.suffix not in (".pt", ".yaml", ".yml"):
        problems.append(f"model: {spec.model} must be a .pt checkpoint or a .yaml architecture")
    need("dataset.images", spec.dataset.images, "dir")
    need("dataset.annotations", spec.dataset.annotations, "file", " (a COCO instances json)")
    need("dataset.image_ids", spec.dataset.image_ids, "file")
    need("calibration.source", spec.calibration.source, "any", " (a text list of image paths, or a folder)")
    if spec.search.storage and not re.match(r"^[a-z0-9+]+://", spec.search.storage):
        problems.append(f"search.storage: {spec.search.storage!r} is not a database URL "
                        "(e.g. sqlite:///study.db or postgresql://user@host/db)")
    return problems


@dataclass(frozen=True)
class SpecResult:
    """The outcome of validating a spec file: the spec (if it parsed) and all problems."""

    spec: StudySpec | None
    problems: list[str]


def read_spec_data(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(str(path), ["study spec file not found"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(data, dict):
        raise SpecError(str(path), ["the top level must be a mapping of keys (name, model, dataset, ...)"])
    return data


def validate_spec_data(data: dict[str, Any], base: Path | None, source: str = "spec",
                       check_files: bool = True) -> SpecResult:
    try:
        spec = StudySpec.model_validate(data, context={"base": str(base) if base else None})
    except ValidationError as exc:
        return SpecResult(None, _format_errors(exc))
    return SpecResult(spec, _check_files(spec) if check_files else [])


def validate_spec_file(path: str | os.PathLike[str], check_files: bool = True) -> SpecResult:
    path = Path(path)
    try:
        data = read_spec_data(path)
    except SpecError as exc:
        return SpecResult(None, exc.problems)
    return validate_spec_data(data, path.resolve().parent, str(path), check_files=check_files)


def load_spec(path: str | os.PathLike[str], check_files: bool = True, **overrides: Any) -> StudySpec:
    """Load and validate a spec file; raise :class:`SpecError` listing every problem.

    ``overrides`` are dotted keys (``search.budget=10``) applied before validation.
    """
    path = Path(path)
    data = read_spec_data(path)
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    result = validate_spec_data(data, path.resolve().parent, str(path), check_files=check_files)
    if result.problems or result.spec is None:
        raise SpecError(str(path), result.problems)
    return result.spec


def json_schema() -> dict[str, Any]:
    return StudySpec.model_json_schema()
