"""TensorRT latency of a (Q/DQ) ONNX model: build an engine, cache it, time it with CUDA events.

Written against the TensorRT 10 Python API (name-based I/O: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; networks always explicit batch) and 11 (no
builder precision flags: a Q/DQ graph is built with explicit quantization and the flags are
set only where they exist).

CUDA memory, stream and timing events come from ``torch.cuda``. Engines are cached under
``cache_dir/tensorrt/`` by the ONNX file's SHA-256, the batch size, the flags, the TensorRT
version and the GPU name. ``tensorrt`` is imported only inside functions: ``search --help``
and CPU-only machines never load it; where it cannot run, :func:`tensorrt_unavailable_reason`
says why and :meth:`TensorRTLatencyEvaluator.evaluate` raises :class:`EvaluatorUnavailable`.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from evaluators.base import LatencyResult
from evaluators.errors import EvaluatorError, EvaluatorUnavailable, ModelFormatError
from evaluators.latency import summarize_ms
from mpq.files import file_digest


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT latency cannot be measured here, or ``None`` when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return (f"TensorRT is not installed ({exc}); it needs an NVIDIA GPU machine: "
                "pip install tensorrt (downloads from NVIDIA's index)")
    except Exception as exc:  # noqa: BLE001 - a broken install raises OSError etc.
        return f"TensorRT is installed but cannot be imported: {type(exc).__name__}: {exc}"
    try:
        import torch
    except ImportError:
        return "torch is not installed (CUDA buffers and events come from torch.cuda)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch on this machine (TensorRT needs one)"
    return None


def tensorrt_available() -> bool:
    """True when TensorRT and a CUDA GPU are usable here."""
    return tensorrt_unavailable_reason() is None


def engine_cache_name(onnx_digest: str, *, batch: int, imgsz: int, fp16: bool, int8: bool, trt_version: str,
                      gpu: str) -> str:
    """File name of a cached engine: everything the engine depends on."""
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() or "gpu"
    flags = "".join(f for f, on in (("fp16", fp16), ("int8", int8)) if on) or "fp32"
    return f"{onnx_digest}-b{batch}-s{imgsz}-{flags}-trt{trt_version}-{gpu_slug}.engine"


def has_qdq(onnx_path: str | os.PathLike[str]) -> bool:
    """Whether the graph has QuantizeLinear/DequantizeLinear nodes (explicit quantization)."""
    from evaluators.onnx_graph import load

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in load(onnx_path).graph.node)


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "BF16": torch.bfloat16}
    for name, tdt in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return tdt
    raise EvaluatorError(f"TensorRT I/O tensor of type {dtype} is not supported by this evaluator")


class TensorRTLatencyEvaluator:
    """Latency of a TensorRT engine built from an ONNX file (Q/DQ -> INT8, float layers FP16).

    Args:
        cache_dir: engines are cached in ``cache_dir / "tensorrt"`` (default: the project cache).
        imgsz: input size (square).
        warmup: untimed runs.
        runs: timed runs (CUDA events around each ``execute_async_v3``).
        batch_size: images per run (the optimization profile is fixed at this size).
        fp16: allow FP16 kernels (TensorRT 10 ``BuilderFlag.FP16``).
        int8: allow INT8 kernels for Q/DQ graphs (``BuilderFlag.INT8``).
        workspace_gib: builder workspace memory pool limit.
        device: CUDA device index.
    """

    engine = "tensorrt"

    def __init__(self, *, cache_dir: str | os.PathLike[str] | None = None, imgsz: int = 640, warmup: int = 10,
                 runs: int = 50, batch_size: int = 1, fp16: bool = True, int8: bool = True,
                 workspace_gib: float = 4.0, device: int = 0):
        if runs < 1 or warmup < 0 or batch_size < 1:
            raise ValueError("runs and batch_size must be >= 1, warmup >= 0")
        if cache_dir is None:
            from mpq.env import cache_dir as project_cache

            cache_dir = project_cache()
        self.cache_dir = Path(cache_dir) / "tensorrt"
        self.imgsz = int(imgsz)
        self.warmup, self.runs, self.batch_size = int(warmup), int(runs), int(batch_size)
        self.fp16, self.int8 = bool(fp16), bool(int8)
        self.workspace_gib = float(workspace_gib)
        self.device = int(device)

    # -- engine -------------------------------------------------------------------------------
    def build_engine(self, onnx_path: str | os.PathLike[str]) -> tuple[bytes, Path, bool, float]:
        """Serialized engine for ``onnx_path`` (from the cache, or built and cached).

        Returns ``(engine bytes, cache path, was cached, build seconds)``.
        """
        import tensorrt as trt
        import torch

        from mpq.files import atomic_path

        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ModelFormatError(f"ONNX model not found: {onnx_path}")
        qdq = has_qdq(onnx_path)
        int8 = self.int8 and qdq
        name = engine_cache_name(file_digest(onnx_path), batch=self.batch_size, imgsz=self.imgsz, fp16=self.fp16,
                                 int8=int8, trt_version=trt.__version__,
                                 gpu=torch.cuda.get_device_name(self.device))
        path = self.cache_dir / name
        if path.is_file():
            return path.read_bytes(), path, True, 0.0
        t0 = time.perf_counter()
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: networks are always explicit batch
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelFormatError(f"{onnx_path}: TensorRT's ONNX parser rejected it: {errors[:600]}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        if self.fp16 and hasattr(trt.BuilderFlag, "FP16"):  # removed in TensorRT 11 (strong typing)
            config.set_flag(trt.BuilderFlag.FP16)
        if int8 and hasattr(trt.BuilderFlag, "INT8"):
            config.set_flag(trt.BuilderFlag.INT8)
        if network.num_inputs != 1:
            raise ModelFormatError(f"{onnx_path}: has {network.num_inputs} inputs; expected one image input")
        inp = network.get_input(0)
        shape = (self.batch_size, 3, self.imgsz, self.imgsz)
        dims = tuple(inp.shape)
        if len(dims) != 4 or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
            raise ModelFormatError(f"{onnx_path}: input '{inp.name}' has shape {list(dims)}; expected "
                                   f"{list(shape)} (batch {self.batch_size}, imgsz {self.imgsz})")
        if any(d == -1 for d in dims):
            profile = builder.create_optimization_profile()
            profile.set_shape(inp.name, shape, shape, shape)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EvaluatorError(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
        data = bytes(serialized)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return data, path, False, time.perf_counter() - t0

    # -- timing -------------------------------------------------------------------------------
    def evaluate(self, onnx_path: str | os.PathLike[str]) -> LatencyResult:
        """Build (or load) the engine and time it; raises :class:`EvaluatorUnavailable` without TensorRT/CUDA."""
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise EvaluatorUnavailable(f"TensorRT latency cannot be measured here: {reason}")
        import tensorrt as trt
        import torch

        data, path, cached, build_s = self.build_engine(onnx_path)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EvaluatorError(f"{path}: TensorRT could not deserialize the cached engine (delete it to rebuild)")
        context = engine.create_execution_context()
        device = torch.device("cuda", self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        shape = (self.batch_size, 3, self.imgsz, self.imgsz)
        for n in inputs:
            context.set_input_shape(n, shape)
        buffers: dict[str, Any] = {}
        gen = torch.Generator(device=device).manual_seed(0)
        for n in names:
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(n))
            tshape = tuple(context.get_tensor_shape(n))
            if n in inputs and dtype.is_floating_point:
                buf = torch.rand(tshape, generator=gen, device=device).to(dtype)
            else:
                buf = torch.zeros(tshape, dtype=dtype, device=device)
            buffers[n] = buf
            context.set_tensor_address(n, buf.data_ptr())
        stream = torch.cuda.Stream(device=device)
        handle = stream.cuda_stream
        with torch.cuda.device(device):
            for _ in range(self.warmup):
                if not context.execute_async_v3(handle):
                    raise EvaluatorError(f"{onnx_path}: TensorRT execution failed")
            stream.synchronize()
            times = []
            for _ in range(self.runs):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                context.execute_async_v3(handle)
                end.record(stream)
                end.synchronize()
                times.append(float(start.elapsed_time(end)))
        stats = summarize_ms(times)
        gpu = torch.cuda.get_device_name(self.device)
        return LatencyResult(
            engine="tensorrt", provider="TensorRT", device=f"cuda:{self.device} ({gpu})", batch_size=self.batch_size,
            threads=None, warmup=self.warmup, runs=self.runs, mean_ms=stats["mean_ms"], median_ms=stats["median_ms"],
            p90_ms=stats["p90_ms"], min_ms=stats["min_ms"], fps=1000.0 * self.batch_size / stats["median_ms"],
            extra={"onnx": str(onnx_path), "engine_path": str(path), "engine_cached": cached,
                   "build_s": round(build_s, 2), "tensorrt": trt.__version__, "fp16": self.fp16,
                   "int8": self.int8 and has_qdq(onnx_path), "std_ms": stats["std_ms"],
                   "timing": "CUDA events around execute_async_v3 (device time; no host<->device copies)"},
        )
