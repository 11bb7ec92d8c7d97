"""How much mAP uniform W8A8 loses on ``deploy.target: ort-cpu``, per activation-calibration
variant, averaged over three calibration subsets (the loss moves by several tenths of a
point with the calibration images alone, so one subset cannot rank variants).

Each variant is the Brevitas backend with some options changed (``key=value``, as
``search quantize --set backend.key=value``), built for ort-cpu exactly as a trial is
(materialize with output quantizers, export, lower), on calibration images 0-31 (the demo
study's), 32-63 and 16-47 of the demo calibration list, scored on the study's 100 images.

    python benchmarks/bench_ortcpu_calibration.py                          # the defaults
    python benchmarks/bench_ortcpu_calibration.py bias_correction=false act_quant_type=sym
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBSETS = {"A (0-31, the study's)": slice(0, 32), "B (32-63)": slice(32, 64), "C (16-47)": slice(16, 48)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="backend option overrides, key=value")
    ap.add_argument("--precision", default="W8A8")
    args = ap.parse_args()
    import os

    import numpy as np
    import yaml

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from mpq.assignment import Assignment, Precision
    from mpq.data import CalibrationSet, preprocess_many, read_calibration_list
    from quantizers import get_backend
    from quantizers.lowering import lower
    from search.pipeline import TrialPipeline
    from search.spec import load_spec

    spec = load_spec(REPO / "studies" / "demo.yaml")
    pipeline = TrialPipeline.for_spec(spec, run_dir=Path(tempfile.mkdtemp(prefix="bench-ortcpu-")), progress=False)
    ctx = pipeline.resources
    coco = pipeline.evaluator.coco
    overrides = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    options = spec.backend.model_copy(update=overrides)
    paths = read_calibration_list(spec.calibration.source, 64)
    images, _ = preprocess_many(paths, spec.imgsz, progress=False)
    base = coco.evaluate(pipeline.baseline.onnx()).map50_95
    precision = Precision.parse(args.precision)
    assignment = Assignment.from_groups(ctx.groups, {g.name: precision for g in ctx.groups})
    results = {}
    for name, sl in SUBSETS.items():
        calib = CalibrationSet(images=images[sl], paths=paths[sl], batch_size=spec.calibration.batch_size)
        backend = get_backend(options, device="cpu", target="ort-cpu")
        q = backend.materialize(ctx.model, assignment, calib)
        src = ctx.run_dir / "export.onnx"
        backend.export(q, src)
        dst = ctx.run_dir / "model.onnx"
        lower(src, dst, target="ort-cpu", layers=ctx.model.layers)
        results[name] = coco.evaluate(dst).map50_95
        print(f"{name}: mAP50-95 {results[name]:.4f} ({100 * (results[name] - base):+.2f} pt)", flush=True)
    mean = float(np.mean(list(results.values())))
    print(json.dumps({"overrides": overrides, "precision": args.precision, "float": base, "subsets": results,
                      "mean": mean, "mean_change_pt": 100 * (mean - base)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
