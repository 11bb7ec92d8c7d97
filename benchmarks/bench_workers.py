"""Trials per hour with 1 and N parallel workers on one study (docs/benchmarks.md, "Parallel workers").

Run:  python benchmarks/bench_workers.py --storage postgresql://user:pw@127.0.0.1:5432/db \
          [--study studies/demo.yaml] [--budget 8] [--workers 1 2] [--work /tmp/bench-workers]

1. A base run directory gets the sensitivity table and the float baseline once
   (``search run --budget 1`` on SQLite; kept and reused by later runs of this script), so
   every configuration below starts from the same cached sweep and measures trials only.
2. For each worker count N, in the order given (``--workers 1 2 1 2`` interleaves repeats,
   so a change in the machine's other load hits both): a copy of the base run dir
   (without trials), and
   ``search run --storage URL --workers N --budget B --fresh --no-report`` (``--fresh``
   deletes the study in the storage first). Trials per hour = trials built (COMPLETE, not
   duplicates) / (last trial completion - first trial start), read from the study.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _search(*args: str, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.run([sys.executable, "-m", "search", *args], cwd=REPO, stdout=fh,
                              stderr=subprocess.STDOUT, env=dict(os.environ, YOLO_OFFLINE="1"))
    if proc.returncode != 0:
        raise SystemExit(f"search {' '.join(args)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def _measure(storage: str, name: str) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    S = optuna.trial.TrialState
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    built = [t for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs]
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete for t in trials if t.datetime_complete is not None]
    span = (max(ends) - min(starts)).total_seconds()
    per_trial = [(t.datetime_complete - t.datetime_start).total_seconds() for t in built
                 if t.datetime_complete and t.datetime_start]
    return {"built": len(built), "duplicates": sum(1 for t in trials if "duplicate_of" in t.user_attrs),
            "failed": sum(1 for t in trials if t.state == S.FAIL), "span_s": round(span, 1),
            "trials_per_hour": round(len(built) / span * 3600, 1),
            "mean_trial_s": round(sum(per_trial) / len(per_trial), 1),
            "workers_seen": len({t.user_attrs.get("worker") for t in built})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="PostgreSQL URL the workers share")
    parser.add_argument("--study", default=str(REPO / "studies" / "demo.yaml"))
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-workers"))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from search.spec import load_spec

    name = load_spec(args.study).name
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    prep_s = 0.0
    if not ((base / "sensitivity.json").is_file() and (base / "float" / "baseline.json").is_file()):
        prep_s = _search("run", "--study", args.study, "--run-dir", str(base), "--budget", "1", "--no-report",
                         log=args.work / "base.log")
    results: dict[str, Any] = {"study": args.study, "budget": args.budget, "prepare_s": round(prep_s, 1),
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "loadavg_before": os.getloadavg()}, "runs": []}
    for i, n in enumerate(args.workers):
        run_dir = args.work / f"workers-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns("study.db", "trials", "report"))
        wall = _search("run", "--study", args.study, "--storage", args.storage, "--workers", str(n),
                       "--budget", str(args.budget), "--run-dir", str(run_dir), "--fresh", "--no-report",
                       log=args.work / f"workers-{n}-run{i}.log")
        res = {"workers": n, **_measure(args.storage, name), "command_wall_s": round(wall, 1),
               "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        results["runs"].append(res)
        print(f"run {i}: {res}", flush=True)
    print("\n| run | workers | trials built | span (s) | trials/hour | mean trial (s) | load avg (1 min) after |")
    print("|---|---|---|---|---|---|---|")
    for i, res in enumerate(results["runs"]):
        print(f"| {i} | {res['workers']} | {res['built']} | {res['span_s']} | {res['trials_per_hour']} "
              f"| {res['mean_trial_s']} | {res['loadavg_after'][0]} |")
    by_n: dict[int, list[float]] = {}
    for res in results["runs"]:
        by_n.setdefault(res["workers"], []).append(res["trials_per_hour"])
    medians = {n: statistics.median(v) for n, v in by_n.items()}
    results["median_trials_per_hour"] = medians
    print("\nmedian trials/hour: " + ", ".join(
        f"{n} worker(s) {m:.1f}" + (f" ({m / medians[1]:.2f}x)" if 1 in medians and n != 1 else "")
        for n, m in sorted(medians.items())))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
