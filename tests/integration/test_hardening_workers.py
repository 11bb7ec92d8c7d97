"""Issue 14, hardening: a killed worker's trial fails saying so and its retry runs; a dead sweep
owner on this host is replaced at once; workers joining one study sample with their own seeds
(real Optuna SQLite storages, real processes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import IntDistribution

from search.storage import fail_stale_trials, open_storage

SPACE = {"k": IntDistribution(0, 1000)}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _study(tmp_path, name="s"):
    return optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'study.db'}"), study_name=name,
                               directions=["maximize"])


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_killed_workers_trial_fails_with_the_reason_and_its_retry_runs(tmp_path):
    study = _study(tmp_path)
    trial = study.ask(SPACE)
    worker = f"{socket.gethostname()}:{_dead_pid()}"
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("policy", "top-3 float")
    assert fail_stale_trials(study) == [trial.number]  # at once: no heartbeat grace for a dead local PID
    failed = study.trials[trial.number]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "died" in failed.user_attrs["failure"] and worker in failed.user_attrs["failure"]
    retry = study.trials[-1]
    assert retry.state == optuna.trial.TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number
    study.optimize(lambda t: float(t.suggest_int("k", 0, 1000)), n_trials=1)
    done = study.trials[retry.number]
    assert done.state == optuna.trial.TrialState.COMPLETE and done.params == failed.params
    assert done.user_attrs["policy"] == "top-3 float"
    # a retry that dies is not retried again (no endless loop on a configuration that kills workers)
    again = study.ask(SPACE)
    again.set_user_attr("worker", worker)
    again.set_user_attr("retry_of", 0)
    assert fail_stale_trials(study) == [again.number]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_retry_runs_before_the_configurations_already_waiting(tmp_path):
    """The policy configurations wait in the queue; a retry behind them would never run within the budget."""
    study = _study(tmp_path)
    for k in (1, 2, 3):
        study.enqueue_trial({"k": k}, user_attrs={"policy": f"policy-{k}"})
    study.optimize(lambda t: float(t.suggest_int("k", 0, 1000)), n_trials=1)  # runs policy-1
    trial = study.ask(SPACE)  # policy-2, then its worker dies
    assert trial.params["k"] == 2
    trial.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    fail_stale_trials(study)
    study.optimize(lambda t: float(t.suggest_int("k", 0, 1000)), n_trials=3)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.params["k"] for t in done] == [1, 2, 3, done[-1].params["k"]]
    assert done[1].user_attrs["retry_of"] == trial.number and done[1].user_attrs["policy"] == "policy-2"
    assert done[2].user_attrs["policy"] == "policy-3" and done[2].user_attrs.get("retry_of") is None
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_silent_worker_on_another_host_fails_after_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_MPQ_HEARTBEAT_S", "1")
    monkeypatch.setenv("YOLO_MPQ_GRACE_S", "1")
    study = _study(tmp_path)
    trial = study.ask(SPACE)
    trial.set_user_attr("worker", "another-host:4242")
    study._storage.record_heartbeat(trial._trial_id)
    assert fail_stale_trials(study) == []  # still beating
    time.sleep(2.5)
    assert fail_stale_trials(study) == [trial.number]
    assert "no heartbeat" in study.trials[trial.number].user_attrs["failure"]


def test_a_dead_sweep_owner_on_this_host_is_replaced_at_once(tmp_path):
    from search.sweep_owner import SharedSweep, claim

    study = _study(tmp_path)
    claim(study, f"{socket.gethostname()}:{_dead_pid()}")  # heartbeat fresh: only the PID says it is gone
    messages: list[str] = []
    start = time.monotonic()
    assert SharedSweep(study, None, worker="me:1", log=messages.append)._wait() is None  # type: ignore[arg-type]
    assert time.monotonic() - start < 5 and "gone" in messages[-1]


@pytest.fixture(scope="module")
def runner_factory(tmp_path_factory, demo_spec):
    from search.pipeline import TrialPipeline
    from search.study import RunSettings, StudyRunner

    run_dir = tmp_path_factory.mktemp("seeds")
    pipeline = TrialPipeline.for_spec(demo_spec, run_dir=run_dir, progress=False)
    settings = RunSettings.from_spec(demo_spec, run_dir, sampler="random")

    def make(worker: str) -> StudyRunner:
        runner = StudyRunner(pipeline, settings, progress=False)
        runner.worker = worker
        return runner

    return make


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_workers_joining_one_sqlite_study_sample_with_their_own_seeds(runner_factory, monkeypatch):
    monkeypatch.delenv("YOLO_MPQ_WORKER_INDEX", raising=False)
    creator, created = runner_factory("host:100").open()
    assert created
    joined = [runner_factory(f"host:{pid}").open()[0] for pid in (101, 102)]
    proposals = [[s.ask(SPACE).params["k"] for _ in range(6)] for s in (creator, *joined)]
    assert proposals[0] != proposals[1] and proposals[1] != proposals[2] and proposals[0] != proposals[2]
    again = runner_factory("host:101").open()[0]  # the seed is derived, not random: reproducible per worker
    assert [again.ask(SPACE).params["k"] for _ in range(6)] == proposals[1]
