"""ONNX Runtime sessions shared by the evaluators: providers, fallback, checks of the model's I/O.

:func:`open_session` creates an ``InferenceSession`` with quiet logging and the asked-for
thread count, takes the providers in the study's order and records which one is actually
used. Providers this onnxruntime build does not have are dropped; the CPU provider is
appended as the fallback unless ``disable_cpu_fallback`` is set, in which case a machine
without any of the asked-for accelerators is an error that says so (and ORT's own silent
CPU fallback is turned off with ``session.disable_cpu_ep_fallback``).

:func:`check_image_input` and :func:`detect_layout` turn a model whose input or output is
not what a YOLO detector at the study's image size looks like into an error saying what
was expected.
"""

from __future__ import annotations

import difflib
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.errors import ModelFormatError, ProviderError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
LAYOUT_END2END = "end2end"
LAYOUT_RAW = "raw"
STRIDES = (8, 16, 32)

Dim = int | str | None


@dataclass(frozen=True)
class ModelIO:
    """The input and outputs of an ONNX model as ONNX Runtime reports them."""

    input_name: str
    input_shape: tuple[Dim, ...]
    input_type: str
    output_names: tuple[str, ...]
    output_shapes: tuple[tuple[Dim, ...], ...]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was exported with, or ``None`` when the batch is dynamic."""
        dim = self.input_shape[0] if self.input_shape else None
        return dim if isinstance(dim, int) and dim > 0 else None


@dataclass(frozen=True)
class SessionReport:
    """Which providers were asked for, which exist here, and which one runs the model."""

    requested: tuple[str, ...]
    available: tuple[str, ...]
    used: tuple[str, ...]
    provider: str
    device: str
    fallback: bool
    threads: int | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return {"requested": list(self.requested), "available": list(self.available), "used": list(self.used),
                "provider": self.provider, "device": self.device, "fallback": self.fallback,
                "threads": self.threads, "notes": list(self.notes)}


def cpu_name() -> str:
    """The CPU model name (Linux ``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_providers(requested: Sequence[str], *, disable_cpu_fallback: bool = False,
                      available: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Providers to hand to ONNX Runtime, in the asked-for order, and notes on what was dropped.

    Raises:
        ProviderError: an unknown provider name, or (with ``disable_cpu_fallback``) none of the
            asked-for non-CPU providers exists in this onnxruntime build.
    """
    import onnxruntime as ort

    known = list(ort.get_all_providers())
    avail = list(available if available is not None else ort.get_available_providers())
    requested = list(requested) or [CPU]
    for name in requested:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ProviderError(f"unknown ONNX Runtime provider '{name}'{hint} (known: {', '.join(known)})")
    chosen = [p for p in requested if p in avail]
    missing = [p for p in requested if p not in avail]
    notes = [f"{p} is not available in onnxruntime {ort.__version__} here (available: {', '.join(avail)})"
             for p in missing]
    if disable_cpu_fallback:
        chosen = [p for p in chosen if p != CPU]
        if not chosen:
            raise ProviderError(
                f"disable_cpu_fallback is set, but none of the asked-for accelerator providers "
                f"{[p for p in requested if p != CPU] or requested} is available here (this onnxruntime "
                f"{ort.__version__} has {', '.join(avail)}); run on a machine with a GPU and onnxruntime-gpu, "
                "or set evaluation.disable_cpu_fallback: false to allow the CPU")
    elif CPU not in chosen:
        chosen.append(CPU)
        if missing:
            notes.append(f"falling back to {CPU}")
    return chosen, notes


def _default_options(name: str, cache_dir: Path | None) -> dict[str, Any]:
    """Provider options: TensorRT EP with FP16 + INT8 (Q/DQ graphs) and an engine cache.

    Option names as in onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html
    (``OrtTensorRTProviderOptions``: trt_fp16_enable, trt_int8_enable, trt_engine_cache_enable,
    trt_engine_cache_path).
    """
    if name == TENSORRT:
        opts: dict[str, Any] = {"trt_fp16_enable": True, "trt_int8_enable": True}
        if cache_dir is not None:
            path = cache_dir / "ort-tensorrt"
            path.mkdir(parents=True, exist_ok=True)
            opts.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(path)})
        return opts
    return {}


def _device_of(provider: str, options: Mapping[str, Any]) -> str:
    if provider in (CUDA, TENSORRT):
        return f"cuda:{options.get('device_id', 0)}"
    if provider == CPU:
        return f"cpu ({cpu_name()}, {os.cpu_count()} logical cores)"
    return provider.removesuffix("ExecutionProvider").lower()


def open_session(model: str | os.PathLike[str] | bytes, *, providers: Sequence[str] = (CPU,),
                 threads: int | None = None, disable_cpu_fallback: bool = False, source: str | None = None,
                 cache_dir: Path | None = None,
                 provider_options: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, SessionReport, ModelIO]:
    """Create an ONNX Runtime session for ``model`` (a path, or serialized bytes named by ``source``).

    Raises:
        ModelFormatError: the file is missing, empty, corrupt or not loadable by ONNX Runtime.
        ProviderError: see :func:`resolve_providers`; also when a GPU provider was asked for with
            ``disable_cpu_fallback`` but failed to start.
    """
    import onnxruntime as ort

    label = source or (str(model) if not isinstance(model, bytes) else "<in-memory ONNX>")
    if not isinstance(model, bytes):
        path = Path(model)
        if not path.is_file():
            raise ModelFormatError(f"ONNX model not found: {path}")
        if path.stat().st_size == 0:
            raise ModelFormatError(f"{path}: the file is empty; expected an ONNX model (re-export it)")
    chosen, notes = resolve_providers(providers, disable_cpu_fallback=disable_cpu_fallback)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    if disable_cpu_fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    opts = [dict((provider_options or {}).get(p) or _default_options(p, cache_dir)) for p in chosen]
    try:
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=so,
                                    providers=chosen, provider_options=opts)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind exception types
        kind = type(exc).__name__
        msg = str(exc).splitlines()[0][:400]
        if disable_cpu_fallback and kind not in ("InvalidProtobuf", "NoSuchFile"):
            raise ProviderError(f"{label}: ONNX Runtime could not run the graph on {chosen} with the CPU fallback "
                                f"disabled ({kind}: {msg}); allow it with evaluation.disable_cpu_fallback: "
                                "false") from None
        if kind in ("InvalidProtobuf", "InvalidGraph", "Fail", "NotImplemented", "RuntimeException"):
            raise ModelFormatError(f"{label}: not a loadable ONNX model ({kind}: {msg}); expected an ONNX file "
                                   "exported by `search` or Ultralytics (re-export it)") from None
        raise
    used = tuple(sess.get_providers())
    first = used[0] if used else CPU
    if disable_cpu_fallback and first == CPU:
        raise ProviderError(f"{label}: the asked-for providers {chosen} failed to start and ONNX Runtime fell back "
                            "to the CPU, which disable_cpu_fallback forbids (is a GPU visible to this process?)")
    requested = tuple(providers) or (CPU,)
    report = SessionReport(requested=requested, available=tuple(ort.get_available_providers()), used=used,
                           provider=first, device=_device_of(first, opts[chosen.index(first)] if first in chosen
                                                             else {}),
                           fallback=first != requested[0], threads=threads, notes=tuple(notes))
    inp = sess.get_inputs()
    if len(inp) != 1:
        raise ModelFormatError(f"{label}: has {len(inp)} inputs ({', '.join(i.name for i in inp)}); expected one "
                               "image input (N, 3, H, W)")
    io = ModelIO(input_name=inp[0].name, input_shape=tuple(inp[0].shape), input_type=inp[0].type,
                 output_names=tuple(o.name for o in sess.get_outputs()),
                 output_shapes=tuple(tuple(o.shape) for o in sess.get_outputs()))
    return sess, report, io


def check_image_input(io: ModelIO, imgsz: int, source: str) -> int | None:
    """Check that the input is ``(N, 3, imgsz, imgsz)`` float; return the fixed batch size or ``None``.

    Raises:
        ModelFormatError: naming the input's actual shape or type and the expected one.
    """
    shape = io.input_shape
    expected = f"(N, 3, {imgsz}, {imgsz}) float32 for the study's imgsz {imgsz}"
    if len(shape) != 4:
        raise ModelFormatError(f"{source}: input '{io.input_name}' has shape {list(shape)}; expected {expected}")
    if io.input_type not in ("tensor(float)", "tensor(float16)"):
        raise ModelFormatError(f"{source}: input '{io.input_name}' is {io.input_type}; expected {expected}")
    c, h, w = shape[1], shape[2], shape[3]
    bad = [(what, d, want) for what, d, want in (("channels", c, 3), ("height", h, imgsz), ("width", w, imgsz))
           if isinstance(d, int) and d != want]
    if bad:
        what = ", ".join(f"{n} {d} (expected {want})" for n, d, want in bad)
        raise ModelFormatError(f"{source}: input '{io.input_name}' has shape {list(shape)}: {what}; expected "
                               f"{expected} (re-export the model at imgsz {imgsz}, or set the study's imgsz to "
                               f"match the model)")
    return io.fixed_batch


def anchors_for(imgsz: int, strides: Sequence[int] = STRIDES) -> int:
    """Number of anchor points of a YOLO head at ``imgsz`` (e.g. 8400 at 640, 756 at 192)."""
    return sum((imgsz // s) ** 2 for s in strides)


def detect_layout(shape: Sequence[Dim], *, num_classes: int, imgsz: int, source: str) -> str:
    """``end2end`` for ``(N, K, 6)``, ``raw`` for ``(N, 4 + classes, anchors)``; otherwise an error.

    Raises:
        ModelFormatError: naming the output shape and both layouts that would be right.
    """
    anchors = anchors_for(imgsz)
    expected = (f"expected YOLOv10 end-to-end (N, max_det, 6) rows [x1, y1, x2, y2, score, class] or raw "
                f"(N, 4 + {num_classes} = {4 + num_classes}, {anchors} anchors) for a {num_classes}-class model "
                f"at imgsz {imgsz}")
    if len(shape) != 3:
        raise ModelFormatError(f"{source}: output has shape {list(shape)}; {expected}")
    d1, d2 = shape[1], shape[2]
    if d2 == 6 and d1 != 4 + num_classes:
        return LAYOUT_END2END
    if d1 == 4 + num_classes and (not isinstance(d2, int) or d2 == anchors or d2 > 6):
        return LAYOUT_RAW
    if d2 == 6:
        return LAYOUT_END2END
    raise ModelFormatError(f"{source}: output has shape {list(shape)}; {expected}")
