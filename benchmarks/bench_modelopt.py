"""ModelOpt backends benchmark: the seeds' W8A8 sanity and the uniform precisions on the demo model.

Rows (every quantizable layer at one precision):

- ``modelopt`` (torch PTQ, QDQ export): W8A8 with max, percentile (99.999, the default) and
  entropy input ranges; W8A16, W4A16 and W4A8 with the defaults (max weight ranges,
  percentile input ranges); W4A16 with ModelOpt's MSE weight ranges; W4A8 with max input
  ranges;
- ``modelopt-onnx`` (the seeds' ONNX INT8 PTQ): W8A8 with max and entropy calibration.

Each row materializes, exports, and measures COCO mAP (pycocotools through ONNX Runtime on
the study's evaluation subset) and ORT latency, with the time of every step. Then the
per-probe cost of the sensitivity sweep (single-layer materialize with warm caches) and,
unless ``--no-yolov10m``, materialize + export of ``yolov10m.yaml`` (random init at 640:
time only, not accuracy).

    python benchmarks/bench_modelopt.py                       # everything; prints markdown
    python benchmarks/bench_modelopt.py --rows onnx-max onnx-entropy torch-max
    python benchmarks/bench_modelopt.py --no-yolov10m --out runs/bench-modelopt

Results: ``<out>/results.json`` (one record per row) and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import machine  # noqa: E402  (benchmarks/ is the script folder)

#: row name -> (backend, precision, options)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "torch-max": ("modelopt", "W8A8", {"calibration": "max"}),
    "torch-percentile": ("modelopt", "W8A8", {"calibration": "percentile"}),
    "torch-entropy": ("modelopt", "W8A8", {"calibration": "entropy"}),
    "torch-w8a16": ("modelopt", "W8A16", {}),
    "torch-w4a16": ("modelopt", "W4A16", {}),
    "torch-w4a16-mse": ("modelopt", "W4A16", {"weight_calibration": "mse"}),
    "torch-w4a8": ("modelopt", "W4A8", {}),
    "torch-w4a8-max": ("modelopt", "W4A8", {"calibration": "max"}),
    "onnx-max": ("modelopt-onnx", "W8A8", {"calibration": "max"}),
    "onnx-entropy": ("modelopt-onnx", "W8A8", {"calibration": "entropy"}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="rows to run (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-modelopt")
    p.add_argument("--no-yolov10m", action="store_true", help="skip the yolov10m.yaml timing")
    p.add_argument("--yolov10m-images", type=int, default=16, help="calibration images for the yolov10m timing")
    return p.parse_args(argv)


def options(backend: str, kw: dict[str, Any]) -> Any:
    from quantizers.modelopt_onnx_options import ModelOptOnnxOptions
    from quantizers.modelopt_options import ModelOptOptions

    return (ModelOptOptions if backend == "modelopt" else ModelOptOnnxOptions)(**kw)


def demo_table(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    from evaluators.coco import CocoEvaluator
    from evaluators.latency import OrtLatencyEvaluator
    from mpq.assignment import Assignment
    from mpq.data import CalibrationSet, load_coco_subset, preprocess_many, read_calibration_list
    from mpq.model import export_onnx, load_model
    from quantizers import get_backend
    from search.spec import load_spec

    spec = load_spec(args.study)
    out: Path = args.out
    model = load_model(spec.model, spec.imgsz, max_det=spec.evaluation.max_det)
    ds = spec.dataset
    subset = load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)
    paths = read_calibration_list(spec.calibration.source, spec.calibration.max_images)
    images, _ = preprocess_many(paths, spec.imgsz, progress=False)
    calib = CalibrationSet(images=images, paths=paths, batch_size=spec.calibration.batch_size)
    coco = CocoEvaluator(subset=subset, names=model.names, imgsz=spec.imgsz, settings=spec.evaluation,
                         cache_dir=out / "cache", progress=False)
    lat = OrtLatencyEvaluator(providers=spec.evaluation.providers, imgsz=spec.imgsz, warmup=spec.latency.warmup,
                              runs=spec.latency.runs, batch_size=1, threads=spec.latency.threads)
    console.print(f"model {spec.model}: {len(model.quantizable_layers)} quantizable layers; {len(calib)} calibration "
                  f"images; {len(subset)} evaluation images", highlight=False)

    float_path = export_onnx(model.module, out / "float" / "model.onnx", spec.imgsz)
    t = time.perf_counter()
    acc = coco.evaluate(float_path)
    eval_s = time.perf_counter() - t
    rows: list[dict[str, Any]] = [{
        "row": "float", "backend": "-", "precision": "W16A16", "options": {}, "map50_95": acc.map50_95,
        "map50": acc.map50, "latency_ms": lat.evaluate(float_path).median_ms, "onnx_bytes": float_path.stat().st_size,
        "materialize_s": 0.0, "export_s": 0.0, "eval_s": eval_s, "timings": {}, "node_counts": {}}]
    console.print(f"float: mAP50-95 {acc.map50_95:.4f}", highlight=False)
    for name in args.rows or list(ROWS):
        backend_name, precision, kw = ROWS[name]
        backend = get_backend(options(backend_name, kw), device="cpu")
        assignment = Assignment.uniform(model.quantizable_layers, precision)
        t = time.perf_counter()
        qmodel = backend.materialize(model, assignment, calib)
        mat_s = time.perf_counter() - t
        result = backend.export(qmodel, out / backend_name / f"{name}.onnx")
        t = time.perf_counter()
        acc = coco.evaluate(result.path)
        eval_s = time.perf_counter() - t
        lat_q = lat.evaluate(result.path)
        row = {"row": name, "backend": backend_name, "precision": precision, "options": kw,
               "map50_95": acc.map50_95, "map50": acc.map50, "latency_ms": lat_q.median_ms,
               "onnx_bytes": result.path.stat().st_size, "materialize_s": mat_s, "export_s": result.seconds,
               "eval_s": eval_s, "timings": {k: round(v, 3) for k, v in qmodel.timings.items()},
               "node_counts": dict(result.node_counts), "opset": result.metadata.get("opset")}
        rows.append(row)
        drop = acc.map50_95 - rows[0]["map50_95"]
        console.print(f"{name:>22} {precision}: mAP50-95 {acc.map50_95:.4f} ({drop:+.4f}) "
                      f"materialize {mat_s:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in qmodel.timings.items())}), "
                      f"export {result.seconds:.1f} s, eval {eval_s:.1f} s, latency {lat_q.median_ms:.2f} ms",
                      highlight=False)
    rows.append(single_layer_timing(model, calib))
    return rows


def single_layer_timing(model: Any, calib: Any) -> dict[str, Any]:
    """What each sensitivity probe pays: single-layer materialize with the input-range cache warm."""
    import statistics

    from mpq.assignment import Assignment
    from quantizers.modelopt_backend import ModelOptBackend
    from quantizers.modelopt_onnx_backend import ModelOptOnnxBackend

    torch_be = ModelOptBackend()
    onnx_be = ModelOptOnnxBackend()
    layers = model.quantizable_layers
    torch_be.materialize(model, Assignment({layers[0].name: "W4A8"}), calib)  # fills the cache
    onnx_be.materialize(model, Assignment({}), calib)  # exports the float ONNX once
    times: dict[str, list[float]] = {"torch W4A16": [], "torch W4A8": [], "onnx W8A8": []}
    for lay in layers[::8]:
        for key, be, prec in (("torch W4A16", torch_be, "W4A16"), ("torch W4A8", torch_be, "W4A8"),
                              ("onnx W8A8", onnx_be, "W8A8")):
            t = time.perf_counter()
            be.materialize(model, Assignment({lay.name: prec}), calib)
            times[key].append(time.perf_counter() - t)
    return {"row": "single-layer", "calls": len(layers[::8]),
            "median_s": {k: statistics.median(v) for k, v in times.items()}}


def yolov10m_timing(args: argparse.Namespace, console: Any) -> list[dict[str, Any]]:
    """Materialize + export of yolov10m.yaml (random init) at 640 on this CPU."""
    from mpq.assignment import Assignment
    from mpq.data import CalibrationSet, preprocess_many, read_calibration_list
    from mpq.model import load_model
    from quantizers import get_backend
    from search.spec import load_spec

    spec = load_spec(args.study)
    model = load_model("yolov10m.yaml", 640)
    paths = read_calibration_list(spec.calibration.source, args.yolov10m_images)
    images, _ = preprocess_many(paths, 640, progress=False)
    calib = CalibrationSet(images=images, paths=paths, batch_size=8)
    rows = []
    for backend_name, precision, kw in (("modelopt", "W4A8", {"calibration": "max"}),
                                        ("modelopt", "W8A8", {"calibration": "percentile"}),
                                        ("modelopt-onnx", "W8A8", {"calibration": "max"}),
                                        ("modelopt-onnx", "W8A8", {"calibration": "entropy"})):
        backend = get_backend(options(backend_name, kw), device="cpu")
        assignment = Assignment.uniform(model.quantizable_layers, precision)
        t = time.perf_counter()
        qmodel = backend.materialize(model, assignment, calib)
        mat_s = time.perf_counter() - t
        result = backend.export(qmodel, args.out / "yolov10m" / f"{backend_name}-{precision}.onnx")
        row = {"model": "yolov10m.yaml", "backend": backend_name, "precision": precision, "options": kw,
               "layers": len(assignment), "calib_images": len(calib), "materialize_s": mat_s,
               "export_s": result.seconds, "timings": {k: round(v, 2) for k, v in qmodel.timings.items()},
               "node_counts": dict(result.node_counts), "onnx_bytes": result.path.stat().st_size}
        rows.append(row)
        console.print(f"yolov10m {backend_name} {precision} {kw}: materialize {mat_s:.1f} s, export "
                      f"{result.seconds:.1f} s, {row['onnx_bytes'] / 1e6:.1f} MB", highlight=False)
    return rows


def _qdq(nc: dict[str, int]) -> str:
    return f"{nc.get('QuantizeLinear', 0)} / {nc.get('DequantizeLinear', 0)} / {nc.get('Clip', 0)}" if nc else "-"


def markdown(rows: list[dict[str, Any]], big: list[dict[str, Any]], info: dict[str, Any]) -> str:
    base = rows[0] if rows else {}
    lines = ["| configuration | precision | mAP50-95 | drop | mAP50 | ORT CPU latency (ms) | materialize (s) "
             "| export (s) | eval (s) | Q / DQ / Clip |", "|---|---|---|---|---|---|---|---|---|---|"] if rows else []
    for r in rows:
        if r["row"] == "single-layer":
            continue
        config = "float" if r is base else f"{r['backend']}: " + (
            ", ".join(f"{k} {v}" for k, v in r["options"].items()) or "defaults")
        drop = "" if r is base else f"{r['map50_95'] - base['map50_95']:+.4f}"
        lines.append(f"| {config} | {r['precision']} | {r['map50_95']:.4f} | {drop} | {r['map50']:.4f} | "
                     f"{r['latency_ms']:.2f} | {r['materialize_s']:.1f} | {r['export_s']:.1f} | {r['eval_s']:.1f} "
                     f"| {_qdq(r['node_counts'])} |")
    single = [r for r in rows if r["row"] == "single-layer"]
    if single:
        med = single[0]["median_s"]
        lines += ["", "Single-layer materialize with warm caches (what each sensitivity probe pays), median over "
                      f"{single[0]['calls']} layers: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in med.items())
                  + "."]
    if big:
        lines += ["", "| model | backend | precision | options | layers | calibration images | materialize (s) "
                      "| export (s) | ONNX (MB) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in big:
            opts = ", ".join(f"{k} {v}" for k, v in r["options"].items())
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {opts} | {r['layers']} "
                         f"| {r['calib_images']} | {r['materialize_s']:.1f} | {r['export_s']:.1f} "
                         f"| {r['onnx_bytes'] / 1e6:.1f} |")
    lines += ["", f"Machine: {info['platform']}, {info['cpus']} CPUs, torch threads {info['torch_threads']}, "
                  f"load average at start {info.get('load_average_at_start')}, CUDA: {info['cuda']}; "
                  f"{info.get('seconds', '?')} s in all."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import torch
    from rich.console import Console

    from mpq.env import import_ultralytics
    from mpq.files import write_json, write_text

    import_ultralytics()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    info = machine()
    start = time.perf_counter()
    rows = demo_table(args, console)
    big = [] if args.no_yolov10m else yolov10m_timing(args, console)
    info["seconds"] = round(time.perf_counter() - start, 1)
    md = markdown(rows, big, info)
    write_json(args.out / "results.json", {"machine": info, "rows": rows, "yolov10m": big})
    write_text(args.out / "results.md", md + "\n")
    print(md)
    console.print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {info['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
