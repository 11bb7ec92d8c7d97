"""Brevitas backend benchmark: the seeds' table on the demo model, with and without good PTQ.

For each PTQ configuration (naive max scaling; naive per-tensor 4-bit scales as the seeds
did; the default: MSE 4-bit scales, percentile activation ranges, bias correction;
default + GPTQ; default + GPFQ; default with uint8 asymmetric activations) and each
uniform precision (W8A16, W8A8, W4A16, W4A8 over every quantizable layer), it
materializes, exports QCDQ ONNX, and measures COCO mAP (pycocotools through ONNX
Runtime, the study's evaluation subset) and ORT latency, with the time of every step.
Then it times materialize + export of a yolov10m-sized model (``yolov10m.yaml``, random
init: time only, not accuracy) on this machine's CPU (and on CUDA when there is one).

    python benchmarks/bench_brevitas.py                  # everything, prints tables + markdown
    python benchmarks/bench_brevitas.py --only default --precisions W8A8 W4A16   # a subset
    python benchmarks/bench_brevitas.py --no-yolov10m --threads 1 --out runs/bench-brevitas

Results go to ``<out>/results.json`` (one record per row) and the markdown table to
``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import machine  # noqa: E402  (benchmarks/ is the script folder)

CONFIGS: dict[str, dict[str, Any]] = {
    "naive": dict(weight_scale="max", weight_scale_8bit="max", act_calibration="max", bias_correction=False,
                  weight_rounding="nearest"),
    "naive-per-tensor": dict(weight_scale="max", weight_scale_8bit="max", act_calibration="max",
                             bias_correction=False, weight_granularity="per_tensor", weight_rounding="nearest"),
    "default": {},
    "default-nearest": dict(weight_rounding="nearest"),
    "default+gptq": dict(gptq=True),
    "default+gpfq": dict(gpfq=True),
    "default-asym": dict(act_quant_type="asym"),
}
DESCRIPTIONS = {
    "naive": "max per-channel weight scales, round to nearest, max activation ranges, no bias correction",
    "naive-per-tensor": "as naive, but one scale per layer (the seeds' 4-bit setting)",
    "default": "MSE 4-bit scales (max at 8), cached float-input GPTQ rounding, percentile 99.99 int8 activations, "
               "bias correction",
    "default-nearest": "the default with round-to-nearest weights (the default before issue 13)",
    "default+gptq": "default scales + sequential Brevitas GPTQ (act order) in every build",
    "default+gpfq": "default scales + sequential Brevitas GPFQ (act order) in every build",
    "default-asym": "default with uint8 asymmetric activations (zero point) instead of int8",
}
#: the rows each configuration is run for (per-tensor only matters at 4 bits; asym only with A8)
ROWS: dict[str, tuple[str, ...]] = {
    "naive": ("W8A16", "W8A8", "W4A16", "W4A8"),
    "naive-per-tensor": ("W4A16", "W4A8"),
    "default": ("W8A16", "W8A8", "W4A16", "W4A8"),
    "default-nearest": ("W8A16", "W8A8", "W4A16", "W4A8"),
    "default+gptq": ("W8A8", "W4A16", "W4A8"),
    "default+gpfq": ("W8A8", "W4A16", "W4A8"),
    "default-asym": ("W8A8", "W4A8"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None, help="configurations to run")
    p.add_argument("--precisions", nargs="+", default=None, help="restrict the rows (e.g. W8A8 W4A16)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="auto", help="torch device for calibration")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-brevitas")
    p.add_argument("--no-yolov10m", action="store_true", help="skip the yolov10m.yaml timing")
    p.add_argument("--no-demo", action="store_true", help="skip the demo table (only the yolov10m timing)")
    p.add_argument("--yolov10m-images", type=int, default=16, help="calibration images for the yolov10m timing")
    return p.parse_args(argv)


def demo_table(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    from rich.progress import Progress

    from evaluators.coco import CocoEvaluator
    from evaluators.latency import OrtLatencyEvaluator
    from mpq.assignment import Assignment
    from mpq.data import CalibrationSet, load_coco_subset, preprocess_many, read_calibration_list
    from mpq.model import export_onnx, load_model
    from quantizers.brevitas_backend import BrevitasBackend
    from quantizers.brevitas_options import BrevitasOptions
    from search.spec import load_spec

    spec = load_spec(args.study)
    out: Path = args.out
    cache = out / "cache"
    t = time.perf_counter()
    model = load_model(spec.model, spec.imgsz, max_det=spec.evaluation.max_det)
    console.print(f"model {spec.model} ({len(model.quantizable_layers)} quantizable layers) loaded in "
                  f"{time.perf_counter() - t:.1f} s", highlight=False)
    ds = spec.dataset
    subset = load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)
    paths = read_calibration_list(spec.calibration.source, spec.calibration.max_images)
    images, _ = preprocess_many(paths, spec.imgsz, progress=False)
    calib = CalibrationSet(images=images, paths=paths, batch_size=spec.calibration.batch_size)
    coco = CocoEvaluator(subset=subset, names=model.names, imgsz=spec.imgsz, settings=spec.evaluation,
                         cache_dir=cache, progress=False)
    lat = OrtLatencyEvaluator(providers=spec.evaluation.providers, imgsz=spec.imgsz, warmup=spec.latency.warmup,
                              runs=spec.latency.runs, batch_size=1, threads=spec.latency.threads)

    rows: list[dict[str, Any]] = []
    float_path = export_onnx(model.module, out / "float" / "model.onnx", spec.imgsz)
    t = time.perf_counter()
    acc = coco.evaluate(float_path)
    eval_s = time.perf_counter() - t
    lat_f = lat.evaluate(float_path)
    rows.append({"config": "float", "precision": "W16A16", "map50_95": acc.map50_95, "map50": acc.map50,
                 "latency_ms": lat_f.median_ms, "onnx_bytes": float_path.stat().st_size, "materialize_s": 0.0,
                 "export_s": 0.0, "eval_s": eval_s, "timings": {}, "node_counts": {}})
    console.print(f"float: mAP50-95 {acc.map50_95:.4f}, mAP50 {acc.map50:.4f}, latency {lat_f.median_ms:.2f} ms",
                  highlight=False)

    configs = args.only or list(CONFIGS)
    jobs = [(c, p) for c in configs for p in ROWS[c] if not args.precisions or p in args.precisions]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("builds", total=len(jobs))
        backends: dict[str, Any] = {}
        for config, precision in jobs:
            progress.update(task, description=f"{config} {precision}")
            backend = backends.get(config)
            if backend is None:  # one instance per configuration: the calibration cache is shared by its rows
                backend = BrevitasBackend(options=BrevitasOptions(**CONFIGS[config]), device=args.device)
                backends[config] = backend
            assignment = Assignment.uniform(model.quantizable_layers, precision)
            t = time.perf_counter()
            qmodel = backend.materialize(model, assignment, calib)
            mat_s = time.perf_counter() - t
            result = backend.export(qmodel, out / config / f"{precision}.onnx")
            t = time.perf_counter()
            acc = coco.evaluate(result.path)
            eval_s = time.perf_counter() - t
            lat_q = lat.evaluate(result.path)
            row = {"config": config, "precision": precision, "map50_95": acc.map50_95, "map50": acc.map50,
                   "latency_ms": lat_q.median_ms, "onnx_bytes": result.path.stat().st_size,
                   "materialize_s": mat_s, "export_s": result.seconds, "eval_s": eval_s,
                   "timings": {k: round(v, 3) for k, v in qmodel.timings.items()},
                   "node_counts": dict(result.node_counts), "stats_cached": qmodel.info.get("stats_cached")}
            rows.append(row)
            console.print(f"{config:>16} {precision}: mAP50-95 {acc.map50_95:.4f} "
                          f"({acc.map50_95 - rows[0]['map50_95']:+.4f}), materialize {mat_s:.1f} s "
                          f"({', '.join(f'{k} {v:.1f}' for k, v in qmodel.timings.items() if k != 'total')}), "
                          f"export {result.seconds:.1f} s, latency {lat_q.median_ms:.2f} ms", highlight=False)
            progress.advance(task)
    latency_rows = latency_comparison(out, spec, console)
    rows.extend(latency_rows)
    single = single_layer_timing(model, calib, args.device)
    rows.append(single)
    console.print(f"single-layer W4A16 materialize, cached statistics: median {single['materialize_s'] * 1000:.0f} ms "
                  f"over {single['calls']} layers", highlight=False)
    return rows


def latency_comparison(out: Path, spec: Any, console: Any, rounds: int = 5) -> list[dict[str, Any]]:
    """ORT CPU latency of float vs W8A8 (int8 symmetric and uint8 asymmetric inputs) vs W4A8,
    interleaved over ``rounds`` rounds (median of the per-round medians), to decide the A8 format
    with more than one noisy sample each."""
    import statistics

    from evaluators.latency import OrtLatencyEvaluator

    models = {"float": out / "float" / "model.onnx", "W8A8 int8 sym": out / "default" / "W8A8.onnx",
              "W8A8 uint8 asym": out / "default-asym" / "W8A8.onnx", "W4A8 int8 sym": out / "default" / "W4A8.onnx",
              "W4A16": out / "default" / "W4A16.onnx"}
    models = {k: v for k, v in models.items() if v.is_file()}
    lat = OrtLatencyEvaluator(providers=spec.evaluation.providers, imgsz=spec.imgsz, warmup=5, runs=30,
                              batch_size=1, threads=spec.latency.threads)
    samples: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, path in models.items():
            samples[name].append(lat.evaluate(path).median_ms)
    rows = []
    for name, ms in samples.items():
        med = statistics.median(ms)
        rows.append({"config": "latency", "precision": name, "latency_ms": med, "rounds": ms,
                     "vs_float": med / statistics.median(samples["float"])})
        console.print(f"latency {name}: median of {rounds} rounds {med:.2f} ms "
                      f"(x{rows[-1]['vs_float']:.2f} float; rounds {[round(x, 1) for x in ms]})", highlight=False)
    return rows


def single_layer_timing(model: Any, calib: Any, device: str) -> dict[str, Any]:
    """What the sensitivity sweep pays per probe: single-layer materialize with warm caches."""
    import statistics

    from mpq.assignment import Assignment
    from quantizers.brevitas_backend import BrevitasBackend

    backend = BrevitasBackend(device=device)
    layers = model.quantizable_layers
    backend.materialize(model, Assignment({layers[0].name: "W4A8"}), calib)  # fills the caches
    times = {"W4A16": [], "W4A8": []}
    for prec in times:
        for lay in layers[::4]:
            t = time.perf_counter()
            backend.materialize(model, Assignment({lay.name: prec}), calib)
            times[prec].append(time.perf_counter() - t)
    return {"config": "default", "precision": "single-layer", "materialize_s": statistics.median(times["W4A16"]),
            "materialize_s_w4a8": statistics.median(times["W4A8"]), "calls": len(times["W4A16"]),
            "max_s": max(times["W4A16"] + times["W4A8"])}


def yolov10m_timing(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    """Materialize + export of yolov10m.yaml (random init) at 640 on the CPU and, when present, CUDA."""
    import torch

    from mpq.assignment import Assignment
    from mpq.data import CalibrationSet, preprocess_many, read_calibration_list
    from mpq.model import load_model
    from quantizers.brevitas_backend import BrevitasBackend
    from search.spec import load_spec

    spec = load_spec(args.study)
    t = time.perf_counter()
    model = load_model("yolov10m.yaml", 640)
    load_s = time.perf_counter() - t
    paths = read_calibration_list(spec.calibration.source, args.yolov10m_images)
    images, _ = preprocess_many(paths, 640, progress=False)
    calib = CalibrationSet(images=images, paths=paths, batch_size=8)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        backend = BrevitasBackend(device=device)
        for precision in ("W4A8", "W4A16"):
            assignment = Assignment.uniform(model.quantizable_layers, precision)
            t = time.perf_counter()
            qmodel = backend.materialize(model, assignment, calib)
            mat_s = time.perf_counter() - t
            result = backend.export(qmodel, args.out / "yolov10m" / f"{device}-{precision}.onnx")
            row = {"model": "yolov10m.yaml", "device": device, "precision": precision,
                   "layers": len(assignment), "calib_images": len(calib), "load_s": load_s,
                   "materialize_s": mat_s, "export_s": result.seconds,
                   "timings": {k: round(v, 2) for k, v in qmodel.timings.items()},
                   "node_counts": dict(result.node_counts), "onnx_bytes": result.path.stat().st_size}
            rows.append(row)
            console.print(f"yolov10m {device} {precision}: materialize {mat_s:.1f} s "
                          f"({', '.join(f'{k} {v:.1f}' for k, v in qmodel.timings.items() if k != 'total')}), "
                          f"export {result.seconds:.1f} s, {result.path.stat().st_size / 1e6:.1f} MB, "
                          f"{dict(result.node_counts)}", highlight=False)
    return rows


def markdown(rows: list[dict[str, Any]], big: list[dict[str, Any]], info: dict[str, Any]) -> str:
    base = rows[0] if rows else {}
    header = ["| configuration | precision | mAP50-95 | drop | mAP50 | ORT CPU latency (ms) | materialize (s) "
              "| export (s) | eval (s) | Q / DQ / Clip |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines = header if rows else []
    for r in rows:
        if r["precision"] == "single-layer" or r["config"] == "latency":
            continue
        nc = r["node_counts"]
        qdq = f"{nc.get('QuantizeLinear', 0)} / {nc.get('DequantizeLinear', 0)} / {nc.get('Clip', 0)}" if nc else "-"
        drop = "" if r is base else f"{r['map50_95'] - base['map50_95']:+.4f}"
        lines.append(f"| {r['config']} | {r['precision']} | {r['map50_95']:.4f} | {drop} | {r['map50']:.4f} | "
                     f"{r['latency_ms']:.2f} | {r['materialize_s']:.1f} | {r['export_s']:.1f} | {r['eval_s']:.1f} "
                     f"| {qdq} |")
    lat = [r for r in rows if r["config"] == "latency"]
    if lat:
        lines += ["", "| ORT CPU latency, batch 1, interleaved rounds | median ms | vs float | per-round medians |",
                  "|---|---|---|---|"]
        for r in lat:
            lines.append(f"| {r['precision']} | {r['latency_ms']:.2f} | x{r['vs_float']:.2f} | "
                         f"{', '.join(f'{x:.1f}' for x in r['rounds'])} |")
    single = [r for r in rows if r["precision"] == "single-layer"]
    if single:
        s = single[0]
        lines += ["", f"Single-layer materialize with the statistics cache warm (what each sensitivity probe "
                      f"pays): median {s['materialize_s'] * 1000:.0f} ms (W4A16), "
                      f"{s['materialize_s_w4a8'] * 1000:.0f} ms (W4A8), max {s['max_s'] * 1000:.0f} ms over "
                      f"{2 * s['calls']} calls."]
    if big:
        lines += ["", "| model | device | precision | layers | calibration images | materialize (s) | of which "
                      "calibrate (s) | export (s) | ONNX (MB) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in big:
            lines.append(f"| {r['model']} | {r['device']} | {r['precision']} | {r['layers']} | {r['calib_images']} "
                         f"| {r['materialize_s']:.1f} | {r['timings'].get('calibrate', 0):.1f} | {r['export_s']:.1f} "
                         f"| {r['onnx_bytes'] / 1e6:.1f} |")
    lines += ["", f"Machine: {info['platform']}, {info['cpus']} CPUs, torch threads {info['torch_threads']}, "
                  f"load average at start {info.get('load_average_at_start')}, CUDA: {info['cuda']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    from rich.console import Console

    from mpq.files import write_json, write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    info = machine()
    console.print(f"machine: {json.dumps({k: v for k, v in info.items() if k != 'versions'})}", highlight=False)
    start = time.perf_counter()
    rows = [] if args.no_demo else demo_table(args, console)
    big = [] if args.no_yolov10m else yolov10m_timing(args, console)
    info["seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(rows, big, info)
    write_json(args.out / "results.json", {"machine": info, "configs": DESCRIPTIONS, "rows": rows, "yolov10m": big})
    write_text(args.out / "results.md", md + "\n")
    print(md)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
