"""Trial export time: graph emission (``deploy.export: emit``) against the backend's traced
export (``trace``), on the same materialized models, with the lowered files compared.

For ``--trials`` random mixed assignments of the demo (every layer W4A16, W4A8, W8A16,
W8A8 or float) and for uniform W8A8, the study's backend materializes the model once; then
the traced export (Brevitas ``export_onnx_qcdq``, ModelOpt's ``torch.onnx.export``) and the
emission are timed in turn, both
are lowered for the target, and the lowered files' outputs on the calibration images are
compared (they must be identical).

    python benchmarks/bench_emit.py --trials 5                       # ort-cpu, the demo study
    python benchmarks/bench_emit.py --trials 5 --target tensorrt
    python benchmarks/bench_emit.py --trials 5 --backend modelopt
    python benchmarks/bench_emit.py --trials 2 --target tensorrt --model yolov10m.yaml --imgsz 320   # random init
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import machine  # noqa: E402  (benchmarks/ is the script folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=str(REPO / "studies" / "demo.yaml"))
    ap.add_argument("--target", default="ort-cpu", choices=("ort-cpu", "tensorrt"))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-emit"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="another model than the study's (e.g. yolov10m.yaml: random init)")
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--backend", default=None, help="another backend than the study's (e.g. modelopt)")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort

    from mpq.assignment import Assignment, Precision
    from quantizers.lowering import lower
    from search.pipeline import TrialPipeline
    from search.spec import load_spec

    spec = load_spec(args.study, runs_dir=str(args.out), deploy={"target": args.target}, model=args.model,
                     imgsz=args.imgsz, backend={"name": args.backend} if args.backend else None)
    pipeline = TrialPipeline.for_spec(spec, run_dir=args.out / args.target, progress=False)
    res = pipeline.resources
    float_onnx = pipeline.baseline.onnx()
    layers = [lay.name for lay in res.model.quantizable_layers]
    rng = random.Random(args.seed)
    picks = ["W4A16", "W4A8", "W8A16", "W8A8", "W16A16"]
    assignments = [("uniform W8A8", Assignment({n: Precision.parse("W8A8") for n in layers}))]
    for k in range(args.trials):
        a = {n: Precision.parse(rng.choice(picks)) for n in layers}
        assignments.append((f"mixed {k + 1}", Assignment({n: p for n, p in a.items() if not p.is_float})))
    res.materialize(assignments[0][1])  # one-time statistics and weights, not timed
    print(machine())
    print("| assignment | A8 layers | trace (s) | emit (s) | trace / emit | lowered outputs |")
    print("|---|---|---|---|---|---|")
    ratios = []
    x = res.calibration.images[:8]
    for label, assignment in assignments:
        qmodel = res.materialize(assignment)
        folder = args.out / args.target / label.replace(" ", "-")
        t0 = time.perf_counter()
        traced = res.backend.export(qmodel, folder / "traced.onnx").path
        t_trace = time.perf_counter() - t0
        t0 = time.perf_counter()
        emitted = res.backend.emit(qmodel, folder / "emitted.onnx", float_onnx).path
        t_emit = time.perf_counter() - t0
        outs = []
        for src in (traced, emitted):
            low = lower(src, src.with_suffix(".lowered.onnx"), target=args.target, layers=res.model.layers,
                        assignment={k: str(v) for k, v in assignment.items()}, images=res.calibration.images,
                        options=spec.deploy)
            outs.append(ort.InferenceSession(str(low.path), providers=["CPUExecutionProvider"]).run(
                None, {"images": x})[0])
        same = "identical" if np.array_equal(outs[0], outs[1]) else f"max diff {np.abs(outs[0] - outs[1]).max():.3g}"
        a8 = sum(1 for _, p in assignment.items() if p.quantizes_inputs)
        ratios.append(t_trace / t_emit)
        print(f"| {label} | {a8} | {t_trace:.2f} | {t_emit:.2f} | x{t_trace / t_emit:.1f} | {same} |")
    print(f"\nmedian trace / emit: x{statistics.median(ratios):.1f}")


if __name__ == "__main__":
    main()
