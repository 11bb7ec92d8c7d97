"""The search end to end on the demo: sweep, study, resume, report, export (real backend,
real ONNX Runtime, real pycocotools, real Optuna SQLite storage)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp: Path, name: str = "it", **search: object) -> Path:
    data = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    data["name"] = name
    data["granularity"] = "block"
    data["candidates"] = ["W4A16", "W4A8", "W8A16", "W8A8"]
    data["dataset"]["max_images"] = 24
    data["dataset"]["verify"] = {"max_images": 24}
    data["calibration"]["max_images"] = 8
    data["sensitivity"] = {"images": 8}
    data["latency"] = {"engine": "ort", "warmup": 1, "runs": 3}
    data["search"] = {"budget": 4, "objectives": ["map", "size"], **search}
    data["runs_dir"] = str(tmp / "runs")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _search(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True, text=True, cwd=REPO)


def _study(run_dir: Path, name: str = "it") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("search")
    spec = _spec(tmp)
    out = _search("run", "--study", str(spec), "--budget", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    return spec, tmp / "runs" / "it"


def test_run_writes_the_run_directory_and_trials(finished_run: tuple[Path, Path]):
    _, run_dir = finished_run
    for f in ("spec.yaml", "env.json", "study.db", "sensitivity.json", "float/model.onnx", "weights.json"):
        assert (run_dir / f).exists(), f
    # the one-time rounded weights (issue 13): computed once, recorded, cached in the run's cache folder
    weights = json.loads((run_dir / "weights.json").read_text())
    assert weights["method"] == "gptq" and weights["served_from"] == "computed" and weights["one_time_seconds"] > 0
    assert (run_dir / "cache" / "weights" / f"brevitas-{weights['key']}.pt").is_file()
    table = json.loads((run_dir / "sensitivity.json").read_text())
    assert table["metric"] == "fidelity" and len(table["groups"]) >= 20
    assert set(next(iter(table["scores"].values()))) == {"W4A16", "W4A8", "W8A8"}
    study = _study(run_dir)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and "duplicate_of" not in t.user_attrs]
    assert len(done) == 4
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    first = study.trials[0]
    assert first.user_attrs["policy"].startswith("top-")  # the policies are enqueued first
    for t in done:
        ua = t.user_attrs
        for key in ("digest", "assignment", "summary", "metrics", "artifact", "timings", "provider", "worker"):
            assert key in ua, key
        trial_dir = run_dir / "trials" / ua["digest"]
        assert Path(ua["artifact"]) == (trial_dir / "model.onnx").resolve() and Path(ua["artifact"]).is_file()
        assert json.loads((trial_dir / "assignment.json").read_text())["digest"] == ua["digest"]
        m = ua["metrics"]
        assert 0.0 <= m["map50_95"] <= 1.0 and m["latency_ms"] > 0 and m["weight_bytes"] > 0
        # latency timed in alternation with the float model, expressed in the float baseline's frame
        base_ms = json.loads((run_dir / "float" / "baseline.json").read_text())["metrics"]["latency_ms"]
        assert m["latency_ratio"] > 0 and m["latency_float_same_window_ms"] > 0 and m["latency_measured_ms"] > 0
        assert m["latency_ms"] == pytest.approx(m["latency_ratio"] * base_ms)
        assert t.values == [m["map50_95"], m["weight_bytes"]]
        assert set(ua["timings"]) >= {"materialize", "export", "evaluate", "latency", "lower", "total"}
        # issue 12: the file is lowered for ort-cpu and what ONNX Runtime runs is recorded
        assert m["deploy_target"] == "ort-cpu" and ua["deploy target"] == "ort-cpu"
        assert ua["A8 asked"] == m["a8_asked"] == ua["summary"]["a8_layers"]
        assert m["a8_ran_int8"] == m["a8_asked"] and "warning" not in ua
        assert m["onnx_bytes"] == Path(ua["artifact"]).stat().st_size


def test_report_files(finished_run: tuple[Path, Path]):
    _, run_dir = finished_run
    out = _search("report", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "Pareto front of 'it'" in out.stdout
    rep = run_dir / "report"
    for f in ("index.html", "summary.md", "pareto.csv", "trials.csv", "pareto_map_latency.png",
              "pareto_map_size.png", "sensitivity.png", "bitmap.png"):
        assert (rep / f).stat().st_size > 0, f
    html = (rep / "index.html").read_text()
    assert "Pareto front" in html and "data:image/png;base64," in html
    lines = (rep / "pareto.csv").read_text().strip().splitlines()
    assert lines[0].startswith("number,label") and len(lines) >= 2
    import csv

    rows = list(csv.DictReader((rep / "pareto.csv").read_text().splitlines()))
    assert {"a8_asked", "a8_ran_int8", "a8_ran_float", "file_mb", "weight_mb", "deploy_target"} <= set(rows[0])
    for row in rows:  # every front point ran every A8 layer as int8, and both sizes are there
        assert row["a8_ran_int8"] == row["a8_asked"] and row["a8_ran_float"] == ""
        assert float(row["file_mb"]) > 0 and float(row["weight_mb"]) > 0
    assert "A8 asked / ran int8" in html
    assert "Time per evaluated trial" in (rep / "summary.md").read_text()


def test_run_verifies_the_front_on_the_held_out_split(finished_run: tuple[Path, Path]):
    """At the end of `search run` every front point was re-measured on the verification split (the
    same ONNX file), with paired intervals vs float: in verification.json, pareto.csv, the summary,
    the study's attributes."""
    import csv

    from mpq.files import file_digest

    _, run_dir = finished_run
    ver = json.loads((run_dir / "verification.json").read_text())
    assert ver["verify_images"] == 24 and ver["search_images"] == 24 and ver["head"] == "one2many"
    assert ver["float_verify_map"] > 0
    front = list(csv.DictReader((run_dir / "report" / "pareto.csv").open()))
    assert front
    for row in front:
        p = ver["points"][row["digest"]]
        assert p["onnx_sha256"] == file_digest(row["artifact"])  # the trial's own file
        assert float(row["map_verify"]) == pytest.approx(p["verify_map"])
        assert float(row["drop_verify"]) == pytest.approx(ver["float_verify_map"] - p["verify_map"])
        assert float(row["change_verify_lo"]) <= float(row["change_verify"]) <= float(row["change_verify_hi"])
        assert float(row["change_search_lo"]) <= p["search_change"] <= float(row["change_search_hi"])
        assert p["search_map"] == pytest.approx(float(row["map50_95"]), abs=1e-9)  # no second inference needed
        assert row["head"] == "one2many"
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "## Verified front" in summary and "held-out verification split of 24 images" in summary
    attrs = _study(run_dir).user_attrs
    assert set(attrs["verification"]["points"]) == set(ver["points"])
    assert any(k.startswith("verify #") and "verification split (24 images)" in v for k, v in attrs.items())


def test_the_float_model_verified_as_a_trial_has_zero_width_intervals(finished_run: tuple[Path, Path]):
    """Paired: the same resamples for trial and float, so float against itself is [0, 0] on both splits."""
    from search.pipeline import TrialPipeline
    from search.report import load_run
    from search.verification import Splits

    _, run_dir = finished_run
    spec, _ = load_run(run_dir)
    splits = Splits(TrialPipeline.for_spec(spec, run_dir=run_dir, progress=False))
    p = splits.measure(-1, "float", splits.float_onnx)
    assert p.search_change == p.search_low == p.search_high == 0.0
    assert p.verify_change == p.verify_low == p.verify_high == 0.0
    assert p.verify_map == splits.float_verify_map and p.search_map == splits.float_search_map


def test_report_without_a_split_says_in_sample(finished_run: tuple[Path, Path], tmp_path: Path):
    import shutil

    _, run_dir = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report", "verification.json"))
    spec = yaml.safe_load((copy / "spec.yaml").read_text())
    del spec["dataset"]["verify"]
    (copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = _search("report", str(copy))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "in-sample: scored on the images it was picked on" in (copy / "report" / "summary.md").read_text()
    assert "in-sample" in (copy / "report" / "index.html").read_text()
    assert json.loads((copy / "verification.json").read_text())["float_verify_map"] is None


def test_resume_reuses_the_sweep_and_continues(finished_run: tuple[Path, Path]):
    spec, run_dir = finished_run
    sweep = run_dir / "sensitivity.json"
    before = sweep.stat().st_mtime_ns
    out = _search("run", "--study", str(spec), "--budget", "6", "--no-report")
    assert out.returncode == 0, out.stdout + out.stderr
    assert sweep.stat().st_mtime_ns == before  # not recomputed
    # the rounded weights come from the run's cache folder: the rerun computes nothing
    weights = json.loads((run_dir / "weights.json").read_text())
    assert weights["served_from"] == "disk" and weights["seconds"] < weights["one_time_seconds"]
    study = _study(run_dir)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and "duplicate_of" not in t.user_attrs]
    assert len(done) == 6
    assert len({t.user_attrs["digest"] for t in done}) == 6  # every assignment evaluated once


def test_export_reverifies(finished_run: tuple[Path, Path], tmp_path: Path):
    _, run_dir = finished_run
    study = _study(run_dir)
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                 and "duplicate_of" not in t.user_attrs)
    out = _search("export", str(run_dir), "--trial", str(trial.number), "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    onnx_path = tmp_path / f"it-trial{trial.number}.onnx"
    side = json.loads((tmp_path / f"it-trial{trial.number}.json").read_text())
    assert onnx_path.is_file() and side["onnx"] == onnx_path.name
    assert side["assignment"] == trial.user_attrs["assignment"]
    assert side["metrics"]["map50_95"] == pytest.approx(trial.user_attrs["metrics"]["map50_95"], abs=1e-6)
    # the backend's export holds Q/DQ; the file lowered for ort-cpu keeps them only where a layer is A8
    # (a weight-only layer carries float values of its grid, no DequantizeLinear recomputed per run)
    assert side["export"]["export_node_counts"].get("DequantizeLinear", 0) > 0
    a8 = sum(1 for p in side["assignment"].values() if str(p).endswith("A8"))
    assert (side["export"]["node_counts"].get("DequantizeLinear", 0) > 0) == (a8 > 0)
    assert "brevitas" in side["versions"] and side["backend"]["name"] == "brevitas"
    v = side["verification"]
    assert side["head"] == "one2many" and v["verify_images"] == 24 and v["verify_map"] is not None
    assert v["verify_low"] <= v["verify_change"] <= v["verify_high"]
    assert "verify" in out.stdout and "held-out" in out.stdout  # the table's verification columns
    # the file handed out is the very file the trial measured; --rebuild makes it again from the assignment
    assert side["source"].startswith("the study's artifact")
    assert onnx_path.read_bytes() == Path(trial.user_attrs["artifact"]).read_bytes()
    out = _search("export", str(run_dir), "--trial", str(trial.number), "--out", str(tmp_path / "rb"), "--rebuild")
    assert out.returncode == 0, out.stdout + out.stderr
    again = json.loads((tmp_path / "rb" / f"it-trial{trial.number}.json").read_text())
    assert again["source"] == "re-built from the assignment"
    assert again["verification"]["search_map"] == pytest.approx(v["search_map"], abs=1e-9)
    bad = _search("export", str(run_dir), "--trial", "999")
    assert bad.returncode == 2 and "no trial 999" in bad.stderr


def test_a_truncated_trial_artifact_is_rebuilt_not_reused(finished_run: tuple[Path, Path], tmp_path: Path):
    """Issue 14: a finished trial's model.onnx truncated, then export and ``run --fresh``."""
    from mpq.files import record_mismatch

    spec, run_dir = finished_run
    study = _study(run_dir)
    trial = next(t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                 and "duplicate_of" not in t.user_attrs)
    onnx_path = Path(trial.user_attrs["artifact"])
    onnx_path.write_bytes(onnx_path.read_bytes()[:1000])
    out = _search("export", str(run_dir), "--trial", str(trial.number), "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning:" in out.stderr and str(onnx_path) in out.stderr.replace("\n", "")
    out = _search("run", "--study", str(spec), "--budget", "6", "--no-report", "--fresh")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and str(onnx_path) in out.stderr
    again = [t for t in _study(run_dir).trials if t.user_attrs.get("digest") == trial.user_attrs["digest"]
             and "duplicate_of" not in t.user_attrs]
    assert again and again[0].user_attrs["cached"] is False  # rebuilt, not reused
    records = json.loads((onnx_path.parent / "metrics.json").read_text())["files"]
    assert record_mismatch(onnx_path, records[0]) is None and onnx_path.stat().st_size > 1000


def test_a_changed_spec_does_not_silently_join_the_old_study(finished_run: tuple[Path, Path]):
    spec, run_dir = finished_run
    data = yaml.safe_load(spec.read_text())
    data["backend"] = {"name": "brevitas", "bias_correction": False}
    changed = spec.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(data))
    out = _search("run", "--study", str(changed), "--budget", "7", "--no-report")
    assert out.returncode == 2 and "different context" in out.stderr and "--fresh" in out.stderr


def test_failing_trials_are_recorded_and_the_study_goes_on(finished_run: tuple[Path, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    from search.pipeline import TrialPipeline
    from search.spec import load_spec
    from search.study import RunSettings, StudyRunner

    spec_path, run_dir = finished_run
    spec = load_spec(spec_path)
    # a separate study in the same run dir (shares the cached sweep and trials)
    pipeline = TrialPipeline.for_spec(spec, run_dir=run_dir, progress=False)
    settings = RunSettings.from_spec(spec, run_dir, budget=2, storage=f"sqlite:///{tmp_path / 'fail.db'}")
    real = pipeline.run
    calls = {"n": 0}

    def flaky(assignment, **kw):  # the first build fails as a broken backend would
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("exporter crashed on purpose")
        return real(assignment, **kw)

    monkeypatch.setattr(pipeline, "run", flaky)
    study = StudyRunner(pipeline, settings, progress=False).run()
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert "exporter crashed on purpose" in study.trials[0].user_attrs["failure"]
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states) >= 2
