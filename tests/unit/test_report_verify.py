"""The report's verified numbers: recommendations from the verification split, the in-sample
notice, the columns, the points within each other's interval (constructed values, no model)."""

from __future__ import annotations

import csv
from pathlib import Path

from search import report_verify
from search.report import Report, TrialRow, _write_csv, front_table, summary_markdown
from search.results import TrialMetrics
from search.spec import load_spec
from search.verification import Verification, VerifiedTrial

REPO = Path(__file__).resolve().parents[2]


def _metrics(m: float, size: float, lat: float = 10.0) -> TrialMetrics:
    return TrialMetrics(map50_95=m, map50=m, map75=m, images_per_s=1.0, provider="CPUExecutionProvider",
                        latency_ms=lat, latency_p90_ms=lat, latency_measured_ms=lat,
                        latency_provider="CPUExecutionProvider", latency_device="cpu", latency_batch=1,
                        weight_bytes=int(size * 1e6), size_ratio=size, bops=1.0, w4_weight_share=0.5,
                        onnx_bytes=1, map_drop=0.8 - m, head="one2many")


def _row(n: int, m: float, size: float) -> TrialRow:
    return TrialRow(n, f"d{n}", "", "", _metrics(m, size), {}, {}, f"/runs/x/trials/d{n}/model.onnx", {}, {}, True)


def _point(n: int, search: float, verify: float | None, half: float = 0.01) -> VerifiedTrial:
    v = {} if verify is None else {"verify_map": verify, "verify_map50": verify, "verify_change": verify - 0.78,
                                   "verify_low": verify - 0.78 - half, "verify_high": verify - 0.78 + half}
    return VerifiedTrial(number=n, digest=f"d{n}", onnx_sha256="x", search_map=search, search_change=search - 0.8,
                         search_low=search - 0.8 - half, search_high=search - 0.8 + half, **v)


def _report(tmp_path: Path, points: dict[str, VerifiedTrial], *, in_sample: bool = False) -> Report:
    spec = load_spec(REPO / "studies" / "demo.yaml", check_files=False)
    rows = [_row(0, 0.79, 0.45), _row(1, 0.78, 0.30), _row(2, 0.76, 0.28)]
    base = _metrics(0.8, 1.0)
    ver = Verification(key={}, head="one2many", postprocess="one-to-many head + NMS", search_images=100,
                       verify_images=0 if in_sample else 100, float_search_map=0.8,
                       float_verify_map=None if in_sample else 0.78, points=points)
    return Report(spec, rows, rows, base, None, ["map", "size"], tmp_path, {"unique": 3, "complete": 3,
                  "duplicates": 0, "failed": 0}, verification=ver)


def test_recommendations_use_the_verified_numbers(tmp_path: Path):
    # #1 wins on the search split under 30 %, but #2 wins on the images the search never saw
    rep = _report(tmp_path, {"d0": _point(0, 0.79, 0.775), "d1": _point(1, 0.78, 0.70), "d2": _point(2, 0.76, 0.74)})
    picks = {b.label: r.number for b, r, _ in report_verify.picks(rep)}
    assert picks["<= 30% of float weights"] == 2 and picks["<= 50% of float weights"] == 0
    md = summary_markdown(rep)
    assert "## Verified front" in md and "Recommendations (best verification-split mAP50-95" in md
    assert "| <= 30% of float weights | #2 | 0.7400 | -4.00 [-5.00, -3.00] | 0.7600 |" in md
    assert "Best accuracy at a size budget" not in md  # the in-sample picks are replaced
    assert "held-out verification split of 100 images" in md and "one2many" in md


def test_chosen_rows_are_the_front_and_each_budget_s_search_winner():
    rows = [_row(0, 0.79, 0.45), _row(1, 0.78, 0.30), _row(2, 0.76, 0.28), _row(3, 0.70, 0.9)]
    chosen = report_verify.chosen_rows(rows, [rows[0]], _metrics(0.8, 1.0))
    assert [r.number for r in chosen] == [0, 1]  # #1: best under 30 %, 35 % and 40 %


def test_in_sample_notice_without_a_verification_split(tmp_path: Path):
    rep = _report(tmp_path, {"d0": _point(0, 0.79, None), "d1": _point(1, 0.78, None)}, in_sample=True)
    md = summary_markdown(rep)
    assert "in-sample: scored on the images it was picked on" in md
    assert "Recommendations (best search-split (in-sample) mAP50-95" in md
    assert "in-sample" in report_verify.html_block(rep) and "in-sample" in report_verify.terminal_caption(rep)


def test_pareto_csv_columns(tmp_path: Path):
    rep = _report(tmp_path, {"d0": _point(0, 0.79, 0.775)})
    _write_csv(tmp_path / "pareto.csv", rep.front, rep.verification)
    rows = list(csv.DictReader((tmp_path / "pareto.csv").open()))
    assert set(report_verify.CSV_COLUMNS) <= set(rows[0])
    assert float(rows[0]["map_verify"]) == 0.775 and abs(float(rows[0]["drop_verify"]) - 0.005) < 1e-12
    assert float(rows[0]["change_verify_lo"]) < float(rows[0]["change_verify"]) < float(rows[0]["change_verify_hi"])
    assert rows[0]["head"] == "one2many" and rows[0]["verify_images"] == "100"
    assert rows[1]["map_verify"] == ""  # not verified: empty, not invented


def test_points_within_each_other_s_interval(tmp_path: Path):
    rep = _report(tmp_path, {"d0": _point(0, 0.79, 0.775, half=0.02), "d1": _point(1, 0.78, 0.770, half=0.02),
                             "d2": _point(2, 0.76, 0.70, half=0.01)})
    assert report_verify.close_pairs(rep) == [(0, 1)]
    assert "#0 and #1 are within each other's 95% interval" in summary_markdown(rep)


def test_terminal_table_and_json_round_trip(tmp_path: Path):
    from rich.console import Console

    rep = _report(tmp_path, {"d0": _point(0, 0.79, 0.775)})
    console = Console(width=250, record=True)
    console.print(front_table(rep))
    text = console.export_text()
    assert "verify mAP" in text and "0.7750" in text and "-0.50 [-1.50, +0.50]" in text
    assert rep.verification is not None
    again = Verification.from_json(rep.verification.to_json())
    assert again == rep.verification and not again.in_sample
