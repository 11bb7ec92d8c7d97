"""``search eval [STUDY] [--onnx PATH]``: COCO mAP of an ONNX model through ONNX Runtime.

Without ``--onnx`` it evaluates the study's float model, exported once to
``runs/<study>/float/model.onnx`` (reused while the source model and image size are
unchanged), and by default runs Ultralytics' own validator on the same ONNX beside it:
Ultralytics' internal mAP and pycocotools on its saved predictions, side by side with
ours. Results are printed as tables and written to ``metrics.json`` (in the float
folder, beside the given ONNX, or in ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.commands import add_study_arg

if TYPE_CHECKING:
    from evaluators.base import AccuracyResult, LatencyResult
    from evaluators.reference import UltralyticsValResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO mAP of an ONNX model (default: the study's float model) via ONNX Runtime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arg(p, positional=True)
    p.add_argument("--onnx", type=Path, default=None,
                   help="ONNX model to evaluate (default: export the study's float model)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for metrics.json (default: runs/<study>/float/ or beside --onnx)")
    p.add_argument("--compare-ultralytics", action=argparse.BooleanOptionalAction, default=None,
                   help="also run Ultralytics' validator on the same ONNX (default: on for the float model)")
    p.add_argument("--latency", action="store_true", help="also measure latency with the study's latency settings")
    p.add_argument("--batch-size", type=int, default=None, help="override evaluation.batch_size")
    p.set_defaults(handler=run)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "n/a" if x < 0 else f"{x:.{digits}f}"
    return str(x)


def metrics_table(acc: AccuracyResult, ul: UltralyticsValResult | None, title: str) -> Any:
    """Our COCO metrics (and Ultralytics' beside them) as a rich table."""
    from rich.table import Table

    t = Table(title=title, caption="ours: ONNX Runtime + pycocotools; Ultralytics: its validator's own mAP; "
                                   "COCO(UL): pycocotools on Ultralytics' save_json predictions" if ul else None)
    t.add_column("metric")
    t.add_column("ours", justify="right")
    if ul is not None:
        t.add_column("Ultralytics", justify="right")
        t.add_column("COCO(UL)", justify="right")
    rows: list[tuple[str, Any, Any, Any]] = [
        ("mAP50-95", acc.map50_95, ul.map50_95 if ul else None, ul.coco_map50_95 if ul else None),
        ("mAP50", acc.map50, ul.map50 if ul else None, ul.coco_map50 if ul else None),
        ("mAP75", acc.map75, None, None),
        ("mAP small", acc.map_small, None, None),
        ("mAP medium", acc.map_medium, None, None),
        ("mAP large", acc.map_large, None, None),
        ("images", acc.num_images, ul.num_images if ul else None, None),
        ("detections", acc.num_detections, None, ul.num_detections if ul else None),
        ("images/s", f"{acc.images_per_s:.1f}", f"{ul.images_per_s:.1f}" if ul else None, None),
        ("provider", acc.provider.removesuffix("ExecutionProvider"), "CPU" if ul else None, None),
        ("batch", acc.batch_size, None, None),
    ]
    for name, ours, theirs, coco in rows:
        cells = [name, _fmt(ours)]
        if ul is not None:
            cells += [_fmt(theirs), _fmt(coco)]
        t.add_row(*cells)
    return t


def per_class_table(acc: AccuracyResult, ul: UltralyticsValResult | None) -> Any:
    """Per-class AP50-95 (ours and Ultralytics') as a rich table."""
    from rich.table import Table

    t = Table(title="per-class AP50-95")
    t.add_column("class")
    t.add_column("ours", justify="right")
    if ul is not None:
        t.add_column("Ultralytics", justify="right")
    theirs = (ul.extra.get("per_class_map") or {}) if ul else {}
    for name, ap in acc.per_class.items():
        t.add_row(name, _fmt(ap), *([_fmt(theirs.get(name))] if ul is not None else []))
    for name in acc.extra.get("classes_without_gt", []):
        t.add_row(name, "no GT", *(["-"] if ul is not None else []))
    return t


def latency_line(lat: LatencyResult) -> str:
    """One line summing up a latency measurement."""
    return (f"latency ({lat.engine}, {lat.provider}, {lat.device}, batch {lat.batch_size}, "
            f"{lat.runs} runs): median {lat.median_ms:.2f} ms, p90 {lat.p90_ms:.2f} ms, {lat.fps:.1f} images/s")


def run(args: argparse.Namespace) -> int:
    from mpq.errors import UserError
    from mpq.files import versions, write_json
    from search.commands import load_study
    from search.console import console, console_err
    from search.pipeline import TrialPipeline

    overrides = {"evaluation.batch_size": args.batch_size} if args.batch_size else {}
    spec = load_study(args.study, **overrides)
    pipeline = TrialPipeline.for_spec(spec)
    res = pipeline.resources
    if args.onnx is not None:
        onnx_path = args.onnx
        if not onnx_path.is_file():
            raise UserError(f"--onnx: file not found: {onnx_path}")
        out_dir = args.out or onnx_path.parent
        compare = bool(args.compare_ultralytics)
        kind = "given"
    else:
        with console_err.status(f"float model {spec.model.name}: loading and exporting (reused when unchanged) ..."):
            onnx_path = pipeline.baseline.onnx()
        out_dir = args.out or pipeline.baseline.dir
        compare = args.compare_ultralytics is not False
        kind = "float"

    from evaluators.onnx_graph import names_from_metadata, read_metadata

    names = names_from_metadata(read_metadata(onnx_path))
    if names is None:
        with console_err.status(f"reading class names from {spec.model.name} ..."):
            names = res.model.names
    from evaluators.coco import CocoEvaluator

    ev = CocoEvaluator(subset=res.subset, names=names, imgsz=spec.imgsz, settings=spec.evaluation,
                       cache_dir=res.paths.cache, progress=True)
    acc = ev.evaluate(onnx_path)
    ul = None
    if compare:
        from evaluators.reference import ultralytics_val

        with console_err.status("Ultralytics' validator on the same ONNX ..."):
            ul = ultralytics_val(onnx_path, evaluator=ev, workdir=Path(out_dir) / "ultralytics",
                                 layout=acc.extra["layout"])
    lat = None
    if args.latency:
        from evaluators import make_latency_evaluator

        with console_err.status("latency ..."):
            lat = make_latency_evaluator(spec.latency, imgsz=spec.imgsz, evaluation=spec.evaluation,
                                         cache_dir=res.paths.cache).evaluate(onnx_path)

    title = (f"{spec.name}: {Path(onnx_path).name} ({kind}) on {acc.num_images} images of "
             f"{res.subset.annotations_path.name}, imgsz {spec.imgsz}")
    console.print(metrics_table(acc, ul, title))
    console.print(per_class_table(acc, ul))
    if ul is not None:
        console.print(f"Ultralytics' own mAP uses its matching and interpolation, and its val rounds resized image "
                      f"sides up where predict (and we) round to nearest; "
                      f"pycocotools on its predictions differs from ours by "
                      f"{acc.map50_95 - ul.coco_map50_95:+.4f} mAP50-95.", highlight=False)
    if lat is not None:
        console.print(latency_line(lat), highlight=False)
    summary = {"mAP_50_95": acc.map50_95, "mAP_50": acc.map50, "mAP_75": acc.map75, "mAP_small": acc.map_small,
               "mAP_medium": acc.map_medium, "mAP_large": acc.map_large, "num_images": acc.num_images,
               "num_detections": acc.num_detections, "images_per_s": acc.images_per_s, "provider": acc.provider}
    if lat is not None:
        summary.update({"latency_mean_ms": lat.mean_ms, "latency_median_ms": lat.median_ms,
                        "latency_p90_ms": lat.p90_ms, "fps": lat.fps, "latency_provider": lat.provider})
    out = write_json(Path(out_dir) / "metrics.json", {
        "study": spec.name, "onnx": str(onnx_path), "kind": kind, "summary": summary,
        "accuracy": acc.to_dict(), "ultralytics": ul.to_dict() if ul else None,
        "latency": lat.to_dict() if lat else None, "versions": versions()})
    console.print(f"wrote {out}", highlight=False)
    return 0
