"""Benchmark of the evaluators on the demo study (figures for docs/benchmarks.md, "Evaluators").

Run:  python benchmarks/bench_evaluators.py [--study studies/demo.yaml] [--out bench-evaluators.json]

In one run, on one machine:
1. COCO accuracy: our CocoEvaluator (ONNX Runtime + pycocotools) vs Ultralytics' validator
   on the same float ONNX: images/s and mAPs side by side (ours cold = preprocessing
   included, warm = cached preprocessing, i.e. what a search trial pays).
2. Fidelity cost vs full COCO eval: one fidelity evaluation (ONNX and torch candidates) on
   the study's sensitivity image count vs one warm COCO evaluation.
3. Ranking: deliberately damaged copies of the float model (Gaussian weight noise, naive
   per-tensor rounding), and real Brevitas quantized models when the backend is there,
   exported to ONNX: COCO mAP50-95 vs fidelity det_map and SQNR, Spearman rank correlation.
4. ONNX Runtime latency of the float ONNX (study's latency settings, and batch 8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each COCO evaluation")
    parser.add_argument("--no-brevitas", action="store_true", help="skip the real-quantizer rows")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the figures as markdown tables here")
    args = parser.parse_args(argv)

    from rich.table import Table

    from evaluators.coco import CocoEvaluator
    from evaluators.fidelity import FidelityEvaluator
    from evaluators.latency import OrtLatencyEvaluator
    from evaluators.reference import ultralytics_val
    from evaluators.testing import degrade
    from mpq.data import load_coco_subset, preprocess_many, read_calibration_list
    from mpq.files import versions
    from mpq.model import export_onnx, load_model
    from search.console import console
    from search.spec import load_spec

    spec = load_spec(args.study)
    work = Path(tempfile.mkdtemp(prefix="bench-evaluators-"))
    figures: dict[str, Any] = {"study": spec.name, "model": str(spec.model), "imgsz": spec.imgsz,
                               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                           "loadavg_start": os.getloadavg()}, "versions": versions()}
    model = load_model(spec.model, spec.imgsz, max_det=spec.evaluation.max_det)
    float_onnx = export_onnx(model.module, work / "float.onnx", spec.imgsz)
    ds = spec.dataset
    subset = load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)
    console.print(f"[bold]{spec.name}[/]: {model.source.name}, imgsz {spec.imgsz}, {len(subset)} eval images, "
                  f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", highlight=False)

    # 1. COCO evaluator vs Ultralytics' validator ------------------------------------------------
    t0 = time.perf_counter()
    ev = CocoEvaluator(subset=subset, names=model.names, imgsz=spec.imgsz, settings=spec.evaluation,
                       cache_dir=work / "cache", progress=False)
    cold = ev.evaluate(float_onnx)
    cold_s = time.perf_counter() - t0
    warm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        acc = ev.evaluate(float_onnx)
        warm.append(time.perf_counter() - t)
    ul_runs = []
    for i in range(args.repeats):
        ul_runs.append(ultralytics_val(float_onnx, evaluator=ev, workdir=work / f"ultralytics-{i}",
                                       layout=acc.extra["layout"]))
    ul = ul_runs[-1]
    exact = ultralytics_val(float_onnx, evaluator=ev, workdir=work / "ultralytics-predict-rounding",
                            layout=acc.extra["layout"], letterbox="predict")
    warm_s = statistics.median(warm)
    ul_s = statistics.median(u.seconds for u in ul_runs)
    n = len(subset)
    figures["coco"] = {
        "images": n, "batch_size": acc.batch_size, "provider": acc.provider,
        "ours_cold_images_per_s": n / cold_s, "ours_warm_images_per_s": n / warm_s,
        "ours_warm_seconds": warm_s, "ours_timings": acc.extra["timings"],
        "ultralytics_images_per_s": n / ul_s, "ultralytics_seconds": ul_s, "ultralytics_speed_ms": ul.speed_ms,
        "map50_95": {"ours": acc.map50_95, "pycocotools_on_ultralytics_json": ul.coco_map50_95,
                     "ultralytics_internal": ul.map50_95,
                     "pycocotools_on_ultralytics_json_predict_rounding": exact.coco_map50_95,
                     "ultralytics_internal_predict_rounding": exact.map50_95},
        "map50": {"ours": acc.map50, "pycocotools_on_ultralytics_json": ul.coco_map50,
                  "ultralytics_internal": ul.map50,
                  "pycocotools_on_ultralytics_json_predict_rounding": exact.coco_map50,
                  "ultralytics_internal_predict_rounding": exact.map50},
        "detections": {"ours": acc.num_detections, "ultralytics": ul.num_detections,
                       "ultralytics_predict_rounding": exact.num_detections},
    }
    t = Table(title=f"COCO evaluation of the float ONNX ({n} images, median of {args.repeats})")
    for c in ("evaluator", "images/s", "s per eval", "mAP50-95", "mAP50"):
        t.add_column(c, justify="right" if c != "evaluator" else "left")
    t.add_row("ours, cold (preprocessing included)", f"{n / cold_s:.1f}", f"{cold_s:.2f}", f"{cold.map50_95:.4f}",
              f"{cold.map50:.4f}")
    t.add_row("ours, warm (a search trial)", f"{n / warm_s:.1f}", f"{warm_s:.2f}", f"{acc.map50_95:.4f}",
              f"{acc.map50:.4f}")
    t.add_row("Ultralytics val (its own mAP)", f"{n / ul_s:.1f}", f"{ul_s:.2f}", f"{ul.map50_95:.4f}",
              f"{ul.map50:.4f}")
    t.add_row("pycocotools on Ultralytics' save_json", "", "", f"{ul.coco_map50_95:.4f}", f"{ul.coco_map50:.4f}")
    t.add_row("Ultralytics val, predict's rounding (its own mAP)", "", "", f"{exact.map50_95:.4f}",
              f"{exact.map50:.4f}")
    t.add_row("pycocotools on that save_json", "", "", f"{exact.coco_map50_95:.4f}", f"{exact.coco_map50:.4f}")
    console.print(t)
    console.print(f"ours, warm, per stage (s): {acc.extra['timings']}", highlight=False)

    # 2. fidelity cost --------------------------------------------------------------------------
    n_fid = spec.sensitivity.images
    calib = read_calibration_list(spec.calibration.source, max(n_fid, spec.calibration.max_images))
    images, _ = preprocess_many(calib[:n_fid], spec.imgsz, progress=False)
    t = time.perf_counter()
    fe = FidelityEvaluator(reference=float_onnx, images=images, names=model.names)
    ref_s = time.perf_counter() - t
    probe = degrade(model.module, "noise", 0.05)
    probe_onnx = export_onnx(probe, work / "probe.onnx", spec.imgsz)
    fid_onnx = [fe.evaluate(probe_onnx).seconds for _ in range(args.repeats)]
    fid_torch = [fe.evaluate(probe).seconds for _ in range(args.repeats)]
    coco_probe = [ev.evaluate(probe_onnx).seconds for _ in range(args.repeats)]
    figures["fidelity_cost"] = {"images": n_fid, "reference_setup_s": ref_s,
                                "onnx_s": statistics.median(fid_onnx), "torch_s": statistics.median(fid_torch),
                                "coco_eval_s": statistics.median(coco_probe)}
    fc = figures["fidelity_cost"]
    t = Table(title=f"Fidelity cost ({n_fid} calibration images) vs full COCO eval ({n} images), median")
    for c in ("evaluation", "seconds", "vs COCO eval"):
        t.add_column(c, justify="right" if c != "evaluation" else "left")
    t.add_row("fidelity, ONNX candidate", f"{fc['onnx_s']:.3f}", f"{fc['onnx_s'] / fc['coco_eval_s']:.2f}x")
    t.add_row("fidelity, torch module candidate", f"{fc['torch_s']:.3f}", f"{fc['torch_s'] / fc['coco_eval_s']:.2f}x")
    t.add_row("COCO eval (warm)", f"{fc['coco_eval_s']:.3f}", "1.00x")
    console.print(t)

    # 3. ranking on damaged and quantized models -------------------------------------------------
    rows: list[dict[str, Any]] = []

    def add_row(label: str, onnx_path: Path) -> None:
        a = ev.evaluate(onnx_path)
        f = fe.evaluate(onnx_path)
        rows.append({"model": label, "map50_95": a.map50_95, "det_map": f.det_map, "det_map50": f.det_map50,
                     "sqnr_db": f.sqnr_db, "fidelity_s": f.seconds, "coco_s": a.seconds})

    add_row("float", float_onnx)
    for kind, strengths in (("noise", (0.02, 0.05, 0.1, 0.2, 0.4)), ("pertensor", (8, 6, 5, 4))):
        for s in strengths:
            label = f"noise {s}" if kind == "noise" else f"per-tensor int{s}"
            add_row(label, export_onnx(degrade(model.module, kind, s), work / f"{kind}-{s}.onnx", spec.imgsz))
    if not args.no_brevitas:
        try:
            from mpq.assignment import Assignment
            from mpq.data import CalibrationSet
            from quantizers import get_backend

            backend = get_backend(spec.backend, device="cpu")
            cal_images, _ = preprocess_many(calib[:spec.calibration.max_images], spec.imgsz, progress=False)
            cal = CalibrationSet(images=cal_images, paths=calib[:spec.calibration.max_images],
                                 batch_size=spec.calibration.batch_size)
            for prec in ("W8A8", "W8A16", "W4A16", "W4A8"):
                a = Assignment.uniform(model.quantizable_layers, prec)
                qm = backend.materialize(model, a, cal)
                res = backend.export(qm, work / f"brevitas-{prec}.onnx")
                add_row(f"Brevitas {prec}", Path(getattr(res, "path", res)))
        except Exception as exc:  # noqa: BLE001 - the backend is another part; report, do not fail
            console.print(f"[yellow]Brevitas rows skipped: {type(exc).__name__}: {exc}[/]")
    maps = [r["map50_95"] for r in rows]
    figures["ranking"] = {"rows": rows, "spearman_det_map": _spearman(maps, [r["det_map"] for r in rows]),
                          "spearman_sqnr": _spearman(maps, [r["sqnr_db"] for r in rows])}
    t = Table(title="Damaged and quantized models: COCO mAP vs label-free fidelity")
    for c in ("model", "COCO mAP50-95", "fidelity det_map", "det_map50", "SQNR dB"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for r in rows:
        t.add_row(r["model"], f"{r['map50_95']:.4f}", f"{r['det_map']:.4f}", f"{r['det_map50']:.4f}",
                  f"{r['sqnr_db']:.1f}")
    console.print(t)
    rank = figures["ranking"]
    console.print(f"Spearman rank correlation with COCO mAP50-95: det_map {rank['spearman_det_map']:.3f}, "
                  f"SQNR {rank['spearman_sqnr']:.3f} ({len(rows)} models)", highlight=False)

    # 4. ORT latency ------------------------------------------------------------------------------
    lat_rows = []
    for batch in (spec.latency.batch_size, 8):
        r = OrtLatencyEvaluator(providers=spec.latency_providers, imgsz=spec.imgsz, warmup=spec.latency.warmup,
                                runs=spec.latency.runs, batch_size=batch, threads=spec.latency.threads).evaluate(
            float_onnx)
        lat_rows.append(r.to_dict())
    figures["latency"] = lat_rows
    t = Table(title="ONNX Runtime latency of the float ONNX")
    for c in ("provider", "device", "batch", "runs", "median ms", "p90 ms", "images/s"):
        t.add_column(c)
    for r in lat_rows:
        t.add_row(r["provider"].removesuffix("ExecutionProvider"), r["device"], str(r["batch_size"]),
                  str(r["runs"]), f"{r['median_ms']:.2f}",
                  f"{r['p90_ms']:.2f}", f"{r['fps']:.1f}")
    console.print(t)
    figures["machine"]["loadavg_end"] = os.getloadavg()
    console.print(f"load average at the end: {os.getloadavg()[0]:.2f}", highlight=False)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, default=str))
        console.print(f"wrote {args.out}")
    if args.markdown:
        args.markdown.write_text(markdown(figures))
        console.print(f"wrote {args.markdown}")
    return 0


def markdown(f: dict[str, Any]) -> str:
    """The figures as the markdown tables of docs/benchmarks.md."""
    c, fc, rk = f["coco"], f["fidelity_cost"], f["ranking"]
    n = c["images"]
    load = f["machine"]
    ours, ul_json, ul_own = (c["map50_95"][k] for k in ("ours", "pycocotools_on_ultralytics_json",
                                                          "ultralytics_internal"))
    ours50, ul_json50, ul_own50 = (c["map50"][k] for k in ("ours", "pycocotools_on_ultralytics_json",
                                                           "ultralytics_internal"))
    cold = c["ours_cold_images_per_s"]
    out = [
        f"Study `{f['study']}` ({Path(f['model']).name}, imgsz {f['imgsz']}, {n} eval images), "
        f"{load['cpu_count']} CPUs, load average {load['loadavg_start'][0]:.1f} at start and "
        f"{load['loadavg_end'][0]:.1f} at end.",
        "",
        "| COCO evaluation of the float ONNX | images/s | s per eval | mAP50-95 | mAP50 |",
        "|---|---|---|---|---|",
        f"| ours, cold (preprocessing included) | {cold:.1f} | {n / cold:.2f} | {ours:.4f} | {ours50:.4f} |",
        f"| ours, warm (what a search trial pays) | {c['ours_warm_images_per_s']:.1f} | "
        f"{c['ours_warm_seconds']:.2f} | {ours:.4f} | {ours50:.4f} |",
        f"| Ultralytics `val` on the same ONNX (its own mAP) | {c['ultralytics_images_per_s']:.1f} | "
        f"{c['ultralytics_seconds']:.2f} | {ul_own:.4f} | {ul_own50:.4f} |",
        f"| pycocotools on Ultralytics' `save_json` predictions | | | {ul_json:.4f} | {ul_json50:.4f} |",
        f"| Ultralytics `val` with predict's image rounding (its own mAP) | | | "
        f"{c['map50_95']['ultralytics_internal_predict_rounding']:.4f} | "
        f"{c['map50']['ultralytics_internal_predict_rounding']:.4f} |",
        f"| pycocotools on that `save_json` | | | "
        f"{c['map50_95']['pycocotools_on_ultralytics_json_predict_rounding']:.4f} | "
        f"{c['map50']['pycocotools_on_ultralytics_json_predict_rounding']:.4f} |",
        "",
        "Ours, warm, per stage (s): " + ", ".join(f"{k} {v}" for k, v in c["ours_timings"].items()),
        "",
        f"| Fidelity ({fc['images']} calibration images) vs COCO eval ({n} images) | seconds | vs COCO eval |",
        "|---|---|---|",
        f"| fidelity, ONNX candidate | {fc['onnx_s']:.3f} | {fc['onnx_s'] / fc['coco_eval_s']:.2f}x |",
        f"| fidelity, torch module candidate | {fc['torch_s']:.3f} | {fc['torch_s'] / fc['coco_eval_s']:.2f}x |",
        f"| COCO eval (warm) | {fc['coco_eval_s']:.3f} | 1.00x |",
        "",
        "| model | COCO mAP50-95 | fidelity det_map | det_map50 | SQNR dB |",
        "|---|---|---|---|---|",
    ]
    out += [f"| {r['model']} | {r['map50_95']:.4f} | {r['det_map']:.4f} | {r['det_map50']:.4f} | "
            f"{r['sqnr_db']:.1f} |" for r in rk["rows"]]
    out += ["", f"Spearman rank correlation with COCO mAP50-95 over {len(rk['rows'])} models: det_map "
                f"{rk['spearman_det_map']:.3f}, SQNR {rk['spearman_sqnr']:.3f}.", "",
            "| ORT latency, float ONNX | device | batch | runs | median ms | p90 ms | images/s |",
            "|---|---|---|---|---|---|---|"]
    out += [f"| {r['provider']} | {r['device']} | {r['batch_size']} | {r['runs']} | {r['median_ms']:.2f} | "
            f"{r['p90_ms']:.2f} | {r['fps']:.1f} |" for r in f["latency"]]
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    raise SystemExit(main())
