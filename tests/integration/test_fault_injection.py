"""Issue 14, hardening: a run killed (SIGKILL) at random points (the sweep, a build, an evaluation,
the report) and resumed each time keeps every completed trial with its artifact intact, meets
the budget exactly, and leaves no half-written file under a final name.

Real processes, real backend, real ONNX Runtime, real SQLite storage; about four minutes on a
shared CPU, hence ``slow``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BUDGET = 3

pytestmark = pytest.mark.slow


def _spec(tmp: Path) -> Path:
    data = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    data.update(name="chaos", granularity="block", runs_dir=str(tmp / "runs"))
    data["dataset"]["max_images"] = 8
    data["calibration"].update(max_images=4, batch_size=4)
    data["sensitivity"] = {"images": 4}
    data["latency"] = {"engine": "ort", "warmup": 0, "runs": 2}
    data["search"] = {"budget": BUDGET, "objectives": ["map", "size"]}
    path = tmp / "chaos.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(spec: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_MPQ_HEARTBEAT_S": "2", "YOLO_MPQ_GRACE_S": "6",
           "COLUMNS": "200"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "search", "run", "--study", str(spec)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime > since
    except FileNotFoundError:
        return False


def _building(out: str, run_dir: Path, since: float) -> bool:
    """A trial folder whose assignment this process wrote and that has no ONNX yet: materializing or exporting."""
    return any(not (d / "model.onnx").exists() for d in run_dir.glob("trials/*")
               if _newer(d / "assignment.json", since))


def _evaluating(out: str, run_dir: Path, since: float) -> bool:
    """A trial folder whose ONNX this process wrote and that has no metrics yet: being evaluated."""
    return any(not (d / "metrics.json").exists() for d in run_dir.glob("trials/*") if _newer(d / "model.onnx", since))


#: Where each kill lands: a condition on (the run's output, its run directory), then a short random delay.
KILL_POINTS: list[tuple[str, Callable[[str, Path, float], bool]]] = [
    ("sweep", lambda out, run, since: "sweep" in out),
    ("build", _building),
    ("evaluation", _evaluating),
    ("build", _building),
    ("report", lambda out, run, since: _newer(run / "report", since)),
]


def _kill_when(proc: subprocess.Popen[bytes], log: Path, run_dir: Path,
               point: Callable[[str, Path, float], bool], delay: float, timeout: float = 600) -> None:
    start, since = time.monotonic(), time.time()
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            if point(log.read_text(errors="replace"), run_dir, since):
                time.sleep(delay)
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _check_files(run_dir: Path) -> None:
    """Every file under a final name is whole: JSON parses, a trial's ONNX is the one it measured."""
    from mpq.files import read_sealed_json
    from search.pipeline import artifact_mismatch

    for path in run_dir.rglob("*.json"):
        if not path.name.startswith("."):
            json.loads(path.read_text())  # raises on a half-written file
    if (run_dir / "sensitivity.json").exists():
        read_sealed_json(run_dir / "sensitivity.json")
    for metrics in run_dir.glob("trials/*/metrics.json"):
        assert artifact_mismatch(metrics.parent, json.loads(metrics.read_text())["files"]) is None, metrics
    for yml in run_dir.rglob("spec.yaml"):
        assert yaml.safe_load(yml.read_text())["name"] == "chaos"


def test_kill_and_resume_keeps_every_completed_trial(tmp_path):
    spec = _spec(tmp_path)
    run_dir = tmp_path / "runs" / "chaos"
    log = tmp_path / "run.log"
    rng = random.Random(14)
    kept: dict[str, dict] = {}  # digest -> metrics of every trial completed so far
    for _name, point in KILL_POINTS:
        proc = _start(spec, log)
        _kill_when(proc, log, run_dir, point, rng.uniform(0.0, 2.0))
        out = log.read_text(errors="replace")
        assert "Traceback" not in out, out
        if run_dir.exists():
            _check_files(run_dir)
        if (run_dir / "study.db").exists():
            study = optuna.load_study(study_name="chaos", storage=f"sqlite:///{run_dir / 'study.db'}")
            for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
                if "duplicate_of" not in t.user_attrs:
                    kept.setdefault(t.user_attrs["digest"], t.user_attrs["metrics"])
    proc = _start(spec, log)
    try:
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log.read_text(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in out, out
    _check_files(run_dir)
    study = optuna.load_study(study_name="chaos", storage=f"sqlite:///{run_dir / 'study.db'}")
    S = optuna.trial.TrialState
    done = [t for t in study.trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(done) == BUDGET  # the budget, exactly
    digests = {t.user_attrs["digest"]: t for t in done}
    for digest, metrics in kept.items():  # nothing completed before a kill was lost or changed
        assert digest in digests and digests[digest].user_attrs["metrics"] == metrics
    for t in study.trials:
        if t.state == S.FAIL:
            assert "died" in t.user_attrs.get("failure", ""), t.user_attrs
    for t in done:
        assert Path(t.user_attrs["artifact"]).is_file()
    assert (run_dir / "report" / "index.html").is_file()
