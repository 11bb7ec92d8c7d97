"""Deployment benchmark (issue 12): what the lowered files buy on ONNX Runtime CPU, and the
TensorRT rule check on the demo and on ``yolov10m.yaml``.

1. Demo (``studies/demo.yaml``, ``deploy.target: ort-cpu``): uniform W8A8, W4A8, W8A16 and
   W4A16 built as every trial is (``TrialPipeline.run``: materialize, export, lower,
   COCO mAP, latency, what ONNX Runtime runs), plus, for comparison, the same W8A8 /
   W4A16 as the backend's QCDQ export (``deploy.target: qcdq``), W8A8 with the SiLU left
   in float (``deploy.int8_silu: false``), W8A8 with the ops between A8 layers in float
   (``deploy.int8_ops: false``: the SiLU between two A8 layers only), ONNX Runtime's own
   ``quantize_static`` (QDQ, u8 activations, s8 per-channel weights, Conv only, MinMax) on
   the float ONNX, and W4A16 with its weights kept as int8 + ``DequantizeLinear`` (what the
   ort-cpu lowering avoids). Then every file is timed against the float ONNX in one
   process, ``--rounds`` times (each round: ``OrtLatencyEvaluator(reference=float)``, timed
   runs alternating with float's), and the spread of the ratios is reported: the machine is
   shared, so only ratios measured in the same window mean anything.
2. TensorRT rule check (``quantizers.lowering.checks.check_tensorrt``) of the demo's W8A8
   and mixed builds lowered for ``tensorrt``, and of ``yolov10m.yaml`` (random init, 640,
   a few calibration images: graph checks only) at W8A8 and at a mixed assignment.

    python benchmarks/bench_deploy.py --out runs/bench-deploy --rounds 5
    python benchmarks/bench_deploy.py --only latency --rounds 5     # re-time the files of a previous run
    python benchmarks/bench_deploy.py --only demo                   # demo rows only (keeps the TensorRT table)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import machine  # noqa: E402  (benchmarks/ is the script folder)


def _spec(target: str, out: Path, **deploy: Any) -> Any:
    from search.spec import load_spec

    return load_spec(REPO / "studies" / "demo.yaml", runs_dir=str(out), deploy={"target": target, **deploy})


#: the rows built through the trial pipeline: (row suffix, run folder, deploy section, precisions to build)
VARIANTS = (("ort-cpu", "demo-ort-cpu", {"target": "ort-cpu"}, None),
            ("ort-cpu float ops", "demo-ort-cpu-float-ops", {"target": "ort-cpu", "int8_ops": False}, ("W8A8",)),
            ("ort-cpu float SiLU", "demo-ort-cpu-float-silu", {"target": "ort-cpu", "int8_silu": False}, ("W8A8",)),
            ("qcdq", "demo-qcdq", {"target": "qcdq"}, ("W8A8", "W4A16")))


def build_demo(out: Path, precisions: list[str], reuse: bool = False) -> dict[str, Any]:
    """Build the demo rows; return {name: record} with the file of each."""
    from mpq.assignment import Assignment, Precision
    from search.pipeline import TrialPipeline

    rows: dict[str, Any] = {}
    for target, folder, deploy, only in VARIANTS:
        precs = [p for p in precisions if only is None or p in only]
        pipeline = TrialPipeline.for_spec(_spec(**deploy, out=out), run_dir=out / folder, progress=False)
        res = pipeline.resources
        base = pipeline.baseline.metrics()
        float_onnx = pipeline.baseline.onnx()
        rows["float"] = {"file": str(float_onnx), "map50_95": base.map50_95, "map50": base.map50,
                         "onnx_bytes": float_onnx.stat().st_size, "weight_bytes": base.weight_bytes}
        for p in precs:
            precision = Precision.parse(p)
            assignment = Assignment.from_groups(res.groups, {g.name: precision for g in res.groups})
            t0 = time.perf_counter()
            result = pipeline.run(assignment, out_dir=out / folder / p.lower(), use_cache=reuse)
            m = result.metrics
            rows[f"{p} {target}"] = {
                "file": str(result.artifact), "target": target, "precision": p,
                "map50_95": m.map50_95, "map50": m.map50, "drop_pt": 100 * (base.map50_95 - m.map50_95),
                "a8_asked": m.a8_asked, "ran_int8": m.a8_ran_int8, "a8_ran_float": list(m.a8_ran_float),
                "onnx_bytes": m.onnx_bytes, "weight_bytes": m.weight_bytes,
                "weight_bytes_packed": m.weight_bytes_packed, "rule_violations": m.rule_violations,
                "build_s": round(time.perf_counter() - t0, 1)}
            print(f"{p} {target}: mAP50-95 {m.map50_95:.4f} ({rows[f'{p} {target}']['drop_pt']:+.2f} pt drop), "
                  f"A8 asked {m.a8_asked} / ran int8 {m.a8_ran_int8}", flush=True)
    return rows


def ort_quantize_static(out: Path, rows: dict[str, Any]) -> None:
    """ONNX Runtime's own quantize_static on the float ONNX (the issue's reference point)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from search.pipeline import TrialPipeline

    pipeline = TrialPipeline.for_spec(_spec("ort-cpu", out), run_dir=out / "demo-ort-cpu", progress=False)
    images = pipeline.resources.calibration.images

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"images": images[i:i + 1]} for i in range(len(images))])

        def get_next(self) -> Any:
            return next(self.it, None)

    path = out / "ort-quantize-static.onnx"
    quantize_static(str(pipeline.baseline.onnx()), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv"])
    acc = pipeline.evaluator.coco.evaluate(path)
    rows["W8A8 ORT quantize_static"] = {"file": str(path), "map50_95": acc.map50_95, "map50": acc.map50,
                                        "drop_pt": 100 * (rows["float"]["map50_95"] - acc.map50_95),
                                        "onnx_bytes": path.stat().st_size}


def dq_weight_variant(out: Path, rows: dict[str, Any]) -> None:
    """W4A16 with its weights as int8 initializers + DequantizeLinear (no Clip), i.e. what
    ort-cpu would run if the lowering kept weight-only DQs, to measure what they cost."""
    import onnx

    from quantizers.lowering import graph as G

    src = rows.get("W4A16 ort-cpu")
    if src is None:
        return
    model = onnx.load(src["file"])
    ed = G.GraphEditor(model)
    for node in model.graph.node:
        if node.op_type != "Conv" or not node.name.startswith("/model.") or "/dfl/" in node.name:
            continue
        import numpy as np

        w = G.GraphIndex(model).const(node.input[1])
        if w is None or w.dtype != np.float32:
            continue
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale[:, None, None, None]), -8, 7).astype(np.int8)
        node.input[1] = G.add_weight_dq(ed, node.name, q, G.QParams(scale, np.zeros(scale.shape, np.int8), "int8", 0),
                                        scope=node.name.rsplit("/", 1)[0], before=node)
    ed.finish()
    path = out / "w4a16-dq-weights.onnx"
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # a comparison row only: report and go on
        print(f"skipped the W4A16 DQ-weights variant: {str(exc)[:200]}", flush=True)
        return
    rows["W4A16 DQ weights"] = {"file": str(path), "onnx_bytes": path.stat().st_size,
                                "note": "weights as int8 + DequantizeLinear (not what the lowering writes)"}


def time_rows(rows: dict[str, Any], rounds: int, runs: int, threads: int | None) -> None:
    """Ratios to float, every file timed against the float ONNX in the same window, ``rounds`` times."""
    import numpy as np

    from evaluators.latency import OrtLatencyEvaluator

    float_file = rows["float"]["file"]
    names = [k for k in rows if k != "float"]
    ev = OrtLatencyEvaluator(imgsz=192, warmup=10, runs=runs, threads=threads)
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names:
            lat = ev.evaluate(rows[k]["file"], reference=float_file)
            ratios[k].append(float(lat.extra["ratio"]))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} x{ratios[k][-1]:.2f}" for k in names), flush=True)
    for k in names:
        v = np.asarray(ratios[k])
        rows[k]["latency_ratios"] = [round(x, 3) for x in v]
        rows[k]["latency_ratio_median"] = round(float(np.median(v)), 3)
        rows[k]["latency_ratio_range"] = [round(float(v.min()), 3), round(float(v.max()), 3)]


def time_rows_cpu(rows: dict[str, Any], rounds: int, runs: int) -> None:
    """The same ratios in CPU time of the calling thread (ONNX Runtime with one intra-op thread
    runs every kernel on it): a shared machine preempts the process, which wall-clock ratios
    absorb only when both models are slowed alike; thread CPU time does not count the time
    the thread waits. Each run alternates candidate and float, as the latency evaluator does."""
    import time as _time

    import numpy as np
    import onnxruntime as ort

    def session(path: str) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    x = np.random.default_rng(0).random((1, 3, 192, 192), dtype=np.float32)
    ref = session(rows["float"]["file"])
    names = [k for k in rows if k != "float"]
    sessions = {k: session(rows[k]["file"]) for k in names}
    for s in [ref, *sessions.values()]:
        for _ in range(10):
            s.run(None, {"images": x})
    ratios: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(rounds):
        for k in names:
            per = []
            for _ in range(runs):
                t0 = _time.thread_time()
                sessions[k].run(None, {"images": x})
                t1 = _time.thread_time()
                ref.run(None, {"images": x})
                per.append((t1 - t0) / max(_time.thread_time() - t1, 1e-9))
            ratios[k].append(float(np.median(per)))
    for k in names:
        v = np.asarray(ratios[k])
        rows[k]["cpu_ratio_median"] = round(float(np.median(v)), 3)
        rows[k]["cpu_ratio_range"] = [round(float(v.min()), 3), round(float(v.max()), 3)]


def tensorrt_checks(out: Path, yolov10m: bool) -> list[dict[str, Any]]:
    """check_tensorrt on the demo and on yolov10m.yaml builds lowered for TensorRT."""
    from mpq.assignment import Assignment, Precision
    from mpq.data import CalibrationSet, preprocess_many, read_calibration_list
    from mpq.model import load_model
    from quantizers import get_backend
    from quantizers.lowering import lower
    from quantizers.lowering.checks import check_tensorrt

    spec = _spec("tensorrt", out)
    cases = [("demo", spec.model, spec.imgsz, 8)]
    if yolov10m:
        cases.append(("yolov10m.yaml", Path("yolov10m.yaml"), 640, 2))
    records = []
    for label, model_path, imgsz, n_img in cases:
        model = load_model(model_path, imgsz)
        paths = read_calibration_list(spec.calibration.source, n_img)
        images, _ = preprocess_many(paths, imgsz, progress=False)
        calib = CalibrationSet(images=images, paths=paths, batch_size=n_img)
        layers = model.quantizable_layers
        cycle = [Precision(4, 8), Precision(8, 8), Precision(4, 16), Precision(8, 16)]
        assignments = {"W8A8": Assignment({lay.name: Precision(8, 8) for lay in layers}),
                       "mixed": Assignment({lay.name: cycle[i % 4] for i, lay in enumerate(layers) if i % 6 != 5})}
        for bname in ("brevitas", "modelopt"):
            backend = get_backend(bname, device="cpu", target="tensorrt")
            for aname, assignment in assignments.items():
                t0 = time.perf_counter()
                q = backend.materialize(model, assignment, calib)
                src = out / "tensorrt" / f"{label}-{bname}-{aname}.export.onnx"
                backend.export(q, src)
                dst = src.with_name(src.name.replace(".export", ""))
                result = lower(src, dst, target="tensorrt", layers=model.layers)
                raw = check_tensorrt(src)
                violations = check_tensorrt(dst)
                rec = {"model": label, "backend": bname, "assignment": aname, "layers": len(assignment),
                       "int8_layers": result.int8_layers, "violations_export": len(raw),
                       "export_rules_broken": sorted({v.rule for v in raw}), "violations_lowered": len(violations),
                       "lowered_rules_broken": sorted({v.rule for v in violations}),
                       "node_counts": dict(result.node_counts), "seconds": round(time.perf_counter() - t0, 1)}
                records.append(rec)
                print(f"tensorrt check {label} {bname} {aname}: export breaks {rec['export_rules_broken']}, "
                      f"lowered breaks {rec['lowered_rules_broken'] or 'nothing'}", flush=True)
    return records


def markdown(rows: dict[str, Any], trt: list[dict[str, Any]]) -> str:
    lines = ["| artifact | mAP50-95 | drop (pt) | A8 asked / ran int8 | latency vs float, wall, median (range) | "
             "CPU time vs float, 1 thread, median (range) | ONNX file (MB) | packed weights (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        lat = (f"x{r['latency_ratio_median']:.2f} ({r['latency_ratio_range'][0]:.2f}-{r['latency_ratio_range'][1]:.2f})"
               if "latency_ratio_median" in r else ("x1.00" if k == "float" else ""))
        cpu = (f"x{r['cpu_ratio_median']:.2f} ({r['cpu_ratio_range'][0]:.2f}-{r['cpu_ratio_range'][1]:.2f})"
               if "cpu_ratio_median" in r else ("x1.00" if k == "float" else ""))
        a8 = f"{r['a8_asked']} / {r['ran_int8']}" if r.get("a8_asked") is not None else ""
        m = f"{r['map50_95']:.4f}" if "map50_95" in r else ""
        d = f"{r['drop_pt']:.2f}" if "drop_pt" in r else ""
        packed = r.get("weight_bytes_packed") or r.get("weight_bytes")
        lines.append(f"| {k} | {m} | {d} | {a8} | {lat} | {cpu} | {r['onnx_bytes'] / 1e6:.2f} | "
                     f"{packed / 1e6 if packed else 0:.2f} |".replace("| 0.00 |", "|  |"))
    if trt:
        lines += ["", "| model | backend | assignment | A8 layers lowered | rules the export breaks | "
                  "rules the lowered file breaks |", "|---|---|---|---|---|---|"]
        for t in trt:
            lines.append(f"| {t['model']} | {t['backend']} | {t['assignment']} | {t['int8_layers']} | "
                         f"{', '.join(t['export_rules_broken']) or 'none'} ({t['violations_export']}) | "
                         f"{', '.join(t['lowered_rules_broken']) or 'none'} ({t['violations_lowered']}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-deploy"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=100, help="timed runs per latency measurement")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    ap.add_argument("--precisions", nargs="+", default=["W8A8", "W4A8", "W8A16", "W4A16"])
    ap.add_argument("--only", choices=("all", "demo", "latency", "tensorrt"), default="all",
                    help="demo: build and time the demo rows (keep earlier TensorRT results); latency: re-time")
    ap.add_argument("--no-yolov10m", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="demo: reuse finished builds of an earlier run in --out")
    args = ap.parse_args()
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    data: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    data["machine"] = machine()
    if args.only in ("all", "demo"):
        rows = build_demo(out, args.precisions, reuse=args.reuse)
        ort_quantize_static(out, rows)
        dq_weight_variant(out, rows)
        data["rows"] = rows
    if args.only in ("all", "demo", "latency"):
        time_rows(data["rows"], args.rounds, args.runs, args.threads)
        time_rows_cpu(data["rows"], args.rounds, args.runs)
        data["latency"] = {"rounds": args.rounds, "runs": args.runs, "threads": args.threads,
                           "cpu_time": "one intra-op thread, thread CPU time, alternating with float"}
    if args.only in ("all", "tensorrt"):
        data["tensorrt"] = tensorrt_checks(out, not args.no_yolov10m)
    data["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = markdown(data.get("rows", {}), data.get("tensorrt", []))
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
