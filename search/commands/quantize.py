"""``search quantize``: one quantized model, exported and evaluated against the float model.

The hand workflow in one line: build a uniform assignment (``--weights 4 --acts 8`` puts
every quantizable layer at W4A8; ``--study``'s ``keep_float`` patterns stay float) or read
one from ``--assignment FILE.json``, materialize it with the study's backend (or
``--backend``), export the Q/DQ ONNX, evaluate it with the study's evaluators and print
float vs quantized mAP, size, latency, Q/DQ counts and times.

Output goes to ``--out DIR`` (default ``runs/<study>/quantize/<label>-<digest>/``):
``model.onnx`` (lowered for the study's ``deploy.target``), ``model.onnx.json`` (what is in the
file: target, rules, per-layer forms, sizes), ``assignment.json`` and
``metrics.json`` (quantized and float metrics). A finished result is reused unless
``--force``. Backend options can be changed for one call with ``--set``, e.g.
``--set backend.gptq=true --set backend.act_calibration=mse``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.commands import add_study_arg

if TYPE_CHECKING:
    from mpq.assignment import Assignment
    from search.resources import StudyResources
    from search.results import TrialMetrics, TrialResult


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize (uniformly or per an assignment file), export, evaluate vs float",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arg(p)
    p.add_argument("--weights", "-w", type=int, choices=(4, 8, 16), default=None,
                   help="weight bits for every quantizable layer (16 = float weights)")
    p.add_argument("--acts", "-a", type=int, choices=(8, 16), default=None,
                   help="input-activation bits for every quantizable layer (16 = float; default 16)")
    p.add_argument("--assignment", type=Path, default=None,
                   help="JSON file {\"layers\": {layer name: \"W4A8\", ...}} instead of --weights/--acts "
                        "(unnamed layers stay float)")
    p.add_argument("--backend", "-b", default=None, help="quantizer backend (default: the study's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study key for this call (YAML value), e.g. backend.gptq=true; repeatable")
    p.add_argument("--out", "-o", type=Path, default=None,
                   help="output folder (default runs/<study>/quantize/<label>-<digest>/)")
    p.add_argument("--device", default=None, help="torch device for calibration: auto, cpu, cuda, cuda:N")
    p.add_argument("--force", action="store_true", help="rebuild even if a finished result is in the folder")
    p.set_defaults(handler=run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["backend.gptq=true", "imgsz=256"]`` -> ``{"backend.gptq": True, "imgsz": 256}`` (YAML values)."""
    import yaml

    from mpq.errors import UserError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. backend.gptq=true")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return out


def build_assignment(args: argparse.Namespace, res: StudyResources) -> tuple[Assignment, str]:
    """The assignment to build and a short label for its folder."""
    from mpq.assignment import Assignment, Precision
    from mpq.errors import UserError

    if args.assignment is not None:
        if args.weights is not None or args.acts is not None:
            raise UserError("give either --assignment FILE or --weights/--acts, not both")
        path: Path = args.assignment
        if not path.is_file():
            raise UserError(f"--assignment: file not found: {path}")
        try:
            assignment = Assignment.from_json(path.read_text(), source=str(path))
        except ValueError as exc:  # bad JSON or a bad precision; the message names the file and layer
            raise UserError(f"--assignment {path}: {exc}") from None
        return assignment, path.stem
    if args.weights is None and args.acts is None:
        raise UserError("say what to build: --weights {4,8,16} and/or --acts {8,16} (uniform over the "
                        "quantizable layers), or --assignment FILE.json")
    try:
        precision = Precision(args.weights or 16, args.acts or 16)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if precision.is_float:
        raise UserError("--weights 16 --acts 16 is the float model; `search eval` evaluates it")
    return Assignment.from_groups(res.groups, {g.name: precision for g in res.groups}), str(precision).lower()


def run(args: argparse.Namespace) -> int:
    import time

    from mpq.errors import UserError
    from mpq.files import read_json, write_json
    from search.commands import load_study
    from search.console import console, console_err
    from search.pipeline import TrialPipeline

    overrides: dict[str, Any] = {}
    if args.backend and args.backend != load_study(args.study).backend.name:
        overrides["backend"] = {"name": args.backend}  # that backend's default options
    overrides.update(parse_overrides(args.overrides))
    spec = load_study(args.study, trust=args.trust_checkpoint, **overrides)
    pipeline = TrialPipeline.for_spec(spec, device=args.device, progress=True)
    res = pipeline.resources
    assignment, label = build_assignment(args, res)
    if len(assignment) == 0:
        raise UserError("the assignment quantizes no layer; nothing to build")
    # before the (slow) float baseline: names the layer and precision at fault
    res.backend.capabilities.check(res.model.layers, assignment)
    out_dir: Path = args.out or res.run_dir / "quantize" / f"{label}-{assignment.digest()}"
    if out_dir.suffix == ".onnx":
        raise UserError(f"--out {out_dir}: give a folder; model.onnx, metrics.json and assignment.json go in it")
    res.prepare_run_dir()

    t0 = time.perf_counter()
    with console_err.status(f"float baseline of {spec.model.name} (cached in {pipeline.baseline.dir}) ..."):
        base = pipeline.baseline.metrics()
        float_onnx = pipeline.baseline.onnx()
    if hasattr(res.backend, "progress"):
        res.backend.progress = True
    console_err.print(f"building {assignment.label(res.model.layers)} with backend '{spec.backend.name}' "
                      f"on {res.device} -> {out_dir}", highlight=False)
    with console_err.status("materialize, export, evaluate ..."):
        result = pipeline.run(assignment, out_dir=out_dir, use_cache=not args.force)
    metrics_path = out_dir / "metrics.json"
    data = read_json(metrics_path)
    data["float"] = {"metrics": base.to_json(), "onnx": str(float_onnx), "onnx_bytes": float_onnx.stat().st_size}
    data["delta"] = {k: getattr(result.metrics, k) - getattr(base, k) for k in DELTA_KEYS}
    write_json(metrics_path, data)
    console.print(comparison_table(spec.name, base, float_onnx.stat().st_size, result, res))
    print_deployment(result)
    console.print(f"wrote {out_dir / 'model.onnx'} and {metrics_path}"
                  + (" (reused a finished result; --force rebuilds)" if result.cached else "")
                  + f" in {time.perf_counter() - t0:.1f} s", highlight=False)
    return 0


def print_deployment(result: TrialResult) -> None:
    """The deploy target, what ONNX Runtime runs as int8 (a warning naming every A8 layer that
    runs float), the lowered file's rule violations and the target's notes."""
    from search.console import console, console_err

    q = result.metrics
    meta = result.export.get("metadata", {})
    line = f"deploy target {q.deploy_target or '?'}"
    if q.a8_ran_int8 is not None:
        line += f": A8 asked {q.a8_asked} / ran int8 {q.a8_ran_int8} (ONNX Runtime's optimized graph)"
    console.print(line, highlight=False)
    summary = meta.get("summary", {})
    if "silu_int8" in summary:
        total = summary["silu_int8"] + summary.get("silu_float", 0)
        console.print(f"  SiLU on integers (QLinearSigmoid + QLinearMul, deploy.int8_silu): {summary['silu_int8']} "
                      f"of {total} after A8 layers (the others feed float ops)", highlight=False)
    if summary.get("int8_ops"):
        ops = ", ".join(f"{k} {v}" for k, v in summary["int8_ops"].items())
        console.print(f"  ops between A8 layers on uint8 (deploy.int8_ops): {ops}", highlight=False)
    if q.runtime_warning:
        console_err.print(f"[bold yellow]warning:[/] {q.runtime_warning}", highlight=False)
    for v in meta.get("violations", [])[:5]:
        console_err.print(f"[yellow]rule[/] [{v['rule']}] {v['node']}: {v['message']}", highlight=False)
    for note in meta.get("notes", []):
        console.print(f"  note: {note}", highlight=False, style="dim")


#: The metrics whose change vs float ``metrics.json`` records under ``delta``.
DELTA_KEYS = ("map50_95", "map50", "latency_ms", "weight_bytes")


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def comparison_table(study: str, base: TrialMetrics, float_bytes: int, result: TrialResult,
                     res: StudyResources) -> Any:
    """Float vs quantized: accuracy, size, latency, Q/DQ node counts; build times as the caption."""
    from rich.table import Table

    q = result.metrics
    assignment = result.assignment
    counts = result.export.get("node_counts", {})
    t = result.timings
    if result.cached:
        caption = "cached result (--force rebuilds)"
    else:
        steps = [f"{k.split('.', 1)[1]} {v:.1f}" for k, v in t.items()
                 if k.startswith("materialize.") and k != "materialize.total" and v >= 0.05]
        caption = (f"times (s): materialize {t.get('materialize', 0):.1f} ({', '.join(steps)}), "
                   f"export {t.get('export', 0):.1f}, lower {t.get('lower', 0):.1f}, "
                   f"evaluate {t.get('evaluate', 0):.1f}, latency {t.get('latency', 0):.1f}")
    provider = q.latency_provider.removesuffix("ExecutionProvider")
    table = Table(title=f"{study}: float vs {assignment.label(res.model.layers)} ({res.spec.backend.name}, "
                        f"{len(assignment)}/{len(res.model.quantizable_layers)} layers, deploy "
                        f"{res.spec.deploy.target})", caption=caption)
    table.add_column("")
    table.add_column("float", justify="right")
    table.add_column("quantized", justify="right")
    table.add_column("change", justify="right")
    table.add_row("mAP50-95", f"{base.map50_95:.4f}", f"{q.map50_95:.4f}", f"{q.map50_95 - base.map50_95:+.4f}")
    table.add_row("mAP50", f"{base.map50:.4f}", f"{q.map50:.4f}", f"{q.map50 - base.map50:+.4f}")
    table.add_row("weights (packed INT4/INT8)", _mb(base.weight_bytes), _mb(q.weight_bytes),
                  f"x{q.weight_bytes / max(base.weight_bytes, 1):.3f}")
    table.add_row("ONNX file", _mb(float_bytes), _mb(q.onnx_bytes), f"x{q.onnx_bytes / max(float_bytes, 1):.3f}")
    table.add_row(f"latency ({provider}, b{q.latency_batch})", f"{base.latency_ms:.2f} ms",
                  f"{q.latency_ms:.2f} ms", f"x{q.latency_ms / max(base.latency_ms, 1e-9):.2f}")
    table.add_row("Q / DQ / Clip", "0 / 0 / 0",
                  f"{counts.get('QuantizeLinear', 0)} / {counts.get('DequantizeLinear', 0)} / {counts.get('Clip', 0)}",
                  "")
    if q.a8_asked:
        ran = q.a8_ran_int8 if q.a8_ran_int8 is not None else "?"
        table.add_row("A8 asked / ran int8", "", f"{q.a8_asked} / {ran}",
                      f"[bold yellow]{len(q.a8_ran_float)} ran float[/]" if q.a8_ran_float else "")
    return table
