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
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mpq.assignment import DEFAULT_CANDIDATES, Precision
from mpq.errors import UserError
from mpq.objectives import DEFAULT_OBJECTIVES, ObjectiveName
from mpq.options import BackendOptions, EvaluationSpec, LatencySpec, PrecisionField, Section
from quantizers.registry import backend_info, options_models

DEMO_SCHEME = "demo://"

__all__ = ["BackendSpec", "CalibrationSpec", "DatasetSpec", "EvaluationSpec", "LatencySpec", "SearchSpec",
           "SensitivitySpec", "SpecError", "SpecResult", "StudySpec", "json_schema", "load_spec",
           "validate_spec_file"]


class SpecError(UserError):
    """A study spec with problems; ``problems`` lists each one as ``where: what``."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------
class DatasetSpec(Section):
    """COCO-format evaluation data: an images folder and an instances json."""

    images: SpecPath = Field(description="Folder of the evaluation images (file_name in the json is relative to it).")
    annotations: SpecPath = Field(description="COCO instances json (e.g. instances_val2017.json).")
    max_images: int | None = Field(
        default=None, gt=0, description="Keep the first N image ids in sorted order (seeds: 100).")
    image_ids: SpecPath | None = Field(
        default=None, description="Text file of image ids (one per line, '#' comments); overrides max_images.")


class CalibrationSpec(Section):
    """Unlabelled images used to calibrate activation ranges (and the fidelity proxy)."""

    source: SpecPath = Field(description="A text list of image paths (relative to the list) or a folder.")
    max_images: int = Field(default=64, gt=0, description="Use at most this many images, in list order.")
    batch_size: int = Field(default=16, gt=0)


# The backend section: one options model per registered backend, told apart by ``name``.
if TYPE_CHECKING:
    BackendSpec = BackendOptions
elif len(options_models()) == 1:
    BackendSpec = options_models()[0]
else:
    BackendSpec = Annotated[Union[options_models()], Field(discriminator="name")]  # noqa: UP007


class SensitivitySpec(Section):
    """The per-layer sensitivity sweep."""

    metric: Literal["fidelity", "map", "fisher"] = Field(
        default="fidelity", description="fidelity: label-free agreement with float (default); map: mAP drop "
        "on a labelled subset; fisher: gradient (Fisher/Taylor) score on the detection loss.")
    candidates: list[PrecisionField] | None = Field(
        default=None, description="Low precisions to probe per layer (default: the study's candidates).")
    images: int = Field(default=32, gt=0, description="Images used per probe.")


class SearchSpec(Section):
    """The Optuna multi-objective study."""

    budget: int = Field(default=50, gt=0, description="Number of trials.")
    objectives: list[ObjectiveName] = Field(default_factory=lambda: list(DEFAULT_OBJECTIVES), min_length=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    space: Literal["ranked", "full"] = Field(
        default="ranked", description="ranked: choices driven by the sensitivity order; full: one choice per group.")
    seed_policies: bool = Field(default=True, description="Enqueue top-K and budget-constrained configurations first.")
    max_map_drop: float | None = Field(default=None, ge=0.0, description="Constraint: mAP50-95 drop vs float.")
    storage: str | None = Field(default=None, description="Optuna storage URL (default: SQLite in the run dir).")


class StudySpec(Section):
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
    backend: BackendSpec = Field(default_factory=lambda: backend_info("brevitas").options(name="brevitas"))
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
    def latency_providers(self) -> list[str]:
        """The providers latency is measured on: ``latency.providers``, else ``evaluation.providers``."""
        return list(self.latency.providers or self.evaluation.providers)

    def run_dir(self) -> Path:
        """``runs_dir/<name>`` (default ``./runs/<name>``)."""
        return (Path(self.runs_dir) if self.runs_dir else Path.cwd() / "runs") / self.name

    def to_yaml(self) -> str:
        """The resolved spec as YAML (what ``spec.yaml`` of a run holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------
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
            for option in options_models():
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
    """The YAML mapping of a spec file (a missing file or bad YAML is a :class:`SpecError`)."""
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
    """Validate spec data (paths relative to ``base``); every problem is returned, none raised."""
    try:
        spec = StudySpec.model_validate(data, context={"base": str(base) if base else None})
    except ValidationError as exc:
        return SpecResult(None, _format_errors(exc))
    return SpecResult(spec, _check_files(spec) if check_files else [])


def validate_spec_file(path: str | os.PathLike[str], check_files: bool = True) -> SpecResult:
    """Validate a spec file; every problem is returned, none raised."""
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
    """The JSON schema of study specs."""
    return StudySpec.model_json_schema()
