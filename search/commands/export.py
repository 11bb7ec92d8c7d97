"""``search export RUN_DIR --trial N | --front``: chosen configurations as ONNX + JSON sidecar.

Each configuration's file is the one its trial measured: the study's artifact, handed out
when it is intact (its SHA-256 and size as recorded) and was built in the study's context,
otherwise re-materialized, re-exported and re-lowered from the trial's assignment (always,
with ``--rebuild``). The exported file is then scored on both splits: the search split (the
numbers the study recorded, re-measured on these bytes) and the held-out verification split
(``dataset.verify``: images the search never saw), with a 95 % paired-bootstrap interval of
its mAP change vs float on each. Without a verification split the table says its numbers
are in-sample.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from search.commands import add_trust_arg

#: The metrics the sidecar compares: verified here, recorded by the study, and the float model's.
SIDECAR_KEYS = ("map50_95", "map50", "latency_ms", "weight_bytes")

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export chosen trials (or the whole Pareto front) as ONNX, re-verified",
                       description=__doc__)
    p.add_argument("run_dir", type=Path, help="run directory (e.g. runs/demo)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, nargs="+", action="extend",
                       help="trial number(s): --trial 19 10, or repeated --trial 19 --trial 10")
    which.add_argument("--front", action="store_true", help="every configuration of the Pareto front")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/export)")
    p.add_argument("--storage", default=None, help="study storage URL (default: the run dir's own)")
    p.add_argument("--device", default=None, help="torch device for calibration")
    p.add_argument("--rebuild", action="store_true",
                   help="re-materialize every configuration from its assignment even when the study's file is intact")
    add_trust_arg(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import optuna
    from rich.table import Table

    from mpq.errors import UserError
    from mpq.files import versions, write_json
    from search.console import console
    from search.pipeline import TrialPipeline, artifact_records
    from search.report import collect, load_run, pareto_front, short_label
    from search.trial_attrs import TrialAttrs
    from search.verification import describe, splits_for

    spec, study = load_run(args.run_dir, args.storage)
    if args.trust_checkpoint:
        spec = spec.model_copy(update={"trust_checkpoint": True})
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
    splits = splits_for(pipeline)
    table = Table(title=f"exported to {out}/{spec.name}-trial<#>.onnx + .json (mAP re-measured on the exported file)",
                  caption=_caption(splits))
    for col in ("#", "study mAP", "re-measured", "vs float [95%]", "verify mAP", "verify vs float [95%]", "ms", "W4",
                "layers"):
        table.add_column(col, justify="left" if col == "layers" else "right")
    for n in numbers:
        attrs = TrialAttrs.of(by_number[n])
        assignment = attrs.assignment_value()
        stem = f"{spec.name}-trial{n}"
        onnx_path = out / f"{stem}.onnx"
        result, source = _artifact(pipeline, assignment, n, onnx_path, rebuild=args.rebuild)
        recorded = attrs.metrics
        verified = result.metrics
        recorded_map = recorded.map50_95 if recorded is not None else float("nan")
        checked = splits.measure(n, assignment.digest(), onnx_path)
        sidecar = {
            "study": spec.name, "trial": n, "digest": assignment.digest(), "onnx": onnx_path.name,
            "backend": spec.backend.model_dump(mode="json"), "model": str(spec.model), "imgsz": spec.imgsz,
            "assignment": assignment.to_dict(), "summary": dict(result.summary),
            "metrics": verified.to_json(), "float_metrics": {k: getattr(base, k) for k in SIDECAR_KEYS},
            "study_metrics": {k: getattr(recorded, k) if recorded is not None else None for k in SIDECAR_KEYS},
            "map_difference_vs_study": checked.search_map - recorded_map,
            "head": splits.head, "verification": {**checked.to_json(), **splits.describe_splits(),
                                                  "text": describe(checked, splits.summary())},
            "export": dict(result.export), "timings": dict(result.timings), "versions": versions(),
            "files": artifact_records(onnx_path), "source": source,
        }
        write_json(out / f"{stem}.json", sidecar)
        table.add_row(str(n), f"{recorded_map:.4f}", f"{checked.search_map:.4f}",
                      f"{100 * checked.search_change:+.2f} [{100 * checked.search_low:+.2f}, "
                      f"{100 * checked.search_high:+.2f}]", *_verify_cells(checked), f"{verified.latency_ms:.3g}",
                      f"{100 * verified.w4_weight_share:.0f}%", short_label(result.summary))
    console.print(table)
    return 0


def _artifact(pipeline, assignment, number: int, onnx_path: Path, *, rebuild: bool):  # noqa: ANN001, ANN202
    """(the trial's result, where the file came from), with the file written at ``onnx_path``."""
    import shutil

    from mpq.files import atomic_path
    from search.console import console_err

    stored = pipeline.resources.paths.trial(assignment.digest())
    cached = None if rebuild else pipeline.cached(assignment, stored)
    if cached is not None:
        console_err.print(f"trial {number}: the study's file {cached.artifact} (SHA-256 checked)", highlight=False)
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(onnx_path) as tmp:
            shutil.copyfile(cached.artifact, tmp)
        return cached, "the study's artifact (SHA-256 and size as recorded)"
    console_err.print(f"trial {number}: re-materializing {assignment.label(pipeline.resources.model.layers)} ...",
                      highlight=False)
    if rebuild:
        _check_stored(stored, number)
    work = onnx_path.parent / f".{onnx_path.stem}"
    result = pipeline.run(assignment, out_dir=work, use_cache=False)
    result.artifact.replace(onnx_path)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return result, "re-built from the assignment"


def _verify_cells(p) -> list[str]:  # noqa: ANN001
    if p.verify_map is None:
        return ["", ""]
    return [f"{p.verify_map:.4f}", f"{100 * p.verify_change:+.2f} [{100 * p.verify_low:+.2f}, "
                                   f"{100 * p.verify_high:+.2f}]"]


def _caption(splits) -> str:  # noqa: ANN001
    from search.report_verify import IN_SAMPLE

    if splits.verify is None:
        return f"head {splits.head}; {IN_SAMPLE}"
    return (f"head {splits.head}; re-measured on the search split ({len(splits.search.subset)} images); verify: the "
            f"exported file on {len(splits.verify.subset)} held-out images; [95%]: paired bootstrap vs float")


def _check_stored(trial_dir: Path, number: int) -> None:
    """Warn (naming the file) when the study's stored artifact of trial ``number`` is not the one it measured."""
    from mpq.files import read_json
    from search.console import warn
    from search.pipeline import artifact_mismatch

    metrics = trial_dir / "metrics.json"
    if not metrics.is_file():
        return
    try:
        records = read_json(metrics).get("files")
    except ValueError:
        warn(f"{metrics}: unreadable; trial {number} is re-built from its assignment")
        return
    bad = artifact_mismatch(trial_dir, records)
    if bad is not None:
        warn(f"{bad}: the study's artifact of trial {number} is not the file it measured; the export "
             "re-builds it from its assignment (and the next `search run` rebuilds the stored trial)")
