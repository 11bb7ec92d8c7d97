"""``search run [--study S] --budget 50``: the mixed-precision study (runs the sweep if missing).

Several workers can share one study: start ``search run --storage postgresql://...`` on
several machines (or ``--workers N`` on one); see the README, "Running on several GPUs".
"""

from __future__ import annotations

import argparse

from search.commands import add_study_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run (or resume, or join) the Optuna study; each trial is a real quantized ONNX",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arg(p)
    p.add_argument("--budget", "-n", type=int, default=None, help="assignments to evaluate (default: the spec's)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://user:pw@host/db (default: runs/<study>/study.db)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--device", default=None,
                   help="torch device for calibration: auto, cpu, cuda, cuda:N (with --workers and several GPUs: "
                        "a comma list, one per worker, e.g. cuda:0,cuda:1)")
    p.add_argument("--sampler", choices=("tpe", "nsga2", "random"), default=None)
    p.add_argument("--space", choices=("ranked", "full", "topk"), default=None,
                   help="ranked: a few parameters over the sensitivity order (default); full: one choice per "
                        "layer group; topk: the seeds' top-K exclusion lists alone")
    p.add_argument("--objectives", default=None,
                   help="comma list of map, latency, size, bops (default: the spec's, e.g. map,latency)")
    p.add_argument("--no-policies", action="store_true", help="do not enqueue the policy configurations first")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<study name>)")
    p.add_argument("--fresh", action="store_true", help="delete the study (not the cached trials) and start over")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mpq.errors import UserError
    from search.commands import load_study
    from search.console import console, console_err
    from search.pipeline import TrialPipeline
    from search.storage import delete_study, redact
    from search.study import RunSettings, StudyRunner

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    # --storage is recorded in the run dir's spec.yaml, so `search report/dashboard RUN_DIR` find the study
    spec = load_study(args.study, **{"search.storage": args.storage})
    devices = [d.strip() for d in args.device.split(",")] if args.device else []
    if len(devices) > 1 and args.workers == 1:
        raise UserError("several --device values need --workers N (one device per worker)")
    pipeline = TrialPipeline.for_spec(spec, run_dir=Path(args.run_dir) if args.run_dir else None,
                                      device=devices[0] if devices else None)
    run_dir = pipeline.resources.run_dir
    objectives = [o.strip() for o in args.objectives.split(",")] if args.objectives else None
    settings = RunSettings.from_spec(spec, run_dir, budget=args.budget, storage=args.storage, sampler=args.sampler,
                                     space=args.space, objectives=objectives,
                                     seed_policies=False if args.no_policies else None, seed=args.seed)
    if args.fresh:
        delete_study(settings.storage, spec.name)
    runner = StudyRunner(pipeline, settings, log=lambda m: console_err.print(f"[dim]{m}[/]", highlight=False))
    console_err.print(f"study [bold]{spec.name}[/]: storage {redact(settings.storage)}, budget {settings.budget}, "
                      f"objectives {','.join(settings.objectives)}, sampler {settings.sampler}, "
                      f"space {settings.space}, backend {spec.backend.name}", highlight=False)
    if args.workers > 1:
        from search.workers import launch_workers

        runner.prepare()  # the sweep and the float baseline once, here; the workers then share them
        argv = _child_argv(args)
        rc = launch_workers(argv, args.workers, devices or None)
        if rc != 0:
            return rc
    else:
        _run_one(runner, settings.budget)
    if not args.no_report:
        from search.report import front_table, make_report

        rep = make_report(run_dir, args.storage)
        console.print(front_table(rep))
        console.print(f"report: {rep.files['index.html']}", highlight=False)
    return 0


def _run_one(runner, budget: int) -> None:  # noqa: ANN001
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from search.console import console_err

    columns = (TextColumn("[bold]trials[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=console_err, transient=False) as bar:
        task = bar.add_task("", total=budget)

        def on_trial(t, counts) -> None:  # noqa: ANN001
            bar.update(task, completed=min(counts["done"], budget),
                       description=f"{counts['duplicates']} dup, {counts['failed']} failed")
            console_err.print(trial_line(t), highlight=False, soft_wrap=True)

        runner.run(on_trial)


def trial_line(t) -> str:  # noqa: ANN001
    """One line per finished trial: W4 share, mAP and its change, latency, size, duplicate/policy, times."""
    from search.trial_attrs import TrialAttrs

    attrs = TrialAttrs.of(t)
    if t.state.name == "FAIL":
        return f"  #{t.number:<3} [red]failed[/]: {(attrs.failure or '?')[:200]}"
    m = attrs.metrics
    tm = attrs.timings
    dup = f" (= #{attrs.duplicate_of})" if attrs.is_duplicate else ""
    pol = f" [cyan]{attrs.policy}[/]" if attrs.policy else ""
    times = (f" [dim]mat {tm.get('materialize', 0):.1f}s exp {tm.get('export', 0):.1f}s "
             f"eval {tm.get('evaluate', 0):.1f}s lat {tm.get('latency', 0):.1f}s[/]") if tm and not dup else ""
    if m is None:
        return f"  #{t.number:<3} no metrics{dup}{pol}"
    ratio = f" (x{m.latency_ratio:.2f} float)" if m.latency_ratio is not None else ""
    return (f"  #{t.number:<3} W4 {100 * m.w4_weight_share:3.0f}%  mAP {m.map50_95:.4f} "
            f"({-100 * (m.map_drop or 0):+.2f} pt)  {m.latency_ms:.2f} ms{ratio}  "
            f"{m.weight_bytes / 1e6:.2f} MB{dup}{pol}{times}")


def _child_argv(args: argparse.Namespace) -> list[str]:
    argv = ["run", "--no-report"]
    for flag, value in (("--study", args.study), ("--budget", args.budget), ("--storage", args.storage),
                        ("--sampler", args.sampler), ("--space", args.space), ("--objectives", args.objectives),
                        ("--seed", args.seed), ("--run-dir", args.run_dir)):
        if value is not None:
            argv += [flag, str(value)]
    if args.no_policies:
        argv.append("--no-policies")
    return argv
