"""``search report RUN_DIR``: the Pareto report (HTML, plots, summary.md, pareto.csv, terminal table)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Pareto report of a run: report/index.html, summary.md, pareto.csv",
                       description=__doc__)
    p.add_argument("run_dir", type=Path, nargs="?", default=None, help="run directory (default: runs/demo)")
    p.add_argument("--storage", default=None, help="study storage URL (default: the run dir's own)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/report)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not verify front points missing from verification.json (show what it holds)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from search.console import console
    from search.report import front_table, make_report

    run_dir = args.run_dir or Path("runs") / "demo"
    rep = make_report(run_dir, args.storage, args.out, verify=not args.no_verify)
    console.print(front_table(rep))
    console.print(f"report: {rep.files['index.html']}  (summary.md, pareto.csv, trials.csv, plots beside it)",
                  highlight=False)
    return 0
