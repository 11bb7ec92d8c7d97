"""Helpers for the dashboard tests: a real Optuna study shaped like a search run, and a
``search dashboard`` server process whose address is read from what it prints."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
METRIC_NAMES = ["map50_95", "latency_ms"]
LAYERS = [f"model.{i}.conv" for i in range(12)]
N_LOW = [0, 3, 6, 9, 3, 6]


def populate_study(storage: str, name: str, n_complete: int = 6) -> dict[str, Any]:
    """Create a 2-objective study with COMPLETE trials carrying a search run's user attrs.

    Returns what was stored: ``{"study_id", "complete": {number: user_attrs}, "failed":
    {number: user_attrs}, "pareto": set of numbers}``.
    """
    import optuna
    from optuna.distributions import IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRIC_NAMES)
    complete: dict[int, dict[str, Any]] = {}
    for i in range(n_complete):
        # fixed parameters, so trials 1 and 5 are dominated (by 4 and 2): a proper Pareto front
        study.enqueue_trial({"n_low": N_LOW[i % len(N_LOW)]})
        trial = study.ask({"n_low": IntDistribution(0, len(LAYERS))})
        k = int(trial.params["n_low"])
        assignment = {lay: ("W4A8" if j < k else "W8A16") for j, lay in enumerate(LAYERS)}
        map50_95 = round(0.62 - 0.02 * k - 0.01 * (i % 3), 4)
        latency = round(12.0 - 0.4 * k + 0.3 * (i % 2), 3)
        attrs = {
            "digest": f"{i:02d}" + "ab" * 7,
            "assignment": assignment,
            "summary": {"label": f"{k} x W4A8", "w4_weight_share": round(k / len(LAYERS), 3),
                        "counts": {"W4A8": k, "W8A16": len(LAYERS) - k}},
            "metrics": {"map50_95": map50_95, "map50": round(map50_95 + 0.2, 4), "latency_ms": latency,
                        "weight_bytes": 100_000 - 3_000 * k, "bops": 2.0e9 - 1.0e8 * k,
                        "provider": "CPUExecutionProvider"},
            "artifact": f"/runs/{name}/trials/{i:02d}{'ab' * 7}/model.onnx",
            "timings": {"materialize_s": 1.5, "export_s": 0.5, "eval_s": 3.0},
            "worker": f"host-a:{1000 + i}",
        }
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [map50_95, latency])
        complete[trial.number] = attrs
    trial = study.ask({"n_low": IntDistribution(0, len(LAYERS))})
    failed = {trial.number: {"failure": "export failed: onnx checker rejected the graph", "worker": "host-b:7"}}
    for key, value in failed[trial.number].items():
        trial.set_user_attr(key, value)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return {"study_id": study._study_id, "complete": complete, "failed": failed,
            "pareto": {t.number for t in study.best_trials}}


@dataclass
class DashboardProcess:
    """A running ``search dashboard`` subprocess and what it printed."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)  # appended by a reader thread
    reader: threading.Thread | None = None
    base: str = ""
    study_url: str = ""

    def stop(self, timeout: float = 20.0) -> int:
        """Ctrl-C (SIGINT) the server; return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError("search dashboard did not stop on Ctrl-C") from None
        if self.reader is not None:
            self.reader.join(10)
        return int(self.proc.returncode)


def start_dashboard(args: list[str], cwd: Path | None = None, timeout: float = 90.0) -> DashboardProcess:
    """Start ``python -m search dashboard ARGS --port 0`` and wait for its study URL."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "search", "dashboard", *args, "--port", "0"],
                            cwd=str(cwd or REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out: queue.Queue[str | None] = queue.Queue()
    dash = DashboardProcess(proc)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            dash.lines.append(line.rstrip("\n"))
            out.put(line.rstrip("\n"))
        out.put(None)

    dash.reader = threading.Thread(target=pump, daemon=True)
    dash.reader.start()
    while True:
        try:
            line = out.get(timeout=timeout)
        except queue.Empty:
            dash.stop()
            raise AssertionError("search dashboard printed no study URL in time:\n" + "\n".join(dash.lines)) from None
        if line is None:
            proc.wait(10)
            raise AssertionError(f"search dashboard exited ({proc.returncode}):\n" + "\n".join(dash.lines))
        m = re.search(r"listening on (http://\S+)/dashboard$", line)
        if m:
            dash.base = m.group(1)
        m = re.search(r"study '[^']+': (http://\S+)$", line)
        if m:
            dash.study_url = m.group(1)
        if line.startswith("Ctrl-C to stop"):
            return dash


def get_json(url: str) -> Any:
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200, (url, resp.status)
        return json.loads(resp.read())


def check_study_api(base: str, name: str, stored: dict[str, Any]) -> dict[str, Any]:
    """Assert the dashboard's HTTP API returns the study, its trials and their user attrs."""
    import json

    summaries = get_json(f"{base}/api/studies")["study_summaries"]
    mine = [s for s in summaries if s["study_name"] == name]
    assert len(mine) == 1, summaries
    assert mine[0]["directions"] == ["maximize", "minimize"]
    study_id = mine[0]["study_id"]
    detail = get_json(f"{base}/api/studies/{study_id}")
    assert detail["name"] == name
    # multi-objective with names: the frontend draws the Pareto front from these
    assert detail["directions"] == ["maximize", "minimize"]
    assert detail["objective_names"] == METRIC_NAMES
    trials = {t["number"]: t for t in detail["trials"]}
    assert set(trials) == set(stored["complete"]) | set(stored["failed"])
    for number, attrs in stored["complete"].items():
        t = trials[number]
        assert t["state"] == "Complete"
        got = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert set(got) == set(attrs)
        assert got["digest"] == attrs["digest"] and got["artifact"] == attrs["artifact"]
        assert json.loads(got["metrics"]) == attrs["metrics"]
        assert json.loads(got["summary"]) == attrs["summary"]
        assert json.loads(got["assignment"]) == attrs["assignment"]
        assert t["values"] == [attrs["metrics"]["map50_95"], attrs["metrics"]["latency_ms"]]
    for number, attrs in stored["failed"].items():
        t = trials[number]
        assert t["state"] == "Fail"
        assert {a["key"]: a["value"] for a in t["user_attrs"]}["failure"] == attrs["failure"]
    # the Pareto front ("best trials" of a multi-objective study) is Optuna's
    assert {t["number"] for t in detail["best_trials"]} == stored["pareto"]
    assert 0 < len(stored["pareto"]) < len(stored["complete"])
    return detail
