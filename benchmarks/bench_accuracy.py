"""Honest-accuracy benchmark: the head, the checkpoint itself, a held-out split, bootstrap intervals.

For the study (default: the demo) and each head (``auto``, which follows the checkpoint, and
the other one), it measures:

- the float model: our mAP50-95 / mAP50 (ONNX Runtime + pycocotools) on the search subset
  and on the verification split (``dataset.verify``), beside Ultralytics' own validator on
  the ``.pt`` checkpoint with the same head (pycocotools on its ``save_json`` predictions
  with predict's image rounding, and its stock ``model.val()`` metric);
- a few quantized configurations built by the study's backend (uniform W8A16, W8A8,
  W4A16, and W4A16 with the first conv at W8A16), scored on both splits, each with the
  paired bootstrap 95 % interval of its change vs float (1000 resamples of the images,
  the same for float and trial), whether the verification change falls inside the search
  interval, and what the bootstrap costs.

    python benchmarks/bench_accuracy.py                      # the demo; results in runs/bench-accuracy
    python benchmarks/bench_accuracy.py --heads auto --configs W8A8 --out runs/bench-acc-quick

Results go to ``<out>/results.json`` and the markdown tables to ``<out>/results.md``.
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

CONFIGS = ("W8A16", "W8A8", "W4A16-first-W8", "W4A16")


def _assignment(res: Any, name: str) -> Any:
    from mpq.assignment import Assignment

    layers = [g for group in res.groups for g in group.layers]
    if name == "W4A16-first-W8":
        return Assignment({n: ("W8A16" if n == "model.0.conv" else "W4A16") for n in layers})
    return Assignment.uniform(layers, name)


def bench_head(study: Path, head: str, configs: list[str], out: Path, n_boot: int) -> dict[str, Any]:
    from evaluators.bootstrap import PairedBootstrap
    from evaluators.coco import CocoEvaluator
    from evaluators.reference import ultralytics_val_checkpoint
    from search.pipeline import TrialPipeline
    from search.spec import load_spec

    spec = load_spec(study, head=head)
    pipeline = TrialPipeline.for_spec(spec, run_dir=out / f"run-{head}", progress=False)
    res = pipeline.resources
    res.prepare_run_dir()
    if res.verify_subset is None:
        raise SystemExit(f"{study}: no dataset.verify split")
    t0 = time.perf_counter()
    float_onnx = pipeline.baseline.onnx()
    export_s = time.perf_counter() - t0
    search_ev = pipeline.evaluator.coco
    verify_ev = CocoEvaluator(subset=res.verify_subset, names=res.model.names, imgsz=spec.imgsz,
                              settings=spec.evaluation, cache_dir=res.paths.cache, progress=False)
    rec: dict[str, Any] = {"head": head, "resolved_head": res.model.head, "layout": res.model.layout,
                           "quantizable_layers": len(res.model.quantizable_layers), "float_export_s": export_s}
    fl: dict[str, Any] = {}
    for split, ev in (("search", search_ev), ("verify", verify_ev)):
        acc = ev.evaluate(float_onnx)
        fl[split] = {"map50_95": acc.map50_95, "map50": acc.map50, "detections": acc.num_detections,
                     "images": acc.num_images, "postprocess": acc.extra["postprocess"]["label"]}
    if spec.model.suffix == ".pt":
        for letterbox in ("predict", "val"):
            ul = ultralytics_val_checkpoint(spec.model, evaluator=search_ev, workdir=out / f"ul-{head}",
                                            head=res.model.head, letterbox=letterbox)
            fl[f"ultralytics_pt_{letterbox}"] = {"map50_95": ul.map50_95, "map50": ul.map50,
                                                 "coco_map50_95": ul.coco_map50_95, "coco_map50": ul.coco_map50,
                                                 "detections": ul.num_detections, "head": ul.extra["head"]}
    rec["float"] = fl
    t0 = time.perf_counter()
    boots = {"search": PairedBootstrap(search_ev.per_image(float_onnx), n_boot=n_boot),
             "verify": PairedBootstrap(verify_ev.per_image(float_onnx), n_boot=n_boot)}
    rec["bootstrap_reference_s"] = time.perf_counter() - t0
    rows = []
    for name in configs:
        outcome = pipeline.run(_assignment(res, name))
        row: dict[str, Any] = {"config": name, "w4_weight_share": outcome.metrics.w4_weight_share,
                               "build_s": outcome.timings.get("materialize", 0) + outcome.timings.get("export", 0)}
        for split, ev in (("search", search_ev), ("verify", verify_ev)):
            acc = ev.evaluate(outcome.artifact) if split == "verify" else None
            t0 = time.perf_counter()
            pe = ev.per_image(outcome.artifact)  # the search split's records were written by the trial itself
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            iv = boots[split].intervals(pe)
            boot_s = time.perf_counter() - t0
            m = pe.map()
            row[split] = {"map50_95": m["map50_95"], "map50": m["map50"],
                          "interval": iv["map50_95"].to_dict(), "interval50": iv["map50"].to_dict(),
                          "records_load_s": load_s, "bootstrap_s": boot_s,
                          "checked_against": acc.map50_95 if acc is not None else outcome.metrics.map50_95}
        s_iv, v_iv = row["search"]["interval"], row["verify"]["interval"]
        row["verify_change_inside_search_interval"] = s_iv["low"] <= v_iv["delta"] <= s_iv["high"]
        rows.append(row)
        print(f"{head} {name}: search {s_iv['delta'] * 100:+.2f} pt [{s_iv['low'] * 100:+.2f}, "
              f"{s_iv['high'] * 100:+.2f}], verify {v_iv['delta'] * 100:+.2f} pt [{v_iv['low'] * 100:+.2f}, "
              f"{v_iv['high'] * 100:+.2f}]", flush=True)
    rec["configs"] = rows
    return rec


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| head (spec) | head used | split | float mAP50-95 | float mAP50 | detections |",
             "|---|---|---|---|---|---|"]
    for r in results:
        for split in ("search", "verify"):
            f = r["float"][split]
            lines.append(f"| {r['head']} | {r['resolved_head']} | {split} ({f['images']} images) | "
                         f"{f['map50_95']:.4f} | {f['map50']:.4f} | {f['detections']} |")
        for lb, what in (("predict", "pycocotools on Ultralytics' .pt predictions (predict rounding)"),
                         ("val", "Ultralytics `model.val()` of the .pt (stock), its own metric / pycocotools")):
            u = r["float"].get(f"ultralytics_pt_{lb}")
            if u is None:
                continue
            value = (f"{u['coco_map50_95']:.4f} | {u['coco_map50']:.4f}" if lb == "predict" else
                     f"{u['map50_95']:.4f} / {u['coco_map50_95']:.4f} | {u['map50']:.4f} / {u['coco_map50']:.4f}")
            lines.append(f"| {r['head']} | {u['head']} | search: {what} | {value} | {u['detections']} |")
    lines += ["", "| head | configuration | W4 share | split | mAP50-95 | change vs float (pt) | 95 % interval (pt) "
              "| width (pt) | bootstrap (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["configs"]:
            for split in ("search", "verify"):
                s = c[split]
                iv = s["interval"]
                lines.append(f"| {r['resolved_head']} | {c['config']} | {c['w4_weight_share']:.0%} | {split} | "
                             f"{s['map50_95']:.4f} | {iv['delta'] * 100:+.2f} | [{iv['low'] * 100:+.2f}, "
                             f"{iv['high'] * 100:+.2f}] | {(iv['high'] - iv['low']) * 100:.2f} | "
                             f"{s['bootstrap_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    ap.add_argument("--heads", nargs="+", default=["auto", "one2one"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    t0 = time.perf_counter()
    results = [bench_head(args.study, h, list(args.configs), args.out, args.n_boot) for h in args.heads]
    info["seconds"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))
    md = markdown(results)
    (args.out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
