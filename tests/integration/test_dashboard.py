"""``search dashboard`` against the real optuna-dashboard server, over HTTP and in Chromium.

The studies are made with Optuna directly (shaped like a search run: two objectives, the
user attributes a trial carries), so these tests exercise the dashboard, not the search.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from dashboard_helpers import check_study_api, populate_study, start_dashboard

STUDY = "dash-demo"


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory):
    """A run directory as `search run` leaves it: spec.yaml (the study name) and study.db."""
    run_dir = tmp_path_factory.mktemp("runs") / STUDY
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_text(f"name: {STUDY}\nsearch:\n  budget: 7\n  storage: null\n")
    stored = populate_study(f"sqlite:///{run_dir / 'study.db'}", STUDY)
    return run_dir, stored


@pytest.fixture(scope="module")
def sqlite_dashboard(sqlite_run):
    run_dir, stored = sqlite_run
    dash = start_dashboard([str(run_dir)])
    yield dash, stored
    assert dash.stop() == 0, "\n".join(dash.lines)


def test_dashboard_on_run_dir_serves_study_trials_and_user_attrs(sqlite_dashboard, sqlite_run):
    dash, stored = sqlite_dashboard
    run_dir, _ = sqlite_run
    assert dash.base.startswith("http://127.0.0.1:")  # loopback by default
    assert dash.study_url == f"{dash.base}/dashboard/studies/{stored['study_id']}"
    assert any(str(run_dir / "study.db") in line for line in dash.lines)
    check_study_api(dash.base, STUDY, stored)


def _png_stats(path: Path) -> tuple[tuple[int, int], float, int]:
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")
    arr = np.asarray(img)
    colors = len(np.unique(arr.reshape(-1, 3), axis=0))
    return img.size, float(arr.astype(np.float32).std()), colors


def _chromium(chromium: str, tmp_path: Path, url: str, *action: str) -> subprocess.CompletedProcess[str]:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--window-size=1400,1000", "--virtual-time-budget=20000", *action, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_dashboard_study_page_renders_pareto_front_in_chromium(sqlite_dashboard, chromium, tmp_path):
    dash, _ = sqlite_dashboard
    # the rendered page (after the app fetched the study) names the study and draws the Pareto front
    dom = _chromium(chromium, tmp_path, dash.study_url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert STUDY in dom.stdout
    assert "Pareto Front" in dom.stdout
    assert "map50_95" in dom.stdout and "latency_ms" in dom.stdout  # objective names on the axes
    shot = tmp_path / "study.png"
    res = _chromium(chromium, tmp_path, dash.study_url, f"--screenshot={shot}")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    size, std, colors = _png_stats(shot)
    assert size == (1400, 1000)
    assert std > 20 and colors > 100, f"screenshot looks blank: std {std:.1f}, {colors} colours"


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["storage", "run_dir"])
def test_dashboard_on_postgres_study(postgres_url, tmp_path, how):
    stored = populate_study(postgres_url, STUDY)
    populate_study(postgres_url, "another-study", n_complete=2)  # several studies in one storage
    if how == "storage":
        args = ["--storage", postgres_url, "--study", STUDY]
    else:  # a worker's run dir: spec.yaml records the PostgreSQL storage, there is no study.db
        run_dir = tmp_path / "runs" / STUDY
        run_dir.mkdir(parents=True)
        (run_dir / "spec.yaml").write_text(f"name: {STUDY}\nsearch:\n  storage: {postgres_url}\n")
        args = [str(run_dir)]
    dash = start_dashboard(args)
    try:
        assert dash.study_url == f"{dash.base}/dashboard/studies/{stored['study_id']}"
        password = postgres_url.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
        assert password and not any(password + "@" in line for line in dash.lines), "password printed"
        check_study_api(dash.base, STUDY, stored)
    finally:
        assert dash.stop() == 0, "\n".join(dash.lines)
    assert "dashboard stopped" in "\n".join(dash.lines)
