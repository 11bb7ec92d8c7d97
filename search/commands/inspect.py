"""``search inspect MODEL_OR_STUDY``: the quantizable layer groups of a model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="load a model offline, fold BatchNorm and list its quantizable layers",
                       description=__doc__)
    p.add_argument("target", nargs="?", type=Path, default=None,
                   help="a .pt checkpoint, a .yaml architecture (e.g. yolov10m.yaml) or a study spec "
                        "(default: the demo study)")
    p.add_argument("--imgsz", type=int, default=None, help="image size for MACs (default: the study's, else 640)")
    p.add_argument("--granularity", "-g", choices=("layer", "block"), default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the layer table as JSON here")
    p.set_defaults(handler=run)


def _is_study(path: Path) -> bool:
    if path.suffix.lower() not in (".yaml", ".yml") or not path.is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "model" in data and "backbone" not in data


def run(args: argparse.Namespace) -> int:
    from mpq.model import load_model
    from search.commands import load_study
    from search.console import console
    from search.report_tables import layer_table_view

    target: Path | None = args.target
    granularity = args.granularity
    if target is None or _is_study(target):
        spec = load_study(target)
        model_path, imgsz = spec.model, args.imgsz or spec.imgsz
        granularity = granularity or spec.granularity
        max_det = spec.evaluation.max_det
    else:
        model_path, imgsz, max_det = target, args.imgsz or 640, 300
        granularity = granularity or "layer"
    with console.status(f"loading {model_path.name} (imgsz {imgsz}) ..."):
        model = load_model(model_path, imgsz, max_det=max_det)
    console.print(layer_table_view(model, granularity))
    quant = model.quantizable_layers
    skipped = [lay for lay in model.layers if not lay.quantizable]
    console.print(
        f"[bold]{model.source.name}[/]: {model.info['head']} head, output {model.layout} "
        f"{tuple(model.output_shape())}, {len(model.names)} classes, loaded and fused in {model.load_seconds:.1f} s",
        highlight=False)
    console.print(
        f"{model.total_convs} Conv2d in the model as built; {model.dropped_convs} dropped by fusion "
        "(the one-to-many training head of YOLOv10, merged re-parameterized branches); "
        f"{len(model.layers)} remain, {len(quant)} quantizable"
        + ("; not quantized: " + ", ".join(f"{lay.name} ({lay.reason})" for lay in skipped) if skipped else ""),
        highlight=False)
    if args.json:
        import dataclasses
        import json

        args.json.write_text(json.dumps({"model": str(model.source), "imgsz": imgsz, "layout": model.layout,
                                         "layers": [dataclasses.asdict(lay) for lay in model.layers]}, indent=2))
        console.print(f"wrote {args.json}")
    return 0
