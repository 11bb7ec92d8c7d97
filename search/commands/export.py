"""``search export RUN_DIR --trial N | --front``: chosen configurations as QCDQ ONNX + JSON sidecar.

Each configuration is re-materialized, re-exported and re-evaluated, so the numbers in
the sidecar are verified, not copied from the study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: The metrics the sidecar compares: verified here, recorded by the study, and the float model's.
SIDECAR_KEYS = ("map50_95", "map50", "latency_ms", "weight_bytes")

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export chosen trials (or the whole Pareto front) as QCDQ ONNX, re-verified",
                       description=__doc__)
    p.add_argument("run_dir", type=Path, help="run directory (e.g. runs/demo)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, nargs="+", action="extend",
                       help="trial number(s): --trial 19 10, or repeated --trial 19 --trial 10")
    which.add_argument("--front", action="store_true", help="every configuration of the Pareto front")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/export)")
    p.add_argument("--storage", default=None, help="study storage URL (default: the run dir's own)")
    p.add_argument("--device", default=None, help="torch device for calibration")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import optuna
    from rich.table import Table

    from mpq.errors import UserError
    from mpq.files import versions, write_json
    from search.console import console, console_err
    from search.pipeline import TrialPipeline
    from search.report import collect, load_run, pareto_front, short_label
    from search.trial_attrs import TrialAttrs

    spec, study = load_run(args.run_dir, args.storage)
    rows = collect(study, spec.search.max_map_drop)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    if args.front:
        objectives = list(study.user_attrs.get("objectives") or spec.search.objectives)
        numbers = [r.number for r in pareto_front(rows, objectives)]
    else:
        numbers = list(dict.fromkeys(args.trial))
        for n in numbers:
            t = by_number.get(n)
            if t is None:
                raise UserError(f"{args.run_dir}: no trial {n} (trials 0..{len(by_number) - 1})")
            if t.state != optuna.trial.TrialState.COMPLETE or TrialAttrs.of(t).assignment is None:
                raise UserError(f"{args.run_dir}: trial {n} is {t.state.name}, not a completed trial with an "
                                "assignment; `search report` lists the completed ones")
    out = args.out or Path(args.run_dir) / "export"
    pipeline = TrialPipeline.for_spec(spec, run_dir=Path(args.run_dir), device=args.device)
    base = pipeline.baseline.metrics()
    table = Table(title=f"exported to {out}/{spec.name}-trial<#>.onnx + .json (mAP re-measured on the re-built model)")
    for col in ("#", "study mAP", "verified", "vs float", "ms", "W4", "layers"):
        table.add_column(col, justify="left" if col == "layers" else "right")
    for n in numbers:
        attrs = TrialAttrs.of(by_number[n])
        assignment = attrs.assignment_value()
        stem = f"{spec.name}-trial{n}"
        console_err.print(f"trial {n}: re-materializing {assignment.label()} ...", highlight=False)
        work = out / f".{stem}"
        result = pipeline.run(assignment, out_dir=work, use_cache=False)
        onnx_path = out / f"{stem}.onnx"
        result.artifact.replace(onnx_path)
        recorded = attrs.metrics
        verified = result.metrics
        recorded_map = recorded.map50_95 if recorded is not None else float("nan")
        sidecar = {
            "study": spec.name, "trial": n, "digest": assignment.digest(), "onnx": onnx_path.name,
            "backend": spec.backend.model_dump(mode="json"), "model": str(spec.model), "imgsz": spec.imgsz,
            "assignment": assignment.to_dict(), "summary": dict(result.summary),
            "metrics": verified.to_json(), "float_metrics": {k: getattr(base, k) for k in SIDECAR_KEYS},
            "study_metrics": {k: getattr(recorded, k) if recorded is not None else None for k in SIDECAR_KEYS},
            "map_difference_vs_study": verified.map50_95 - recorded_map,
            "export": dict(result.export), "timings": dict(result.timings), "versions": versions(),
        }
        write_json(out / f"{stem}.json", sidecar)
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
        table.add_row(str(n), f"{recorded_map:.4f}", f"{verified.map50_95:.4f}",
                      f"{100 * (verified.map50_95 - base.map50_95):+.2f}", f"{verified.latency_ms:.3g}",
                      f"{100 * verified.w4_weight_share:.0f}%", short_label(result.summary))
    console.print(table)
    return 0
