"""Issue 14, hardening: the dashboard is read-only by default; writes and a non-loopback host
need an explicit flag and a token (real optuna-dashboard server over HTTP)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from dashboard_helpers import populate_study, start_dashboard

from search.cli import main

STUDY = "guarded"
TOKEN = "s3cret-token-0123456789"


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / STUDY
    run.mkdir()
    (run / "spec.yaml").write_text(f"name: {STUDY}\n")
    stored = populate_study(f"sqlite:///{run / 'study.db'}", STUDY, n_complete=2)
    return run, stored["study_id"]


def test_the_default_dashboard_cannot_delete_a_study(run_dir):
    run, sid = run_dir
    dash = start_dashboard([str(run)])
    try:
        assert _request(f"{dash.base}/api/studies/{sid}", "DELETE")[0] == 403
        assert _request(f"{dash.base}/api/studies/{sid}/rename", "POST")[0] == 403
        assert _request(f"{dash.base}/api/studies")[0] == 200  # reading still works
    finally:
        assert dash.stop() == 0
    import optuna

    assert optuna.load_study(study_name=STUDY, storage=f"sqlite:///{run / 'study.db'}")  # still there


@pytest.mark.parametrize("argv,needs", [(["--host", "0.0.0.0"], "--token"), (["--allow-writes"], "--token"),
                                        (["--allow-writes", "--token", "short"], "12 characters")])
def test_writes_and_other_hosts_need_a_token(run_dir, capsys, monkeypatch, argv, needs):
    monkeypatch.delenv("YOLO_MPQ_DASHBOARD_TOKEN", raising=False)
    run, _ = run_dir
    assert main(["dashboard", str(run), "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needs in err


def test_with_a_token_and_allow_writes_only_the_token_holder_deletes(run_dir):
    run, sid = run_dir
    dash = start_dashboard([str(run), "--allow-writes", "--token", TOKEN])
    try:
        assert _request(f"{dash.base}/api/studies")[0] == 401
        assert _request(f"{dash.base}/api/studies/{sid}", "DELETE")[0] == 401
        status, headers = _request(f"{dash.base}/api/studies?token={TOKEN}")
        assert status == 200 and "HttpOnly" in headers.get("Set-Cookie", "")
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert _request(f"{dash.base}/api/studies", headers={"Cookie": cookie})[0] == 200
        assert _request(f"{dash.base}/api/studies/{sid}", "DELETE", {"Authorization": "Bearer wrong"})[0] == 401
        assert _request(f"{dash.base}/api/studies/{sid}", "DELETE", {"Authorization": f"Bearer {TOKEN}"})[0] == 204
    finally:
        assert dash.stop() == 0
    assert not any(TOKEN in line for line in dash.lines)  # the token is not printed
