"""Where the time of an ONNX file goes in ONNX Runtime's CPU provider: kernel time per op type.

ONNX Runtime's profiler (``SessionOptions.enable_profiling``, one intra-op thread) records
each kernel's duration; this script sums them per op type, per run. Kernel time counts
only the time the kernels run, so it is steadier than wall time on a loaded machine. The
files are profiled in turn, ``--rounds`` times (interleaved), and each op type's median
over the rounds is reported with the median total.

    python benchmarks/bench_ort_profile.py runs/bench-deploy/demo-ort-cpu/float/model.onnx \\
        runs/bench-deploy/demo-ort-cpu/w8a8/model.onnx --rounds 3 --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any


def profile(path: Path, runs: int, warmup: int) -> dict[str, float]:
    """Kernel milliseconds per run, by op type, of one session on ``path`` (random input)."""
    import numpy as np
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in inp.shape], dtype=np.float32)
        for _ in range(warmup + runs):
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_run: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_run.setdefault(e["args"]["op_name"], []).append(e["dur"] / 1000.0)
    # each run records the same nodes in the same order: drop the first `warmup` runs' share of each op
    return {op: sum(v[len(v) * warmup // (warmup + runs):]) / runs for op, v in per_run.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--top", type=int, default=10, help="op types shown per file")
    ap.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = ap.parse_args()
    for f in args.files:
        if not f.is_file():
            raise SystemExit(f"error: {f}: no such file")
    rounds: dict[str, list[dict[str, float]]] = {str(f): [] for f in args.files}
    for _ in range(args.rounds):
        for f in args.files:
            rounds[str(f)].append(profile(f, args.runs, args.warmup))
    out: dict[str, Any] = {"load_average": os.getloadavg(), "rounds": args.rounds, "runs": args.runs, "files": {}}
    for f, per in rounds.items():
        ops = sorted(set().union(*per))
        med = {op: statistics.median(p.get(op, 0.0) for p in per) for op in ops}
        total = statistics.median(sum(p.values()) for p in per)
        out["files"][f] = {"total_ms": total, "ops_ms": med}
        print(f"{f}: kernel time {total:.2f} ms/run (median of {args.rounds} rounds; "
              f"{', '.join(f'{sum(p.values()):.1f}' for p in per)})")
        for op, ms in sorted(med.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"    {op:24s} {ms:7.2f}")
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
