"""``search eval [STUDY] [--onnx PATH]``: COCO mAP of an ONNX model through ONNX Runtime.

Without ``--onnx`` it evaluates the study's float model, exported once to
``runs/<study>/float/model.onnx`` with the study's head (reused while the source model,
head and image size are unchanged), and by default runs Ultralytics' own validator beside
it, on the same ONNX and on the ``.pt`` checkpoint itself (as ``model.val()`` runs it, and
with the study's head when Ultralytics' default head is another): Ultralytics' internal
mAP and pycocotools on its saved predictions, side by side with ours. Every table names
the head and the post-processing. ``--split verify`` scores the study's held-out
verification split (``dataset.verify``) instead of the search subset. Results are printed
as tables and written to ``metrics.json`` (in the float folder, beside the given ONNX, or
in ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.commands import add_study_arg, spec_value

if TYPE_CHECKING:
    from evaluators.base import AccuracyResult, LatencyResult
    from evaluators.reference import UltralyticsValResult
    from search.spec import StudySpec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO mAP of an ONNX model (default: the study's float model) via ONNX Runtime",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arg(p, positional=True)
    p.add_argument("--onnx", type=Path, default=None,
                   help="ONNX model to evaluate (default: export the study's float model)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for metrics.json (default: runs/<study>/float/ or beside --onnx)")
    p.add_argument("--compare-ultralytics", action=argparse.BooleanOptionalAction, default=None,
                   help="also run Ultralytics' validator on the same ONNX and on the .pt checkpoint "
                        "(default: on for the float model)")
    p.add_argument("--split", choices=("search", "verify"), default="search",
                   help="search: the subset trials are scored on (default); verify: the held-out "
                        "verification split (dataset.verify)")
    p.add_argument("--latency", action="store_true", help="also measure latency with the study's latency settings")
    p.add_argument("--batch-size", type=spec_value("positive"), default=None, help="override evaluation.batch_size")
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


def checkpoint_table(acc: AccuracyResult, runs: list[UltralyticsValResult], model_name: str) -> Any:
    """Ultralytics' validator on the .pt checkpoint itself, beside our mAP of the exported ONNX."""
    from rich.table import Table

    t = Table(title=f"Ultralytics' own validation of the checkpoint {model_name} (torch, fp32, CPU)",
              caption="Ultralytics: its validator's own mAP; COCO(UL): pycocotools on its save_json predictions; "
                      "vs ours: COCO(UL) mAP50-95 minus ours")
    for col in ("run", "head / post-processing", "Ultralytics mAP50-95", "COCO(UL) mAP50-95", "COCO(UL) mAP50",
                "detections", "vs ours"):
        t.add_column(col, justify="left" if col in ("run", "head / post-processing") else "right")
    for r in runs:
        head = r.extra.get("head", "?")
        call = "model.val(nms=False)" if r.extra.get("nms_arg") is False else "model.val()"
        t.add_row(call, "one-to-one, NMS-free" if head == "one2one" else "one-to-many + NMS",
                  _fmt(r.map50_95), _fmt(r.coco_map50_95), _fmt(r.coco_map50), str(r.num_detections),
                  f"{r.coco_map50_95 - acc.map50_95:+.4f}")
    return t


def _head_line(acc: AccuracyResult, spec: StudySpec, kind: str) -> str:
    post = acc.extra.get("postprocess") or {}
    head = post.get("head", "?")
    if kind != "float":
        return f"head: {head} ({post.get('label', '')}), read from the file's output layout"
    how = ("the one the checkpoint selects (spec head: auto)" if spec.head == "auto"
           else f"chosen by the spec (head: {spec.head})")
    return f"head: {head}, {how}; post-processing: {post.get('label', '')}"


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
    spec = load_study(args.study, trust=args.trust_checkpoint, **overrides)
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
    subset = _subset(res, args.split)

    from evaluators.onnx_graph import names_from_metadata, read_metadata

    names = names_from_metadata(read_metadata(onnx_path))
    if names is None:
        with console_err.status(f"reading class names from {spec.model.name} ..."):
            names = res.model.names
    from evaluators.coco import CocoEvaluator

    ev = CocoEvaluator(subset=subset, names=names, imgsz=spec.imgsz, settings=spec.evaluation,
                       cache_dir=res.paths.cache, progress=True)
    acc = ev.evaluate(onnx_path)
    ul = None
    ckpt: list[UltralyticsValResult] = []
    if compare:
        from evaluators.reference import ultralytics_val

        with console_err.status("Ultralytics' validator on the same ONNX ..."):
            ul = ultralytics_val(onnx_path, evaluator=ev, workdir=Path(out_dir) / "ultralytics",
                                 layout=acc.extra["layout"])
        if kind == "float" and spec.model.suffix == ".pt":
            ckpt = _validate_checkpoint(spec, ev, acc, Path(out_dir) / "ultralytics")
    lat = None
    if args.latency:
        from evaluators import make_latency_evaluator

        with console_err.status("latency ..."):
            lat = make_latency_evaluator(spec.latency, imgsz=spec.imgsz, evaluation=spec.evaluation,
                                         cache_dir=res.paths.cache).evaluate(onnx_path)

    split = "" if args.split == "search" else "verification split: "
    title = (f"{spec.name}: {Path(onnx_path).name} ({kind}) on {split}{acc.num_images} images of "
             f"{subset.annotations_path.name}, imgsz {spec.imgsz}")
    console.print(metrics_table(acc, ul, title))
    console.print(_head_line(acc, spec, kind), highlight=False)
    console.print(per_class_table(acc, ul))
    if ul is not None:
        console.print(f"Ultralytics' own mAP uses its matching and interpolation, and its val rounds resized image "
                      f"sides up where predict (and we) round to nearest; "
                      f"pycocotools on its predictions differs from ours by "
                      f"{acc.map50_95 - ul.coco_map50_95:+.4f} mAP50-95.", highlight=False)
    if ckpt:
        _print_checkpoint(acc, ckpt, spec.model.name)
    if lat is not None:
        console.print(latency_line(lat), highlight=False)
    summary = {"mAP_50_95": acc.map50_95, "mAP_50": acc.map50, "mAP_75": acc.map75, "mAP_small": acc.map_small,
               "mAP_medium": acc.map_medium, "mAP_large": acc.map_large, "num_images": acc.num_images,
               "num_detections": acc.num_detections, "images_per_s": acc.images_per_s, "provider": acc.provider,
               "head": acc.extra["postprocess"]["head"], "postprocess": acc.extra["postprocess"]["label"],
               "split": args.split}
    if lat is not None:
        summary.update({"latency_mean_ms": lat.mean_ms, "latency_median_ms": lat.median_ms,
                        "latency_p90_ms": lat.p90_ms, "fps": lat.fps, "latency_provider": lat.provider})
    out = write_json(Path(out_dir) / ("metrics.json" if args.split == "search" else "metrics-verify.json"), {
        "study": spec.name, "onnx": str(onnx_path), "kind": kind, "split": args.split,
        "head": {"spec": spec.head, **acc.extra["postprocess"]}, "summary": summary,
        "accuracy": acc.to_dict(), "ultralytics": ul.to_dict() if ul else None,
        "ultralytics_checkpoint": [r.to_dict() for r in ckpt],
        "latency": lat.to_dict() if lat else None, "versions": versions()})
    console.print(f"wrote {out}", highlight=False)
    return 0


def _validate_checkpoint(spec: StudySpec, ev: Any, acc: AccuracyResult, workdir: Path) -> list[UltralyticsValResult]:
    """Ultralytics' ``model.val()`` of the .pt as a user runs it, and with our head when its default is another."""
    from evaluators.reference import checkpoint_heads, ultralytics_val_checkpoint
    from search.console import console_err

    ours = acc.extra["postprocess"]["head"]
    with console_err.status("Ultralytics' validator on the .pt checkpoint ..."):
        heads = checkpoint_heads(spec.model)
        runs = [ultralytics_val_checkpoint(spec.model, evaluator=ev, workdir=workdir, head=None)]
        if heads["ultralytics_default"] != ours and heads.get(ours):
            runs.append(ultralytics_val_checkpoint(spec.model, evaluator=ev, workdir=workdir, head=ours))
    return runs


def _subset(res: Any, split: str) -> Any:
    """The search subset, or the verification split for ``--split verify``."""
    from mpq.errors import UserError

    if split != "verify":
        return res.subset
    if res.verify_subset is None:
        raise UserError(f"--split verify: the study {res.spec.name} has no verification split "
                        "(add dataset.verify: {max_images: N} or {image_ids: FILE})")
    return res.verify_subset


def _print_checkpoint(acc: AccuracyResult, ckpt: list[UltralyticsValResult], model_name: str) -> None:
    """Ultralytics' validation of the .pt, and a note when its default head is not the one scored."""
    from search.console import console

    console.print(checkpoint_table(acc, ckpt, model_name))
    ours = acc.extra["postprocess"]["head"]
    default = ckpt[0]
    if default.extra.get("head") != ours:
        console.print(f"[yellow]note:[/] this study scores the {ours} head; Ultralytics' own model.val() of the "
                      f"checkpoint uses the {default.extra.get('head')} head (pycocotools "
                      f"{default.coco_map50_95:.4f} vs ours {acc.map50_95:.4f}); set the spec's head to choose.",
                      highlight=False)
