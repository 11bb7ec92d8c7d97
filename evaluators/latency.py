"""ONNX Runtime latency of an ONNX model, per provider.

``warmup`` untimed runs, then ``runs`` timed ``session.run`` calls on a fixed random input
of ``batch_size`` images, timed with a monotonic wall clock (host <-> device copies
included, pre/post-processing excluded). Reported: mean, median, p90, min (ms per batch)
and images/s at the median, with the provider actually used, the device, threads and the
ONNX Runtime version.

With a ``reference`` model (the search passes the float ONNX), both are warmed up and timed
in alternating blocks of ``block`` consecutive runs (candidate block, reference block, ...);
the first run of each block is not timed. Alternating single runs times each session while
the other's intra-op thread pool still spins on the same cores (ONNX Runtime's default):
on a 2-core machine that slowed the float model (two threads) far more than an int8 one,
and a W8A8 file measured x0.52-0.62 of float with blocks of 1-6 runs against x0.78-0.82
with blocks of 20-40 (docs/benchmarks.md, "Measuring latency against float"). A block
of 20 lets that pool go quiet and times each model as it runs when deployed alone. The result also carries the
reference's median and the median over blocks of the ratio of block medians. A shared or
boosting CPU changes speed within minutes, which moves absolute milliseconds; the ratio of
two models timed in the same window does not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.base import LatencyResult
from evaluators.errors import ModelFormatError
from evaluators.session import CPU, check_image_input, open_session
from mpq.files import file_digest


def summarize_ms(times_ms: Sequence[float]) -> dict[str, float]:
    """Mean, median, p90 and min of a list of milliseconds."""
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"mean_ms": float(arr.mean()), "median_ms": float(np.median(arr)),
            "p90_ms": float(np.percentile(arr, 90)), "min_ms": float(arr.min()), "std_ms": float(arr.std())}


class OrtLatencyEvaluator:
    """Latency of ONNX models through ONNX Runtime.

    Args:
        providers: ONNX Runtime providers in order of preference (the first available runs).
        imgsz: input size for models whose spatial dims are dynamic (checked against fixed ones).
        warmup: untimed runs first.
        runs: timed runs.
        batch_size: images per run (a model exported with a fixed batch uses its own).
        threads: ORT intra-op threads (``None``: ORT's default, one per physical core).
        disable_cpu_fallback: fail instead of running on the CPU.
        cache_dir: ORT TensorRT EP engine cache (when that provider is used).
        seed: the random input's seed.
        block: consecutive runs per model when timed against a reference (the first one untimed).
    """

    engine = "ort"

    def __init__(self, *, providers: Sequence[str] = (CPU,), imgsz: int = 640, warmup: int = 10, runs: int = 50,
                 batch_size: int = 1, threads: int | None = None, disable_cpu_fallback: bool = False,
                 cache_dir: str | os.PathLike[str] | None = None, seed: int = 0, block: int = 20):
        if runs < 1 or warmup < 0 or batch_size < 1 or block < 2:
            raise ValueError("runs and batch_size must be >= 1, warmup >= 0, block >= 2")
        self.block = int(block)
        self.providers = tuple(providers)
        self.imgsz = int(imgsz)
        self.warmup, self.runs, self.batch_size = int(warmup), int(runs), int(batch_size)
        self.threads = threads
        self.disable_cpu_fallback = disable_cpu_fallback
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed

    def _open(self, onnx_path: str | os.PathLike[str]) -> tuple[Any, Any, Any, dict[str, Any], list[str], int]:
        source = str(onnx_path)
        sess, report, io = open_session(onnx_path, providers=self.providers, threads=self.threads,
                                        disable_cpu_fallback=self.disable_cpu_fallback, cache_dir=self.cache_dir)
        fixed = check_image_input(io, self.imgsz, source)
        batch = fixed or self.batch_size
        dtype = np.float16 if io.input_type == "tensor(float16)" else np.float32
        x = np.random.default_rng(self.seed).random((batch, 3, self.imgsz, self.imgsz)).astype(dtype)
        return sess, report, io, {io.input_name: x}, list(io.output_names), batch

    def evaluate(self, onnx_path: str | os.PathLike[str],
                 reference: str | os.PathLike[str] | None = None) -> LatencyResult:
        """Time ``onnx_path``; returns :class:`~evaluators.base.LatencyResult` (ms per batch).

        With ``reference``, that model is timed in alternating blocks with this one (same
        warm-up, same number of timed runs) and ``extra`` gains ``reference_median_ms`` and
        ``ratio`` (median over blocks of candidate / reference block medians).
        """
        import onnxruntime as ort

        source = str(onnx_path)
        t0 = time.perf_counter()
        sess, report, io, feed, names, batch = self._open(onnx_path)
        ref = self._open(reference) if reference is not None else None
        session_s = time.perf_counter() - t0

        def timed(s: Any, n: list[str], f: dict[str, Any]) -> float:
            start = time.perf_counter_ns()
            s.run(n, f)
            return (time.perf_counter_ns() - start) / 1e6

        times: list[float] = []
        ref_times: list[float] = []
        ratios: list[float] = []
        current = source
        try:
            for _ in range(self.warmup):
                current = source
                sess.run(names, feed)
                if ref is not None:
                    current = str(reference)
                    ref[0].run(ref[4], ref[3])
            if ref is None:
                current = source
                times = [timed(sess, names, feed) for _ in range(self.runs)]
            while len(times) < self.runs and ref is not None:
                n = self.block - 1  # whole blocks: at least ``runs`` timed runs each
                current = source
                sess.run(names, feed)  # the first run of a block: the other pool may still spin
                mine = [timed(sess, names, feed) for _ in range(n)]
                current = str(reference)
                ref[0].run(ref[4], ref[3])
                theirs = [timed(ref[0], ref[4], ref[3]) for _ in range(n)]
                times += mine
                ref_times += theirs
                ratios.append(float(np.median(mine) / np.median(theirs)))
        except Exception as exc:  # noqa: BLE001 - ORT's runtime errors name the node
            raise ModelFormatError(f"{current}: ONNX Runtime failed to run it on a {list(feed.values())[0].shape} "
                                   f"input: {str(exc).splitlines()[0][:300]}") from None
        stats = summarize_ms(times)
        extra: dict[str, Any] = {
            "onnx": source, "onnx_sha256": file_digest(onnx_path), "std_ms": stats["std_ms"],
            "session_s": round(session_s, 4), "imgsz": self.imgsz, "onnxruntime": ort.__version__,
            "session": report.to_dict(), "timing": "wall clock around session.run (host<->device copies included)"}
        if ref is not None:
            ref_stats = summarize_ms(ref_times)
            extra.update(reference=str(reference), reference_median_ms=ref_stats["median_ms"],
                         reference_p90_ms=ref_stats["p90_ms"],
                         ratio=float(np.median(ratios)), blocks=len(ratios),
                         interleaved=f"alternating blocks of {self.block} runs (the first untimed), candidate / "
                                     "reference; ratio: median over blocks of the ratio of block medians")
        return LatencyResult(
            engine="ort", provider=report.provider, device=report.device, batch_size=batch, threads=self.threads,
            warmup=self.warmup, runs=self.runs, mean_ms=stats["mean_ms"], median_ms=stats["median_ms"],
            p90_ms=stats["p90_ms"], min_ms=stats["min_ms"], fps=1000.0 * batch / stats["median_ms"], extra=extra)
