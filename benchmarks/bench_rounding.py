"""Cached output-aware weight rounding (issue 13): accuracy, one-time cost, per-trial cost.

On the demo study (or ``--study``), with the Brevitas backend:

1. **Candidates, uniform assignments** (every quantizable layer at the same precision):
   round-to-nearest (the former default), the cached float-input GPTQ and GPFQ
   (``weight_rounding: gptq | gpfq``) and sequential Brevitas GPTQ (``gptq: true``, each
   layer sees the already quantized layers before it), all with the default scales, input
   quantizers and bias correction; COCO mAP50-95 of the exported QCDQ ONNX through ONNX
   Runtime, and the one-time cost of each cached method.
2. **Rerun**: a second backend instance with the same cache folder loads the weights from
   disk (time), and a third one with another calibration set does not.
3. **Per-trial materialize time, old vs new**: the same mixed assignments (random per-layer
   W4/W8 x A8/A16/float, as a search draws them) materialized with ``weight_rounding:
   nearest`` and with the cached GPTQ weights (warm caches), interleaved in rounds so the
   machine's speed drifts cancel; the ratio of medians per assignment.

    python benchmarks/bench_rounding.py --threads 1        # writes runs/bench-rounding/results.{json,md}
    python benchmarks/bench_rounding.py --only timing      # just part 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import machine  # noqa: E402  (benchmarks/ is the script folder)

#: name -> BrevitasOptions overrides
METHODS: dict[str, dict[str, Any]] = {
    "nearest": {"weight_rounding": "nearest"},
    "gptq (cached, float inputs)": {"weight_rounding": "gptq"},
    "gpfq (cached, float inputs)": {"weight_rounding": "gpfq"},
    "sequential gptq (gptq: true)": {"gptq": True},
}
PARTS = ("accuracy", "rerun", "timing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--precisions", nargs="+", default=["W4A16", "W4A8", "W8A16", "W8A8"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--assignments", type=int, default=6, help="mixed assignments for the timing part")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds for the timing part")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-rounding")
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    from evaluators.coco import CocoEvaluator
    from quantizers.base import CalibrationSet
    from search.data import load_coco_subset, preprocess_many, read_calibration_list
    from search.model import export_onnx, load_model
    from search.spec import load_spec

    spec = load_spec(args.study)
    model = load_model(spec.model, spec.imgsz, max_det=spec.evaluation.max_det)
    ds = spec.dataset
    subset = load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)
    paths = read_calibration_list(spec.calibration.source, spec.calibration.max_images)
    images, _ = preprocess_many(paths, spec.imgsz, progress=False)
    calib = CalibrationSet(images=images, paths=paths, batch_size=spec.calibration.batch_size)
    coco = CocoEvaluator(subset=subset, names=model.names, imgsz=spec.imgsz, settings=spec.evaluation,
                         cache_dir=args.out / "cache", progress=False)
    float_map = coco.evaluate(export_onnx(model.module, args.out / "float.onnx", spec.imgsz)).map50_95
    return {"spec": spec, "model": model, "calib": calib, "coco": coco, "float_map": float_map}


def accuracy(args: argparse.Namespace, env: dict[str, Any], console: Any) -> list[dict[str, Any]]:
    from quantizers.brevitas_backend import BrevitasBackend
    from search.assignment import Assignment
    from search.spec import BrevitasOptions

    model, calib, coco = env["model"], env["calib"], env["coco"]
    rows = []
    for method in args.methods:
        backend = BrevitasBackend(options=BrevitasOptions(**METHODS[method]), progress=True)
        for precision in args.precisions:
            assignment = Assignment.uniform(model.quantizable_layers, precision)
            t = time.perf_counter()
            qmodel = backend.materialize(model, assignment, calib)
            mat_s = time.perf_counter() - t
            path = backend.export(qmodel, args.out / method.split()[0] / f"{method.split()[0]}-{precision}.onnx").path
            m = coco.evaluate(path).map50_95
            w = qmodel.info.get("weights", {})
            row = {"method": method, "precision": precision, "map50_95": m, "change": m - env["float_map"],
                   "materialize_s": mat_s, "timings": {k: round(v, 3) for k, v in qmodel.timings.items()},
                   "one_time_s": w.get("one_time_seconds") if w.get("served_from") == "computed" else None,
                   "weights": w}
            rows.append(row)
            console.print(f"{method:>30} {precision}: mAP50-95 {m:.4f} ({row['change'] * 100:+.2f} pt), "
                          f"materialize {mat_s:.1f} s, weights {w.get('served_from', '-')} "
                          f"{w.get('one_time_seconds', '')}", highlight=False)
    return rows


def rerun(args: argparse.Namespace, env: dict[str, Any], console: Any) -> dict[str, Any]:
    """A fresh instance on the same cache folder loads from disk; another calibration set recomputes."""
    from quantizers.base import CalibrationSet
    from quantizers.brevitas_backend import BrevitasBackend
    from search.assignment import Assignment

    model, calib = env["model"], env["calib"]
    assignment = Assignment.uniform(model.quantizable_layers, "W4A16")
    with tempfile.TemporaryDirectory(prefix="bench-rounding-") as tmp:
        out: dict[str, Any] = {}
        for tag, cal in (("first", calib), ("rerun", calib),
                         ("other calibration", CalibrationSet(calib.images[:-1], calib.paths[:-1], calib.batch_size))):
            backend = BrevitasBackend(cache_dir=tmp, progress=True)
            t = time.perf_counter()
            qmodel = backend.materialize(model, assignment, cal)
            w = qmodel.info["weights"]
            out[tag] = {"materialize_s": time.perf_counter() - t, "weights_s": qmodel.timings.get("weights"),
                        "served_from": w["served_from"], "key": w["key"], "one_time_seconds": w["one_time_seconds"]}
            console.print(f"{tag}: weights {w['served_from']} in {qmodel.timings.get('weights', 0):.2f} s "
                          f"(key {w['key']}, one-time {w['one_time_seconds']} s)", highlight=False)
        out["files"] = sorted(p.name for p in Path(tmp).iterdir())
    return out


def mixed_assignments(model: Any, n: int, seed: int = 0) -> list[Any]:
    from search.assignment import Assignment, Precision

    rng = random.Random(seed)
    choices = [Precision(4, 16), Precision(4, 8), Precision(8, 16), Precision(8, 8), None]
    out = []
    for _ in range(n):
        pick = {lay.name: rng.choice(choices) for lay in model.quantizable_layers}
        out.append(Assignment({k: v for k, v in pick.items() if v is not None}))
    return out


def timing(args: argparse.Namespace, env: dict[str, Any], console: Any) -> dict[str, Any]:
    """Materialize time of the same mixed assignments, nearest vs cached GPTQ, warm, interleaved."""
    from quantizers.brevitas_backend import BrevitasBackend
    from search.spec import BrevitasOptions

    model, calib = env["model"], env["calib"]
    assignments = mixed_assignments(model, args.assignments)
    backends = {"nearest": BrevitasBackend(options=BrevitasOptions(weight_rounding="nearest")),
                "gptq": BrevitasBackend(options=BrevitasOptions(weight_rounding="gptq"))}
    for b in backends.values():  # warm: statistics (and, for gptq, the one-time weights)
        b.materialize(model, assignments[0], calib)
    samples: dict[str, list[list[float]]] = {k: [[] for _ in assignments] for k in backends}
    for r in range(args.rounds):
        order = list(backends) if r % 2 == 0 else list(reversed(backends))
        for i, a in enumerate(assignments):
            for name in order:
                t = time.perf_counter()
                backends[name].materialize(model, a, calib)
                samples[name][i].append(time.perf_counter() - t)
    per = []
    for i, a in enumerate(assignments):
        old = statistics.median(samples["nearest"][i])
        new = statistics.median(samples["gptq"][i])
        per.append({"layers": len(a), "w4": sum(1 for _, p in a.items() if p.w_bits == 4),
                    "nearest_s": old, "gptq_s": new, "ratio": new / old})
        console.print(f"assignment {i} ({len(a)} layers): nearest {old:.3f} s, cached gptq {new:.3f} s, "
                      f"ratio {new / old:.2f}", highlight=False)
    ratio = statistics.median(r["ratio"] for r in per)
    console.print(f"median ratio cached-gptq / nearest: {ratio:.2f}", highlight=False)
    return {"assignments": per, "median_ratio": ratio, "rounds": args.rounds, "samples": samples}


def markdown(res: dict[str, Any]) -> str:
    lines = []
    if res.get("accuracy"):
        lines += [f"Float mAP50-95 {res['float_map']:.4f}.", "",
                  "| method | precision | mAP50-95 | change (pt) | materialize (s) | one-time (s) |",
                  "|---|---|---|---|---|---|"]
        for r in res["accuracy"]:
            one = f"{r['one_time_s']:.1f}" if r.get("one_time_s") else ""
            lines.append(f"| {r['method']} | {r['precision']} | {r['map50_95']:.4f} | {r['change'] * 100:+.2f} | "
                         f"{r['materialize_s']:.1f} | {one} |")
    if res.get("rerun"):
        rr = res["rerun"]
        lines += ["", "| backend instance (same cache folder) | weights from | weights (s) | key |",
                  "|---|---|---|---|"]
        for tag in ("first", "rerun", "other calibration"):
            e = rr[tag]
            lines.append(f"| {tag} | {e['served_from']} | {e['weights_s']:.2f} | {e['key']} |")
    if res.get("timing"):
        tm = res["timing"]
        lines += ["", "| mixed assignment | layers | W4 layers | nearest (s) | cached GPTQ (s) | ratio |",
                  "|---|---|---|---|---|---|"]
        for i, r in enumerate(tm["assignments"]):
            lines.append(f"| {i} | {r['layers']} | {r['w4']} | {r['nearest_s']:.3f} | {r['gptq_s']:.3f} | "
                         f"{r['ratio']:.2f} |")
        lines.append(f"\nMedian ratio (cached GPTQ / nearest), medians of {tm['rounds']} interleaved rounds: "
                     f"**{tm['median_ratio']:.2f}**.")
    info = res["machine"]
    lines += ["", f"Machine: {info['platform']}, {info['cpus']} CPUs, torch threads {info['torch_threads']}, "
                  f"load average at start {info.get('load_average_at_start')}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    from rich.console import Console

    from search.runs import write_json, write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    info = machine()
    start = time.perf_counter()
    env = setup(args)
    res: dict[str, Any] = {"machine": info, "float_map": env["float_map"]}
    if "accuracy" in args.only:
        res["accuracy"] = accuracy(args, env, console)
    if "rerun" in args.only:
        res["rerun"] = rerun(args, env, console)
    if "timing" in args.only:
        res["timing"] = timing(args, env, console)
    info["seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(res)
    write_json(args.out / "results.json", res)
    write_text(args.out / "results.md", md + "\n")
    print(md)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
