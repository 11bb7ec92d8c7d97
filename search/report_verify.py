"""The report's verified numbers: which trials are verified, their columns, the recommendations
made from them, and the notices (in-sample numbers, points within each other's interval).

:mod:`search.report` calls these; :mod:`search.verification` measures. The trials verified are
the Pareto front and, for each budget of the recommendations, the most accurate trial under it
on the search split, so every recommendation is chosen among verified numbers.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from search.results import TrialMetrics
    from search.spec import StudySpec
    from search.verification import Verification, VerifiedTrial


class TrialRow(Protocol):
    """What this module reads of a report row (:class:`search.report.TrialRow`)."""

    number: int
    digest: str
    metrics: TrialMetrics
    feasible: bool
    artifact: str
    assignment: dict[str, str]


class Report(Protocol):
    """What this module reads of a report (:class:`search.report.Report`)."""

    rows: list[Any]
    front: list[Any]
    base: TrialMetrics | None
    verification: Verification | None

#: Size budgets (share of the float model's weight bytes) and latency budgets (share of float's ms).
SIZE_BUDGETS = (0.3, 0.35, 0.4, 0.5)
LATENCY_BUDGETS = (0.5, 0.7, 0.9)

#: pareto.csv / trials.csv columns of the verified numbers (empty for trials not verified).
CSV_COLUMNS = ("head", "map_search", "change_search_lo", "change_search_hi", "map_verify", "drop_verify",
               "change_verify", "change_verify_lo", "change_verify_hi", "verify_images")

IN_SAMPLE = ("in-sample: scored on the images it was picked on (no dataset.verify split in the spec; "
             "the front's numbers include the winners' luck)")


@dataclass(frozen=True)
class Budget:
    """A recommendation budget: ``kind`` ``size`` or ``latency``, a share of float's value, and its label."""

    kind: str
    share: float
    label: str

    def fits(self, m: TrialMetrics, base: TrialMetrics | None) -> bool:
        """Whether a trial's metrics fit the budget."""
        if self.kind == "size":
            return float(m.size_ratio) <= self.share + 1e-9
        if base is None or not base.latency_ms:
            return False
        return float(m.latency_ms) <= self.share * float(base.latency_ms) + 1e-9


def budgets(base: TrialMetrics | None) -> list[Budget]:
    """The recommendations' budgets: weight size, and latency when the float model's is known."""
    out = [Budget("size", s, f"<= {100 * s:.0f}% of float weights") for s in SIZE_BUDGETS]
    if base is not None and base.latency_ms:
        out += [Budget("latency", s, f"<= {s * float(base.latency_ms):.3g} ms ({100 * s:.0f}% of float)")
                for s in LATENCY_BUDGETS]
    return out


def chosen_rows(rows: Sequence[TrialRow], front: Sequence[TrialRow], base: TrialMetrics | None) -> list[TrialRow]:
    """The trials to verify: the front, then each budget's most accurate trial on the search split."""
    out = {r.digest: r for r in front}
    for b in budgets(base):
        ok = [r for r in rows if r.feasible and b.fits(r.metrics, base)]
        best = max(ok, key=lambda r: r.metrics.map50_95, default=None)
        if best is not None:
            out.setdefault(best.digest, best)
    return sorted(out.values(), key=lambda r: r.number)


def ensure_verified(spec: StudySpec, run_dir: Path, study: Any, chosen: Sequence[TrialRow]) -> Verification:
    """``verification.json`` when it holds every chosen trial for the same files; otherwise verify
    the missing ones (model, data and ONNX Runtime are loaded only then) and store them in the study."""
    from mpq.assignment import Assignment, Precision
    from mpq.files import file_digest
    from search.console import console_err
    from search.pipeline import TrialPipeline
    from search.verification import Chosen, Verification, store_in_study, verification_key, verify_trials

    pipeline = TrialPipeline.for_spec(spec, run_dir=run_dir, progress=False)
    old = Verification.load(run_dir)
    if old is not None and old.key == verification_key(pipeline) and all(
            (p := old.get(r.digest)) is not None and Path(r.artifact).is_file()
            and p.onnx_sha256 == file_digest(Path(r.artifact)) for r in chosen):
        return old
    todo = [Chosen(r.number, r.digest, Path(r.artifact),
                   Assignment({k: Precision.parse(v) for k, v in r.assignment.items()})) for r in chosen]
    with console_err.status(f"verifying {len(todo)} chosen trials ..."):
        ver = verify_trials(pipeline, todo, log=lambda m: console_err.print(f"[dim]{m}[/]", highlight=False))
    store_in_study(study, ver)
    return ver


def csv_values(r: TrialRow, ver: Verification | None) -> dict[str, Any]:
    """The verified columns of one row (empty when the row was not verified)."""
    out: dict[str, Any] = {"head": r.metrics.head or (ver.head if ver is not None else None)}
    p = ver.get(r.digest) if ver is not None else None
    if p is None or ver is None:
        return out
    out.update(map_search=p.search_map, change_search_lo=p.search_low, change_search_hi=p.search_high)
    if p.verify_map is not None:
        out.update(map_verify=p.verify_map, drop_verify=p.verify_drop, change_verify=p.verify_change,
                   change_verify_lo=p.verify_low, change_verify_hi=p.verify_high, verify_images=ver.verify_images)
    return out


def _pt(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.2f}"


def _score(p: VerifiedTrial) -> float:
    return p.verify_map if p.verify_map is not None else p.search_map


def picks(rep: Report) -> list[tuple[Budget, TrialRow, VerifiedTrial]]:
    """For each budget, the verified trial with the best verified mAP50-95 under it."""
    ver = rep.verification
    if ver is None:
        return []
    out = []
    for b in budgets(rep.base):
        cands = [(r, p) for r in rep.rows if r.feasible and b.fits(r.metrics, rep.base)
                 and (p := ver.get(r.digest)) is not None]
        if cands:
            r, p = max(cands, key=lambda rp: _score(rp[1]))
            out.append((b, r, p))
    return out


def close_pairs(rep: Report) -> list[tuple[int, int]]:
    """Front points (neighbours in cost order) whose changes vs float lie within each other's interval."""
    ver = rep.verification
    if ver is None:
        return []
    pts = [p for r in rep.front if (p := ver.get(r.digest)) is not None]
    out = []
    for a, b in zip(pts, pts[1:], strict=False):
        (da, la, ha), (db, lb, hb) = a.best_change(), b.best_change()
        if la <= db <= ha and lb <= da <= hb:
            out.append((a.number, b.number))
    return out


def split_line(rep: Report) -> str:
    """Which images the numbers come from, the head, and the bootstrap."""
    ver = rep.verification
    if ver is None:
        return ""
    head = f"Head: {ver.head} ({ver.postprocess})."
    boot = (f"Intervals: 95% paired bootstrap over images ({ver.n_boot} resamples, the same images for the trial "
            "and for float), of the mAP50-95 change vs float.")
    if ver.in_sample:
        return f"{head} Search split: {ver.search_images} images; **{IN_SAMPLE}**. {boot}"
    return (f"{head} Trials were scored on the search split ({ver.search_images} images); the chosen ones were "
            f"re-measured (same ONNX files) on a held-out verification split of {ver.verify_images} images the "
            f"search never saw (float: {ver.float_verify_map:.4f} there, {ver.float_search_map:.4f} on the search "
            f"split). {boot}")


def markdown(rep: Report) -> list[str]:
    """The verified front, the recommendations and the notices as markdown lines."""
    ver = rep.verification
    if ver is None:
        return []
    lines = ["", "## Verified front", "", split_line(rep), ""]
    lines += ["| trial | mAP50-95 search | change search (pt) [95%] | mAP50-95 verify | change verify (pt) [95%] |",
              "|---|---|---|---|---|"]
    for r in rep.front:
        p = ver.get(r.digest)
        if p is not None:
            lines.append(f"| #{r.number} | {p.search_map:.4f} | {_pt(p.search_change)} [{_pt(p.search_low)}, "
                         f"{_pt(p.search_high)}] | {_f4(p.verify_map)} | {_pt(p.verify_change)} "
                         f"{_iv(p.verify_low, p.verify_high)} |")
    for a, b in close_pairs(rep):
        lines.append(f"\n#{a} and #{b} are within each other's 95% interval: these images do not tell them apart.")
    rows = picks(rep)
    if rows:
        which = "search-split (in-sample)" if ver.in_sample else "verification-split"
        lines += ["", f"## Recommendations (best {which} mAP50-95 under each budget)", "",
                  "| budget | trial | mAP50-95 | change vs float (pt) [95%] | search-split mAP | W4 share |",
                  "|---|---|---|---|---|---|"]
        for budget, r, p in rows:
            c, lo, hi = p.best_change()
            lines.append(f"| {budget.label} | #{r.number} | {_score(p):.4f} | {_pt(c)} {_iv(lo, hi)} | "
                         f"{p.search_map:.4f} | {100 * r.metrics.w4_weight_share:.0f}% |")
    return lines


def _f4(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def _iv(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f"[{_pt(lo)}, {_pt(hi)}]"


def html_block(rep: Report) -> str:
    """The verified front, the recommendations and the notices as an HTML fragment."""
    ver = rep.verification
    if ver is None:
        return ""
    esc = html.escape
    text = split_line(rep).replace("**", "")
    notice = f'<p class="notice"><b>{esc(IN_SAMPLE)}</b></p>' if ver.in_sample else ""
    body = []
    for r in rep.front:
        p = ver.get(r.digest)
        if p is not None:
            body.append(f"<tr><td>#{r.number}</td><td>{p.search_map:.4f}</td><td>{_pt(p.search_change)} "
                        f"{_iv(p.search_low, p.search_high)}</td><td>{_f4(p.verify_map)}</td>"
                        f"<td>{_pt(p.verify_change)} {_iv(p.verify_low, p.verify_high)}</td></tr>")
    close = "".join(f"<p>#{a} and #{b} are within each other's 95% interval: these images do not tell them "
                    "apart.</p>" for a, b in close_pairs(rep))
    recs = []
    for b, r, p in picks(rep):
        c, lo, hi = p.best_change()
        recs.append(f"<tr><td>{esc(b.label)}</td><td>#{r.number}</td><td>{_score(p):.4f}</td>"
                    f"<td>{_pt(c)} {_iv(lo, hi)}</td><td>{p.search_map:.4f}</td>"
                    f"<td>{100 * r.metrics.w4_weight_share:.0f}%</td></tr>")
    which = "search-split (in-sample)" if ver.in_sample else "verification-split"
    rec_html = (f"<h2>Recommendations (best {which} mAP50-95 under each budget)</h2><table><thead><tr>"
                "<th>budget</th><th>trial</th><th>mAP50-95</th><th>change vs float (pt) [95%]</th>"
                f"<th>search-split mAP</th><th>W4 share</th></tr></thead><tbody>{''.join(recs)}</tbody></table>"
                if recs else "")
    return (f"<h2>Verified front</h2>{notice}<p>{esc(text)}</p><table><thead><tr><th>trial</th>"
            "<th>mAP50-95 search</th><th>change search (pt) [95%]</th><th>mAP50-95 verify</th>"
            f"<th>change verify (pt) [95%]</th></tr></thead><tbody>{''.join(body)}</tbody></table>{close}"
            f"{rec_html}")


def terminal_columns(rep: Report) -> list[str]:
    """Extra columns of the terminal front table."""
    ver = rep.verification
    if ver is None:
        return []
    if ver.in_sample:
        return ["95% (pt, in-sample)"]
    return ["verify mAP", "verify vs float [95%]", "search 95%"]


def terminal_cells(rep: Report, r: TrialRow | None) -> list[str]:
    """A row's cells of :func:`terminal_columns` (``r`` None: the float model's row)."""
    ver = rep.verification
    if ver is None:
        return []
    if r is None:
        return [""] if ver.in_sample else [_f4(ver.float_verify_map), "", ""]
    p = ver.get(r.digest)
    if p is None:
        return [""] * len(terminal_columns(rep))
    search = _iv(p.search_low, p.search_high)
    if ver.in_sample:
        return [search]
    return [_f4(p.verify_map), f"{_pt(p.verify_change)} {_iv(p.verify_low, p.verify_high)}", search]


def terminal_caption(rep: Report) -> str:
    """The terminal table's caption: the head, the splits, or the in-sample notice."""
    ver = rep.verification
    if ver is None:
        return ""
    if ver.in_sample:
        return f"head {ver.head}; {IN_SAMPLE}"
    return (f"head {ver.head}; mAP/vs float: search split ({ver.search_images} images); verify: the same ONNX on "
            f"{ver.verify_images} held-out images; [95%]: paired bootstrap of the change vs float")
