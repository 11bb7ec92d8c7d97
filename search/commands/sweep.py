"""``search sweep [--study S]``: the per-layer sensitivity table (cached in the run directory)."""

from __future__ import annotations

import argparse

from search.commands import add_study_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="per-layer sensitivity table (cached in runs/<study>/sensitivity.json)",
                       description=__doc__)
    add_study_arg(p)
    p.add_argument("--metric", choices=("fidelity", "map", "fisher"), default=None,
                   help="damage measure (default: the study's sensitivity.metric, fidelity)")
    p.add_argument("--fresh", action="store_true", help="recompute even if a cached table matches")
    p.add_argument("--top", type=int, default=12, help="how many of the most/least sensitive groups to print")
    p.add_argument("--device", default=None, help="torch device for calibration: auto, cpu, cuda, cuda:N")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<study name>)")
    p.add_argument("--correlate", action="store_true",
                   help="also measure the mAP drop per probe and print how well each cheap score predicts it "
                        "(Spearman rank correlation); slow")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.commands import load_study
    from search.console import console
    from search.pipeline import TrialPipeline
    from search.sensitivity import run_sweep
    from search.views import sensitivity_tables

    spec = load_study(args.study)
    pipeline = TrialPipeline.for_spec(spec, run_dir=Path(args.run_dir) if args.run_dir else None, device=args.device)
    res = pipeline.resources
    res.prepare_run_dir()
    table = run_sweep(res, pipeline.baseline, metric=args.metric, fresh=args.fresh)
    for t in sensitivity_tables(table, args.top):
        console.print(t)
    console.print(f"{len(table.groups)} groups x {len(table.candidates())} candidates, metric {table.metric}, "
                  f"{table.seconds:.0f} s; table: {res.run_dir / 'sensitivity.json'}", highlight=False)
    if args.correlate:
        from search.sensitivity import correlation_report

        console.print(correlation_report(res, pipeline.baseline, fresh=args.fresh))
    return 0
