"""The Pareto report of a run: HTML page with plots, markdown summary, CSV, terminal table.

``search report RUN_DIR`` reads the study (from the run directory's storage, or the URL
recorded in its ``spec.yaml``), takes the completed trials (one per assignment), finds the
Pareto front over the study's objectives (feasible trials only when a mAP-drop constraint
is set) and writes ``report/index.html``, ``summary.md``, ``pareto.csv``, ``trials.csv``
and the plots: mAP vs latency, mAP vs size, the sensitivity chart and a layer x
configuration bit map of the front.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError
from mpq.files import read_json, read_sealed_json, write_text
from mpq.objectives import OBJECTIVES
from search import report_verify
from search.console import warn
from search.paths import RunPaths
from search.results import TrialMetrics
from search.trial_attrs import TrialAttrs

if TYPE_CHECKING:
    import optuna

    from search.spec import StudySpec
    from search.verification import Verification


@dataclass
class TrialRow:
    """One evaluated assignment of the study (its first trial)."""

    number: int
    digest: str
    label: str
    policy: str
    metrics: TrialMetrics
    summary: dict[str, Any]
    assignment: dict[str, str]
    artifact: str
    timings: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    feasible: bool = True

    def value(self, objective: str) -> float:
        """The row's value of ``objective``."""
        return self.metrics.value(objective)


def load_run(run_dir: Path, storage: str | None = None) -> tuple[StudySpec, optuna.Study]:
    """The spec (as run) and the study of a run directory."""
    import optuna
    import yaml

    from search.spec import StudySpec
    from search.storage import open_storage, redact, sqlite_file, storage_url

    run_dir = Path(run_dir)
    spec_file = run_dir / "spec.yaml"
    if not spec_file.is_file():
        raise UserError(f"{run_dir} is not a run directory (no spec.yaml); run `search run` first")
    spec = StudySpec.model_validate(yaml.safe_load(spec_file.read_text()))
    url = storage_url(run_dir, given=storage, spec_storage=spec.search.storage)
    db = sqlite_file(url)
    if db is not None and not db.is_file():
        raise UserError(f"{run_dir}: no study.db; run `search run` first (or pass --storage URL)")
    try:
        study = optuna.load_study(study_name=spec.name, storage=open_storage(url))
    except KeyError:
        raise UserError(f"no study named '{spec.name}' in {redact(url)}") from None
    return spec, study


def collect(study: optuna.Study, max_map_drop: float | None = None) -> list[TrialRow]:
    """Completed trials, one per assignment digest (the first that evaluated it)."""
    import optuna

    rows: dict[str, TrialRow] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = TrialAttrs.of(t)
        if attrs.metrics is None or attrs.is_duplicate:
            continue
        digest = attrs.digest or str(t.number)
        if digest in rows:
            continue
        metrics = attrs.metrics
        feasible = max_map_drop is None or float(metrics.map_drop or 0.0) <= max_map_drop + 1e-12
        rows[digest] = TrialRow(t.number, digest, attrs.label, attrs.policy, metrics, dict(attrs.summary),
                                dict(attrs.assignment or {}), attrs.artifact, dict(attrs.timings), dict(t.params),
                                feasible)
    return sorted(rows.values(), key=lambda r: r.number)


def pareto_front(rows: Sequence[TrialRow], objectives: Sequence[str]) -> list[TrialRow]:
    """Non-dominated feasible rows, sorted by the first cost objective."""
    feas = [r for r in rows if r.feasible]

    def key(r: TrialRow) -> list[float]:  # all minimized
        return [-r.value(o) if OBJECTIVES[o].maximize else r.value(o) for o in objectives]

    front = []
    for r in feas:
        kr = key(r)
        dominated = False
        for s in feas:
            if s is r:
                continue
            ks = key(s)
            if all(a <= b for a, b in zip(ks, kr, strict=True)) and any(a < b for a, b in zip(ks, kr, strict=True)):
                dominated = True
                break
        if not dominated:
            front.append(r)
    cost = next((o for o in objectives if not OBJECTIVES[o].maximize), objectives[0])
    return sorted(front, key=lambda r: (r.value(cost), -r.value("map")))


def hypervolume_2d(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by (cost, accuracy) points, cost minimized and accuracy maximized, up to ``ref``
    = (worst cost, worst accuracy)."""
    pts = sorted((c, a) for c, a in points if c < ref[0] and a > ref[1])
    front: list[tuple[float, float]] = []
    for c, a in pts:  # cheapest first: keep the points that improve accuracy
        if not front or a > front[-1][1]:
            front.append((c, a))
    area = 0.0
    lower = ref[1]
    for c, a in front:  # the slab between the previous and this accuracy is covered from cost c on
        area += (ref[0] - c) * (a - lower)
        lower = a
    return area


def best_at_budget(rows: Sequence[TrialRow], size_ratio: float) -> TrialRow | None:
    """The most accurate feasible trial whose weights take at most ``size_ratio`` of float."""
    ok = [r for r in rows if r.feasible and float(r.metrics.size_ratio) <= size_ratio + 1e-9]
    return max(ok, key=lambda r: r.value("map"), default=None)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _x(metrics: TrialMetrics, key: str) -> float:
    return float(getattr(metrics, key))


def _fig_to_png(fig: Any, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    path.write_bytes(data)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(data).decode()


def plot_pareto(rows: Sequence[TrialRow], front: Sequence[TrialRow], base: TrialMetrics | None, x_key: str,
                x_label: str, path: Path, x_scale: float = 1.0, log_x: bool = False) -> str:
    """mAP50-95 vs a cost metric of every trial, the front and the float model; returns the PNG as base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = [_x(r.metrics, x_key) * x_scale for r in rows]
    ys = [r.metrics.map50_95 for r in rows]
    w4 = [r.metrics.w4_weight_share for r in rows]
    sc = ax.scatter(xs, ys, c=w4, cmap="viridis", vmin=0, vmax=1, s=28, alpha=0.8, label="trials")
    fig.colorbar(sc, ax=ax, label="share of weights at 4 bits")
    infeasible = [r for r in rows if not r.feasible]
    if infeasible:
        ax.scatter([_x(r.metrics, x_key) * x_scale for r in infeasible],
                   [r.metrics.map50_95 for r in infeasible], marker="x", c="grey", s=30,
                   label="violates mAP constraint")
    fx = [_x(r.metrics, x_key) * x_scale for r in sorted(front, key=lambda r: _x(r.metrics, x_key))]
    fy = [r.metrics.map50_95 for r in sorted(front, key=lambda r: _x(r.metrics, x_key))]
    ax.plot(fx, fy, "-o", color="crimson", mfc="none", ms=9, lw=1.2, label="Pareto front")
    if base is not None:
        ax.scatter([_x(base, x_key) * x_scale], [base.map50_95], marker="*", s=220, c="orange",
                   edgecolors="k", label="float", zorder=5)
        ax.axhline(base.map50_95 - 0.01, ls="--", lw=0.8, c="orange", label="float - 1 point")
    for r in front:
        ax.annotate(f"#{r.number}", (_x(r.metrics, x_key) * x_scale, r.metrics.map50_95),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        fmt = FuncFormatter(lambda v, _pos: f"{v:.3g}")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(fmt)
    ax.set_xlabel(x_label)
    ax.set_ylabel("mAP50-95 (COCO, pycocotools)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _fig_to_png(fig, path)


def plot_sensitivity(table: dict[str, Any], path: Path, top: int = 40) -> str:
    """Per-group damage of the most sensitive groups as bars; returns the PNG as base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scores = table["scores"]
    cands = sorted({c for per in scores.values() for c in per})
    groups = sorted(scores, key=lambda g: -max((v["damage"] for v in scores[g].values()), default=0.0))
    shown = groups[:top]
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.22 * len(shown) + 1.2)))
    y = np.arange(len(shown))
    h = 0.8 / max(len(cands), 1)
    for i, c in enumerate(cands):
        ax.barh(y + i * h, [scores[g].get(c, {}).get("damage", 0.0) for g in shown], height=h, label=c)
    ax.set_yticks(y + 0.4 - h / 2)
    ax.set_yticklabels(shown, fontsize=7)
    ax.invert_yaxis()
    metric = table.get("metric", "")
    ax.set_xlabel({"fidelity": "damage = 1 - fidelity mAP vs float detections",
                   "map": "mAP50-95 drop", "fisher": "Fisher score (expected loss increase)"}.get(metric, "damage"))
    ax.set_xscale("symlog", linthresh=1e-3 if metric != "fisher" else 1e-6)
    ax.set_title(f"Per-layer sensitivity ({metric}), {len(shown)} most sensitive of {len(groups)} groups")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _fig_to_png(fig, path)


PREC_ORDER = ["W4A8", "W4A16", "W8A8", "W8A16", "W16A16"]


def plot_bitmap(front: Sequence[TrialRow], layer_names: Sequence[str], path: Path) -> str:
    """Layer x front configuration map of precisions; returns the PNG as base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    cols = list(front)
    grid = np.full((len(layer_names), max(len(cols), 1)), len(PREC_ORDER) - 1, dtype=float)
    for j, r in enumerate(cols):
        for i, name in enumerate(layer_names):
            p = r.assignment.get(name, "W16A16")
            grid[i, j] = PREC_ORDER.index(p) if p in PREC_ORDER else len(PREC_ORDER) - 1
    cmap = ListedColormap(["#440154", "#3b528b", "#21918c", "#5ec962", "#f0f0f0"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(cols) + 3), max(4.0, 0.12 * len(layer_names) + 1)))
    im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(PREC_ORDER) - 0.5, interpolation="nearest")
    ax.set_yticks(range(len(layer_names)))
    ax.set_yticklabels(layer_names, fontsize=5)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"#{r.number}\n{100 * r.metrics.w4_weight_share:.0f}% W4" for r in cols],
                       fontsize=7)
    cbar = fig.colorbar(im, ax=ax, ticks=range(len(PREC_ORDER)))
    cbar.ax.set_yticklabels([p if p != "W16A16" else "float" for p in PREC_ORDER])
    ax.set_title("Layer x configuration bit map of the Pareto front")
    return _fig_to_png(fig, path)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------
COLUMNS = [("trial", "number"), ("label", "label"), ("policy", "policy"), ("mAP50-95", "map50_95"),
           ("vs float", "map_drop"), ("mAP50", "map50"), ("latency ms", "latency_ms"), ("weights MB", "weight_mb"),
           ("file MB", "file_mb"), ("size vs float", "size_ratio"), ("W4 share", "w4_weight_share"),
           ("A8 asked / ran int8", "a8_int8"), ("GBOPs", "gbops"), ("ONNX", "artifact")]


def a8_int8(m: TrialMetrics) -> str:
    """``82 / 82`` (A8 layers asked / run as int8 kernels), with the count that ran float when any did."""
    if m.a8_asked is None:
        return ""
    ran = "?" if m.a8_ran_int8 is None else str(m.a8_ran_int8)
    text = f"{m.a8_asked} / {ran}"
    return text + f" ({len(m.a8_ran_float)} ran float!)" if m.a8_ran_float else text


def row_values(r: TrialRow) -> dict[str, Any]:
    """The report's columns of one row (trials.csv, pareto.csv, tables)."""
    m = r.metrics
    return {"number": r.number, "label": r.label, "policy": r.policy, "map50_95": m.map50_95,
            "map_drop": m.map_drop, "map50": m.map50, "latency_ms": m.latency_ms,
            "latency_ratio": m.latency_ratio, "latency_measured_ms": m.latency_measured_ms,
            "weight_mb": float(m.weight_bytes) / 1e6, "file_mb": float(m.onnx_bytes) / 1e6,
            "size_ratio": m.size_ratio, "w4_weight_share": m.w4_weight_share, "a8_layers": r.summary.get("a8_layers"),
            "deploy_target": m.deploy_target, "a8_asked": m.a8_asked, "a8_ran_int8": m.a8_ran_int8,
            "a8_ran_float": ";".join(m.a8_ran_float), "a8_int8": a8_int8(m),
            "gbops": float(m.bops) / 1e9, "artifact": r.artifact, "digest": r.digest,
            "feasible": r.feasible}


def _fmt(key: str, v: Any) -> str:
    if v is None:
        return ""
    if key in ("map50_95", "map50"):
        return f"{v:.4f}"
    if key == "map_drop":  # shown as the change vs float
        return f"{-100 * v:+.2f} pt"
    if key in ("size_ratio", "w4_weight_share"):
        return f"{100 * v:.0f}%"
    if key in ("latency_ms", "weight_mb", "file_mb", "gbops"):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


@dataclass
class Report:
    """What a report holds: the spec, the rows, the front, the float baseline, the files written."""

    spec: Any
    rows: list[TrialRow]
    front: list[TrialRow]
    base: TrialMetrics | None
    table: dict[str, Any] | None
    objectives: list[str]
    out_dir: Path
    counts: dict[str, int]
    files: dict[str, Path] = field(default_factory=dict)
    verification: Verification | None = None


def _warn_changed_artifacts(rows: Sequence[TrialRow]) -> None:
    """One warning per listed trial whose artifact on this machine is not the file its metrics were measured on."""
    from search.pipeline import artifact_mismatch

    for row in rows:
        folder = Path(row.artifact).parent
        metrics = folder / "metrics.json"
        if not row.artifact or not metrics.is_file():
            continue  # built on another machine: its artifact is there
        try:
            bad = artifact_mismatch(folder, read_json(metrics).get("files"))
        except ValueError:
            bad = f"{metrics}: unreadable"
        if bad is not None:
            warn(f"trial {row.number}: {bad}; its metrics are not those of the file on disk "
                 "(`search run` rebuilds it, `search export` re-verifies it)")


def _intact_baseline(path: Path) -> TrialMetrics | None:
    """The float metrics of ``float/baseline.json``; ``None`` (with a warning) when it is not intact."""
    if not path.is_file():
        return None
    try:
        return TrialMetrics.from_json(read_json(path)["metrics"])
    except (ValueError, KeyError, TypeError) as exc:
        warn(f"{path}: unreadable ({exc}); the report leaves the float baseline out")
        return None


def make_report(run_dir: Path, storage: str | None = None, out_dir: Path | None = None, *,
                verify: bool = True) -> Report:
    """Write the report files of a run directory and return what they contain.

    With ``verify`` the chosen trials (:func:`search.report_verify.chosen_rows`) are verified
    first where ``verification.json`` lacks them; without, the report shows what it holds.
    """
    import optuna

    from search.verification import Verification

    spec, study = load_run(run_dir, storage)
    run_dir = Path(run_dir)
    objectives = list(study.user_attrs.get("objectives") or spec.search.objectives)
    rows = collect(study, spec.search.max_map_drop)
    if not rows:
        raise UserError(f"{run_dir}: the study has no completed trials yet")
    front = pareto_front(rows, objectives)
    _warn_changed_artifacts(front)
    paths = RunPaths(run_dir)
    base_file = paths.float_dir / "baseline.json"
    base, table = _intact_baseline(base_file), None
    sens = run_dir / "sensitivity.json"
    if "sensitivity" in study.user_attrs:  # the table the study ran with
        table = json.loads(study.user_attrs["sensitivity"])
    elif sens.is_file():
        try:
            table = read_sealed_json(sens)
        except ValueError as exc:
            warn(f"{sens}: {exc}; the report leaves the sensitivity table out")
    S = optuna.trial.TrialState
    all_trials = study.get_trials(deepcopy=False)
    counts = {"complete": sum(t.state == S.COMPLETE for t in all_trials),
              "failed": sum(t.state == S.FAIL for t in all_trials),
              "running": sum(t.state == S.RUNNING for t in all_trials),
              "duplicates": sum(t.state == S.COMPLETE and "duplicate_of" in t.user_attrs for t in all_trials),
              "unique": len(rows)}
    out = out_dir or paths.report
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(spec, rows, front, base, table, objectives, out, counts)
    rep.verification = Verification.load(run_dir)
    if verify:
        try:
            rep.verification = report_verify.ensure_verified(spec, run_dir, study,
                                                             report_verify.chosen_rows(rows, front, base))
        except UserError as exc:  # e.g. the model or the images are not on this machine
            from search.console import console_err

            console_err.print(f"[yellow]warning:[/] the front was not verified ({exc}); the report shows "
                              f"what {run_dir / 'verification.json'} holds", highlight=False)
    _write_csv(out / "pareto.csv", front, rep.verification)
    _write_csv(out / "trials.csv", rows, rep.verification)
    rep.files["pareto.csv"] = out / "pareto.csv"
    rep.files["trials.csv"] = out / "trials.csv"
    images: dict[str, str] = {}
    relative = any(r.metrics.latency_ratio is not None for r in rows)
    lat_label = ("latency (ms: median ratio to float, timed alongside, x float's ms; "
                 if relative else "latency (ms, median, ") + (base.latency_provider if base is not None else "") + ")"
    images["map_vs_latency"] = plot_pareto(rows, pareto_front(rows, ["map", "latency"]), base, "latency_ms",
                                           lat_label, out / "pareto_map_latency.png")
    images["map_vs_size"] = plot_pareto(rows, pareto_front(rows, ["map", "size"]), base, "weight_bytes",
                                        "weight size (MB, log scale)", out / "pareto_map_size.png", x_scale=1e-6,
                                        log_x=True)
    if table is not None:
        images["sensitivity"] = plot_sensitivity(table, out / "sensitivity.png")
    layer_names = sorted({n for r in rows for n in r.assignment}, key=_layer_sort_key)
    images["bitmap"] = plot_bitmap(front, layer_names, out / "bitmap.png")
    for k in images:
        rep.files[k] = out / {"map_vs_latency": "pareto_map_latency.png", "map_vs_size": "pareto_map_size.png",
                              "sensitivity": "sensitivity.png", "bitmap": "bitmap.png"}[k]
    write_text(out / "summary.md", summary_markdown(rep))
    rep.files["summary.md"] = out / "summary.md"
    write_text(out / "index.html", html_page(rep, images))
    rep.files["index.html"] = out / "index.html"
    return rep


def _layer_sort_key(name: str) -> tuple[Any, ...]:
    """Network order from module names: numeric parts compare as numbers."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _write_csv(path: Path, rows: Sequence[TrialRow], ver: Verification | None = None) -> None:
    from mpq.files import atomic_path

    keys = ["number", "label", "policy", "map50_95", "map_drop", "map50", "latency_ms", "latency_ratio",
            "latency_measured_ms", "weight_mb", "file_mb", "size_ratio", "w4_weight_share", "a8_layers",
            "deploy_target", "a8_asked", "a8_ran_int8", "a8_ran_float", "gbops", "feasible", "digest", "artifact",
            *report_verify.CSV_COLUMNS]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**row_values(r), **report_verify.csv_values(r, ver)})


def _timing_means(rows: Sequence[TrialRow]) -> dict[str, float]:
    built = [r for r in rows if r.timings]
    keys = ("materialize", "export", "evaluate", "latency", "total")
    return {k: sum(float(r.timings.get(k, 0.0)) for r in built) / len(built) for k in keys} if built else {}


def summary_markdown(rep: Report) -> str:
    """The report as markdown (``summary.md``)."""
    spec, base = rep.spec, rep.base
    lines = [f"# Mixed-precision search: {spec.name}", ""]
    lines.append(f"Model `{Path(str(spec.model)).name}` at {spec.imgsz}x{spec.imgsz}, backend `{spec.backend.name}`, "
                 f"deploy target `{spec.deploy.target}`, objectives {', '.join(rep.objectives)}, "
                 f"{rep.counts['unique']} assignments evaluated "
                 f"({rep.counts['complete']} trials, {rep.counts['duplicates']} duplicates, "
                 f"{rep.counts['failed']} failed).")
    if base is not None:
        lines.append(f"Float baseline: mAP50-95 **{base.map50_95:.4f}**, mAP50 {base.map50:.4f}, latency "
                     f"{base.latency_ms:.3g} ms ({base.latency_provider}), weights "
                     f"{base.weight_bytes / 1e6:.2f} MB.")
    lines += [f"**Warning:** {w}" for w in runtime_warnings(rep.rows)]
    lines += ["", "## Pareto front", ""]
    cols = [c for c in COLUMNS if c[1] != "artifact"]
    lines.append("| " + " | ".join(c[0] for c in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in rep.front:
        v = row_values(r)
        lines.append("| " + " | ".join(_fmt(k, v[k]) for _, k in cols) + " |")
    lines += ["", "Artifacts:", ""]
    lines += [f"- trial {r.number}: `{r.artifact}`" for r in rep.front]
    if rep.verification is None and rep.spec.dataset.verify is None:
        lines += ["", f"**{report_verify.IN_SAMPLE}.**"]
    lines += report_verify.markdown(rep)
    budgets = []
    for ratio in (0.3, 0.35, 0.4, 0.5) if rep.verification is None else ():
        b = best_at_budget(rep.rows, ratio)
        if b is not None:
            budgets.append(f"| <= {100 * ratio:.0f}% of float weights | #{b.number} | {b.value('map'):.4f} | "
                           f"{-100 * float(b.metrics.map_drop or 0):+.2f} pt | "
                           f"{100 * b.metrics.w4_weight_share:.0f}% |")
    if budgets:
        lines += ["", "## Best accuracy at a size budget", "",
                  "| budget | trial | mAP50-95 | vs float | W4 share |", "|---|---|---|---|---|", *budgets]
    t = _timing_means(rep.rows)
    if t:
        lines += ["", "## Time per evaluated trial (mean seconds)", "",
                  "| materialize | export | COCO eval | latency | total |", "|---|---|---|---|---|",
                  f"| {t['materialize']:.2f} | {t['export']:.2f} | {t['evaluate']:.2f} | {t['latency']:.2f} | "
                  f"{t['total']:.2f} |"]
    if rep.table:
        tab = rep.table
        scores = tab["scores"]
        order = sorted(scores, key=lambda g: -max((v["damage"] for v in scores[g].values()), default=0.0))
        lines += ["", f"## Sensitivity ({tab.get('metric')}, {tab.get('seconds', 0):.0f} s)", "",
                  "Most sensitive: " + ", ".join(f"`{g}`" for g in order[:8]),
                  "", "Least sensitive: " + ", ".join(f"`{g}`" for g in order[-8:])]
    lines += ["", "Plots: `pareto_map_latency.png`, `pareto_map_size.png`, `sensitivity.png`, `bitmap.png`; "
              "all trials: `trials.csv`.", ""]
    return "\n".join(lines)


def html_page(rep: Report, images: dict[str, str]) -> str:
    """The report as one HTML page with the plots inlined (``index.html``)."""
    spec, base = rep.spec, rep.base
    esc = html.escape
    cols = COLUMNS

    def table_html(rows: Sequence[TrialRow]) -> str:
        head = "".join(f"<th>{esc(c[0])}</th>" for c in cols)
        body = []
        for r in rows:
            v = row_values(r)
            cells = []
            for _, k in cols:
                text = _fmt(k, v[k])
                if k == "artifact":
                    text = f'<code title="{esc(str(v[k]))}">{esc(Path(str(v[k])).parent.name)}</code>'
                else:
                    text = esc(text)
                cells.append(f"<td>{text}</td>")
            cls = "" if r.feasible else ' class="infeasible"'
            if r.metrics.a8_ran_float:
                cls = ' class="warn"'
            body.append(f"<tr{cls}>{''.join(cells)}</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"

    def img(key: str, alt: str) -> str:
        return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{images[key]}"/>' \
               f"<figcaption>{esc(alt)}</figcaption></figure>" if key in images else ""

    base_txt = ""
    if base is not None:
        base_txt = (f"Float baseline: mAP50-95 <b>{base.map50_95:.4f}</b>, latency {base.latency_ms:.3g} ms "
                    f"({esc(base.latency_provider)}), weights {base.weight_bytes / 1e6:.2f} MB.")
        if any(r.metrics.latency_ratio is not None for r in rep.rows):
            lat = rep.spec.latency
            threads = f" on {lat.threads} ONNX Runtime thread{'s' if lat.threads != 1 else ''}" if lat.threads else ""
            base_txt += (f" Each trial's model was timed{threads} in alternating blocks of runs with the float model; "
                         "its latency is its ratio to float in the same window times the float baseline's "
                         "milliseconds, so a CPU whose "
                         "speed drifts during the search does not reorder trials (raw milliseconds: "
                         "<code>latency_measured_ms</code> in trials.csv).")
    warn_html = "".join(f'<p class="warn"><b>Warning:</b> {esc(w)}</p>' for w in runtime_warnings(rep.rows))
    t = _timing_means(rep.rows)
    timing = (f"<p>Mean time per evaluated trial: materialize {t['materialize']:.2f} s, export {t['export']:.2f} s, "
              f"COCO eval {t['evaluate']:.2f} s, latency {t['latency']:.2f} s (total {t['total']:.2f} s).</p>"
              if t else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(spec.name)}: mixed-precision search</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 1em 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right; }}
th {{ background: #f4f4f4; }} td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
tr.infeasible {{ color: #999; }} tr.warn {{ background: #fff3cd; }} p.warn {{ color: #8a6d00; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 100%; border: 1px solid #eee; }} code {{ font-size: 12px; }}
</style></head><body>
<h1>Mixed-precision search: {esc(spec.name)}</h1>
<p>Model <code>{esc(Path(str(spec.model)).name)}</code> at {spec.imgsz}x{spec.imgsz}, backend
<code>{esc(spec.backend.name)}</code>, deploy target <code>{esc(spec.deploy.target)}</code>,
objectives {esc(', '.join(rep.objectives))}.
{rep.counts['unique']} assignments evaluated ({rep.counts['complete']} trials, {rep.counts['duplicates']} duplicates,
{rep.counts['failed']} failed). {base_txt}</p>
{warn_html}
<h2>Pareto front ({len(rep.front)} configurations)</h2>
{table_html(rep.front)}
{report_verify.html_block(rep)}
{timing}
<h2>Trade-offs</h2>
{img('map_vs_latency', 'mAP50-95 vs latency (all trials; red: Pareto front)')}
{img('map_vs_size', 'mAP50-95 vs weight size (all trials; red: Pareto front)')}
<h2>Which layers take low precision</h2>
{img('bitmap', 'Precision of every layer in each Pareto configuration')}
<h2>Sensitivity</h2>
{img('sensitivity', 'Per-layer damage when the layer alone is quantized')}
<h2>All trials</h2>
<details><summary>{len(rep.rows)} evaluated assignments</summary>{table_html(rep.rows)}</details>
</body></html>
"""


def runtime_warnings(rows: Sequence[TrialRow]) -> list[str]:
    """One sentence per trial with A8 layers that the runtime ran as float (never silent)."""
    return [f"trial {r.number}: {r.metrics.runtime_warning}" for r in rows if r.metrics.a8_ran_float]


def short_label(summary: Mapping[str, Any]) -> str:
    """``W4:60 W8:15 fp:7 | A8:20`` from an assignment summary's counts."""
    counts = summary.get("counts", {})
    w: dict[str, int] = {}
    a8 = 0
    for prec, n in counts.items():
        key = "fp" if prec.startswith("W16") else prec.split("A")[0]
        w[key] = w.get(key, 0) + int(n)
        if prec.endswith("A8"):
            a8 += int(n)
    parts = [f"{k}:{w[k]}" for k in ("W4", "W8", "fp") if w.get(k)]
    return " ".join(parts) + (f" | A8:{a8}" if a8 else "")


def front_table(rep: Report) -> Any:
    """The Pareto front (and the float model) as a rich table for the terminal."""
    from rich.table import Table

    table = Table(title=f"Pareto front of '{rep.spec.name}' ({len(rep.front)} of {len(rep.rows)} assignments)",
                  caption=report_verify.terminal_caption(rep) or None)
    for name in ("#", "mAP50-95", "vs float", *report_verify.terminal_columns(rep), "ms", "MB", "file MB", "W4",
                 "A8 / int8", "layers"):
        table.add_column(name, justify="left" if name == "layers" else "right")
    if rep.base is not None:
        b = rep.base
        table.add_row("float", f"{b.map50_95:.4f}", "", *report_verify.terminal_cells(rep, None),
                      f"{b.latency_ms:.3g}", f"{b.weight_bytes / 1e6:.2f}", f"{b.onnx_bytes / 1e6:.2f}", "0%", "",
                      "float", style="dim")
    for r in rep.front:
        m = r.metrics
        a8 = a8_int8(m)
        table.add_row(str(r.number), f"{m.map50_95:.4f}", f"{-100 * (m.map_drop or 0):+.2f}",
                      *report_verify.terminal_cells(rep, r), f"{m.latency_ms:.3g}", f"{m.weight_bytes / 1e6:.2f}",
                      f"{m.onnx_bytes / 1e6:.2f}",
                      f"{100 * m.w4_weight_share:.0f}%", f"[bold yellow]{a8}[/]" if m.a8_ran_float else a8,
                      short_label(r.summary))
    if any(r.metrics.a8_ran_float for r in rep.front):
        table.caption = (f"{table.caption}\n" if table.caption else "") + (
            "[bold yellow]warning:[/] A8 layers ran as float in "
            + ", ".join(f"#{r.number}" for r in rep.front if r.metrics.a8_ran_float))
    return table
