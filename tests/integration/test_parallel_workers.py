"""Two real `search run` workers on one PostgreSQL-backed study (the demo model and data).

The workers share nothing but the storage URL: each has its own run directory, so the
artifacts show who built what. One worker is SIGKILLed in the middle of a trial; the study
must stay consistent (that trial turns FAIL once its heartbeat is stale and is retried) and
the surviving worker must finish the budget alone. Heartbeat and grace period are
shortened through the environment so this takes a minute or two instead of several.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]

BUDGET = 6
# The demo, cut down so that a trial takes seconds on a 2-core CPU: ten blocks searched
# (the rest kept float), few images; a latency measurement of 400 runs (about 2 s) keeps a
# trial long enough to be killed in the middle; the full space (one
# choice per block, 3^10 assignments) so that the workers rarely draw the same one.
SPEC = """\
name: {name}
model: demo://yolov10n-shapes.pt
imgsz: 192
granularity: block
candidates: [W4A16, W8A16]
keep_float: ["model.1[0-9].*", "model.2[0-9].*"]
dataset:
  images: demo://images/val
  annotations: demo://annotations/instances_val.json
  max_images: 8
calibration:
  source: demo://calib.txt
  max_images: 4
  batch_size: 4
backend:
  name: brevitas
  weight_scale: max
  weight_rounding: nearest
  bias_correction: false
  optimize_onnx: false
evaluation:
  providers: [CPUExecutionProvider]
  batch_size: 8
  threads: 1
latency:
  engine: ort
  warmup: 5
  runs: 400
  threads: 1
sensitivity:
  images: 2
  candidates: [W4A16]
search:
  budget: {budget}
  objectives: [map, latency]
  sampler: tpe
  space: full
"""


def write_spec(folder: Path, name: str, budget: int = BUDGET) -> Path:
    """A small demo study spec; loading it once here builds the demo data before workers race to."""
    from search.spec import load_spec

    path = folder / f"{name}.yaml"
    path.write_text(SPEC.format(name=name, budget=budget))
    load_spec(path)  # validates, and generates the synthetic demo dataset into the cache if missing
    return path


def start_worker(spec: Path, storage: str, run_dir: Path, log: Path, budget: int = BUDGET,
                 extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    env = dict(os.environ, YOLO_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               YOLO_MPQ_HEARTBEAT_S="2", YOLO_MPQ_GRACE_S="10")
    env.pop("YOLO_MPQ_WORKER_INDEX", None)
    cmd = [sys.executable, "-m", "search", "run", "--study", str(spec), "--storage", storage,
           "--budget", str(budget), "--run-dir", str(run_dir), "--device", "cpu", "--no-report", *extra]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def load(storage: str, name: str):  # noqa: ANN201
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=storage)


def worker_id(proc: subprocess.Popen[bytes]) -> str:
    return f"{socket.gethostname()}:{proc.pid}"


def wait_exit(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"worker did not finish in {timeout:.0f} s:\n{log.read_text()[-4000:]}") from None


def test_two_workers_one_study_survives_a_killed_worker(postgres_url, tmp_path):
    import onnx
    import optuna

    S = optuna.trial.TrialState
    name = "pw-demo"
    spec = write_spec(tmp_path, name)
    run_a, run_b = tmp_path / "worker-a", tmp_path / "worker-b"
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    wa = start_worker(spec, postgres_url, run_a, log_a)
    wb = start_worker(spec, postgres_url, run_b, log_b)
    ida, idb = worker_id(wa), worker_id(wb)
    try:
        # --- wait until worker b is in the middle of a trial (after it finished one, if it can) -----
        killed: list[int] = []
        deadline = time.monotonic() + 600
        while not killed:
            assert time.monotonic() < deadline, "worker b never ran a trial:\n" + log_b.read_text()[-4000:]
            assert wb.poll() is None, "worker b exited before it could be killed:\n" + log_b.read_text()[-4000:]
            assert wa.poll() is None or wa.returncode == 0, log_a.read_text()[-4000:]
            time.sleep(0.2)
            try:
                trials = load(postgres_url, name).get_trials(deepcopy=False)
            except KeyError:
                continue  # the study is not created yet
            done = [t for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs]
            b_done = [t for t in done if t.user_attrs.get("worker") == idb]
            b_running = [t for t in trials if t.state == S.RUNNING and t.user_attrs.get("worker") == idb
                         and t.datetime_start is not None
                         and time.time() - t.datetime_start.timestamp() > 0.5]  # inside the build
            if b_running and (b_done or len(done) >= BUDGET - 3):
                os.kill(wb.pid, signal.SIGKILL)
                wb.wait(10)
                killed = [t.number for t in b_running]
        # --- the other worker finishes the budget alone ----------------------------------------------
        assert wait_exit(wa, log_a, 600) == 0, log_a.read_text()[-4000:]
    finally:
        for p in (wa, wb):
            if p.poll() is None:
                p.kill()
                p.wait(10)

    study = load(postgres_url, name)
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    # consistent: nothing left RUNNING, the killed trial failed (its process is gone) and was retried
    assert not [t.number for t in trials if t.state == S.RUNNING]
    for number in killed:
        assert by_number[number].state == S.FAIL
        assert "died" in by_number[number].user_attrs["failure"]  # the reason is recorded
        retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and retries[0].state == S.COMPLETE, [t.state for t in retries]
        assert retries[0].user_attrs["worker"] == ida
    # the budget, exactly: each assignment built once, by one worker, in that worker's run dir
    built = [t for t in trials if t.state == S.COMPLETE and "duplicate_of" not in t.user_attrs]
    assert len(built) == BUDGET, [(t.number, t.state.name, t.user_attrs.get("duplicate_of")) for t in trials]
    digests = [t.user_attrs["digest"] for t in built]
    assert len(set(digests)) == len(digests), digests
    workers = {t.user_attrs["worker"] for t in built}
    assert workers == {ida, idb}, f"both workers should have built trials: {workers}"
    for t in built:
        run_dir = run_a if t.user_attrs["worker"] == ida else run_b
        art = Path(t.user_attrs["artifact"])
        assert art == (run_dir / "trials" / t.user_attrs["digest"] / "model.onnx").resolve()
        assert art.is_file() and (art.parent / "metrics.json").is_file()
        assert json.loads((art.parent / "metrics.json").read_text())["digest"] == t.user_attrs["digest"]
    for t in trials:  # duplicates reuse an existing build
        if t.state == S.COMPLETE and "duplicate_of" in t.user_attrs:
            assert by_number[t.user_attrs["duplicate_of"]].user_attrs["digest"] == t.user_attrs["digest"]
    # the killed worker left no half-written artifact under a final name
    for folder in (run_a / "trials", run_b / "trials"):
        for onnx_file in folder.glob("*/model.onnx"):
            onnx.checker.check_model(str(onnx_file))
    # the sensitivity table was computed once (by the owner) and shared through the storage
    assert study.user_attrs["sweep_owner"] in (ida, idb)
    from mpq.files import read_sealed_json

    table_a = read_sealed_json(run_a / "sensitivity.json")  # sealed: its digest checks out
    table_b = read_sealed_json(run_b / "sensitivity.json")
    assert table_a == table_b == json.loads(study.user_attrs["sensitivity"])
    # the run dirs record the shared storage (its password redacted), so report/dashboard on either find
    # the study, with the password from --storage, YOLO_MPQ_STORAGE, PGPASSWORD or ~/.pgpass
    import yaml

    from search.storage import redact

    for run_dir in (run_a, run_b):
        assert yaml.safe_load((run_dir / "spec.yaml").read_text())["search"]["storage"] == redact(postgres_url)

    # --- a restart joins the finished study, resumes, and has nothing left to do ---------------------
    log_c = tmp_path / "c.log"
    wc = start_worker(spec, postgres_url, run_b, log_c)
    assert wait_exit(wc, log_c, 300) == 0, log_c.read_text()[-4000:]
    after = load(postgres_url, name).get_trials(deepcopy=False)
    assert len(after) == len(trials) and not [t for t in after if t.state == S.RUNNING]
