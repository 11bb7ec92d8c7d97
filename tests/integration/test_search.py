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
    data["dataset"]["max_images"] = 24
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
        assert set(ua["timings"]) >= {"materialize", "export", "evaluate", "latency", "total"}


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
    assert "Time per evaluated trial" in (rep / "summary.md").read_text()


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
    assert side["export"]["node_counts"].get("DequantizeLinear", 0) > 0
    assert "brevitas" in side["versions"] and side["backend"]["name"] == "brevitas"
    bad = _search("export", str(run_dir), "--trial", "999")
    assert bad.returncode == 2 and "no trial 999" in bad.stderr


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
