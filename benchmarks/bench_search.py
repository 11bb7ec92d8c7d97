"""Search benchmark on the demo: time of ``search run --budget 50`` and search quality.

In one run, at equal budget (assignments evaluated), it compares:

- **ours**: the sensitivity-seeded study (TPE on the ranked space, policies enqueued first);
- **random**: Optuna's RandomSampler on the full per-layer space (no sweep, no policies);
- **top-K**: the seeds' top-K exclusion lists alone (K most sensitive groups float, the
  rest W4A16, or W4A8), for ``budget`` (K, A8) combinations spread over K.

For each: the Pareto front of mAP50-95 vs weight size, its hypervolume (reference:
size ratio 0.5 of float, mAP float - 5 points), the best mAP at fixed size budgets, and
whether a configuration with >= 70% of conv weights at 4 bits loses <= 1.0 point. Then,
optionally, how well the cheap sensitivity scores (fidelity, Fisher) predict the
measured per-layer mAP drop (Spearman).

    python benchmarks/bench_search.py                       # everything (~1 h on 2 CPU cores)
    python benchmarks/bench_search.py --budget 50 --no-correlation
    python benchmarks/bench_search.py --only ours           # just the timed `search run`

The three studies share one run directory, so an assignment evaluated by one is not
rebuilt by another (results are deterministic); ours runs first, so its timing is clean.
Results: ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZE_BUDGETS = (0.15, 0.17, 0.2)
HV_REF_SIZE = 0.5
HV_REF_DROP = 0.05


def run_variant(name: str, spec: Any, run_dir: Path, out: Path, budget: int) -> dict[str, Any]:
    import optuna

    from search.pipeline import TrialPipeline
    from search.report import best_at_budget, collect, hypervolume_2d, pareto_front
    from search.study import RunSettings, StudyRunner
    from search.trial_attrs import TrialAttrs

    pipeline = TrialPipeline.for_spec(spec, run_dir=run_dir, progress=True)
    kw: dict[str, Any] = {"budget": budget, "storage": f"sqlite:///{(out / f'{name}.db').resolve()}",
                          "objectives": ["map", "size"]}
    if name == "random":
        kw.update(sampler="random", space="full", seed_policies=False)
    elif name == "topk":
        kw.update(sampler="random", space="topk", seed_policies=False)
    settings = RunSettings.from_spec(spec, run_dir, **kw)
    runner = StudyRunner(pipeline, settings, progress=True, log=lambda m: print(f"  [{name}] {m}", flush=True))
    t0 = time.perf_counter()
    if name == "topk":
        study, objective = runner.prepare()
        space = objective.space
        ks = sorted({round(i * 40 / max(budget // 2 - 1, 1)) for i in range(budget // 2)})
        for a8 in (False, True):
            for k in ks:
                study.enqueue_trial(space.params_for(space.topk(k, a8), a8_share=1.0 if a8 else 0.0, keep_top=k),
                                    skip_if_exists=True)
    t_sweep = time.perf_counter()
    trials_seen: list[float] = []

    def on_trial(t: Any, counts: dict[str, int]) -> None:
        trials_seen.append(time.perf_counter())
        m = TrialAttrs.of(t).metrics
        if m is not None:
            print(f"  [{name}] #{t.number} done={counts['done']} mAP {m.map50_95:.4f} "
                  f"W4 {100 * m.w4_weight_share:.0f}% size {100 * m.size_ratio:.1f}%", flush=True)

    study = runner.run(on_trial)
    wall = time.perf_counter() - t0
    base = pipeline.baseline.metrics()
    rows = collect(study)
    front = pareto_front(rows, ["map", "size"])
    ref = (HV_REF_SIZE, base.map50_95 - HV_REF_DROP)
    hv = hypervolume_2d([(r.metrics.size_ratio, r.value("map")) for r in rows], ref)
    best = {f"{b:.2f}": (lambda r: None if r is None else {"trial": r.number, "map50_95": r.value("map"),
                                                          "drop_pt": 100 * float(r.metrics.map_drop or 0),
                                                          "w4_share": r.metrics.w4_weight_share})(
        best_at_budget(rows, b)) for b in SIZE_BUDGETS}
    goal = [r for r in rows if r.metrics.w4_weight_share >= 0.7 and float(r.metrics.map_drop or 0) <= 0.01]
    timings = [r.timings for r in rows if r.timings]
    mean = {k: sum(float(t.get(k, 0)) for t in timings) / max(len(timings), 1)
            for k in ("materialize", "export", "evaluate", "latency", "total")}
    S = optuna.trial.TrialState
    return {
        "variant": name, "budget": budget, "evaluated": len(rows), "wall_s": wall,
        "setup_and_sweep_s": t_sweep - t0 if name == "topk" else None, "hypervolume": hv, "hv_ref": ref,
        "front": [{"trial": r.number, "map50_95": r.value("map"), "size_ratio": r.metrics.size_ratio,
                   "w4_share": r.metrics.w4_weight_share, "drop_pt": 100 * float(r.metrics.map_drop or 0)}
                  for r in front],
        "best_at_size": best, "goal_configs": [r.number for r in goal],
        "best_goal": None if not goal else max(goal, key=lambda r: r.metrics.w4_weight_share).number,
        "mean_trial_s": mean, "failed": sum(t.state == S.FAIL for t in study.get_trials(deepcopy=False)),
        "float_map": base.map50_95,
    }


def markdown(results: list[dict[str, Any]], sweep_s: float | None, corr: dict[str, Any] | None) -> str:
    lines = ["| search | evaluated | hypervolume | best mAP @ size <= 15% / 17% / 20% of float | "
             ">=70% W4 and <= 1 pt drop | wall |", "|---|---|---|---|---|---|"]
    for r in results:
        best = " / ".join("-" if v is None else f"{v['map50_95']:.4f} ({v['drop_pt']:+.2f})"
                          for v in r["best_at_size"].values())
        goal = f"{len(r['goal_configs'])} configs" if r["goal_configs"] else "none"
        lines.append(f"| {r['variant']} | {r['evaluated']} | {r['hypervolume']:.5f} | {best} | {goal} | "
                     f"{r['wall_s'] / 60:.1f} min |")
    ours = next((r for r in results if r["variant"] == "ours"), None)
    if ours:
        m = ours["mean_trial_s"]
        lines += ["", f"ours: mean per evaluated trial {m['total']:.1f} s = materialize {m['materialize']:.1f} + "
                      f"export {m['export']:.1f} + COCO eval {m['evaluate']:.1f} + latency {m['latency']:.1f}"
                      + (f"; sweep {sweep_s:.0f} s" if sweep_s else "")]
    if corr:
        lines += ["", "| score | " + " | ".join(k for k in next(iter(corr.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(corr.values())))]
        for name, row in corr.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=REPO / "studies" / "demo.yaml")
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-search")
    parser.add_argument("--only", nargs="*", default=["ours", "random", "topk"])
    parser.add_argument("--no-correlation", action="store_true")
    args = parser.parse_args()

    from search.pipeline import TrialPipeline
    from search.sensitivity import correlation_report, run_sweep
    from search.spec import load_spec

    spec = load_spec(args.study)
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    for old in args.out.glob("*.db"):
        old.unlink()
    pipeline = TrialPipeline.for_spec(spec, run_dir=run_dir)
    pipeline.resources.prepare_run_dir()
    t0 = time.perf_counter()
    run_sweep(pipeline.resources, pipeline.baseline)
    sweep_s = time.perf_counter() - t0
    print(f"sweep: {sweep_s:.0f} s", flush=True)
    results = []
    for name in args.only:
        print(f"== {name} ==", flush=True)
        results.append(run_variant(name, spec, run_dir, args.out, args.budget))
        (args.out / "results.json").write_text(json.dumps({"results": results, "sweep_s": sweep_s}, indent=2))
    corr = None
    if not args.no_correlation:
        from rich.console import Console

        Console().print(correlation_report(pipeline.resources, pipeline.baseline))
        corr = json.loads((run_dir / "sensitivity-correlation.json").read_text())
    md = markdown(results, sweep_s, corr)
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(json.dumps({"results": results, "sweep_s": sweep_s,
                                                       "correlation": corr}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
