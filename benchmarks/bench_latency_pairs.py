"""Latency of ONNX files against a reference, in one process, interleaved (issue 12).

Every file gets its own ONNX Runtime CPU session (``--threads`` intra-op threads, random
input of the model's shape, batch 1); then, ``--rounds`` times, each session runs
``--block`` times in turn. Each file's median milliseconds and the median (min-max) of its
per-round ratio to the first file are printed: on a shared machine only ratios measured in
the same window mean anything.

    python benchmarks/bench_latency_pairs.py --threads 1 \\
        float=runs/bench-deploy/demo-ort-cpu/float/model.onnx \\
        w8a8=runs/bench-deploy/demo-ort-cpu/w8a8/model.onnx
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def sessions(files: dict[str, str], threads: int, warmup: int) -> dict[str, tuple[Any, str, Any]]:
    import numpy as np
    import onnxruntime as ort

    out = {}
    for name, path in files.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
        for _ in range(warmup):
            sess.run(None, {inp.name: x})
        out[name] = (sess, inp.name, x)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="name=path; the first is the reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=40, help="runs per session per round")
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    files = dict(f.split("=", 1) if "=" in f else (f, f) for f in args.files)
    sess = sessions(files, args.threads, args.warmup)
    ms: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(args.rounds):
        for name, (s, inp, x) in sess.items():
            t0 = time.perf_counter()
            for _ in range(args.block):
                s.run(None, {inp: x})
            ms[name].append((time.perf_counter() - t0) / args.block * 1000)
    ref = next(iter(files))
    for name in files:
        ratios = [a / b for a, b in zip(ms[name], ms[ref], strict=True)]
        print(f"{args.threads} thread(s) {name}: median {statistics.median(ms[name]):.2f} ms, vs {ref} "
              f"x{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
