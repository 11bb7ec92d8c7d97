"""``search dashboard``: where the storage comes from, and clear errors for bad input."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from search.cli import main
from search.commands.dashboard import resolve_target
from search.storage import redact


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["dashboard", *argv])
    cap = capsys.readouterr()
    return rc, " ".join((cap.out + cap.err).split())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_dir_storage_sqlite_default_and_recorded_postgres(tmp_path):
    run = tmp_path / "runs" / "s1"
    run.mkdir(parents=True)
    (run / "study.db").write_bytes(b"")
    (run / "spec.yaml").write_text("name: s1\nsearch:\n  storage: sqlite:////elsewhere/old.db\n")
    target = resolve_target(run, None, None)
    # a recorded SQLite path may be stale (run dir copied): the run dir's own study.db is used
    assert target.storage == f"sqlite:///{(run / 'study.db').resolve()}" and target.study_name == "s1"
    (run / "spec.yaml").write_text("name: s1\nsearch:\n  storage: postgresql://u:pw@db.example:5432/mpq\n")
    target = resolve_target(run, None, None)
    assert target.storage == "postgresql://u:pw@db.example:5432/mpq" and target.study_name == "s1"
    # --storage wins; the study name still comes from the run dir
    target = resolve_target(run, "postgresql://other/db", None)
    assert target.storage == "postgresql://other/db" and target.study_name == "s1"


def test_spec_file_gives_run_dir_and_name(tmp_path, monkeypatch):
    spec = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "study.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # the demo spec's runs dir is ./runs
    target = resolve_target(None, None, spec)
    assert target.study_name == "demo" and target.storage == f"sqlite:///{(run / 'study.db').resolve()}"


def test_redact_hides_password():
    assert redact("postgresql://user:s3cret@127.0.0.1:5432/db") == "postgresql://user:***@127.0.0.1:5432/db"
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert redact("postgresql://user:p@ss:w/rd@db.example:5432/db") == "postgresql://user:***@db.example:5432/db"
    assert redact("postgresql://:s3cret@host/db") == "postgresql://:***@host/db"
    assert redact("postgresql://user@host/db?sslmode=require&password=s3cret") == \
        "postgresql://user@host/db?sslmode=require&password=***"
    assert redact("postgresql://user@host/db") == "postgresql://user@host/db"


def test_missing_run_dir_is_a_clear_error(capsys, tmp_path):
    rc, msg = _run(capsys, str(tmp_path / "nope"))
    assert rc == 2 and "run directory" in msg and "not found" in msg and "--storage URL" in msg


def test_run_dir_without_study_db(capsys, tmp_path):
    rc, msg = _run(capsys, str(tmp_path))
    assert rc == 2 and "holds no study.db" in msg


def test_bad_storage_urls(capsys, tmp_path):
    rc, msg = _run(capsys, "--storage", "study.db")
    assert rc == 2 and "not a database URL" in msg and "sqlite:///" in msg
    rc, msg = _run(capsys, "--storage", f"sqlite:///{tmp_path}/missing.db")
    assert rc == 2 and "no such SQLite file" in msg and "missing.db" in msg


def test_unreachable_postgres_names_url_without_password(capsys):
    url = f"postgresql://someone:s3cret@127.0.0.1:{_free_port()}/nodb"
    rc, msg = _run(capsys, "--storage", url)
    assert rc == 2 and "cannot open storage" in msg and "127.0.0.1" in msg
    assert "s3cret" not in msg


def test_unknown_study_and_port_in_use(capsys, tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/two.db"
    optuna.create_study(storage=url, study_name="alpha")
    optuna.create_study(storage=url, study_name="beta")
    rc, msg = _run(capsys, "--storage", url, "--study", "gamma")
    assert rc == 2 and "no study named 'gamma'" in msg and "alpha, beta" in msg
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, msg = _run(capsys, "--storage", url, "--study", "alpha", "--port", str(port))
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in msg and "--port" in msg


def test_empty_sqlite_file_has_no_study(capsys, tmp_path):
    db = tmp_path / "empty.db"
    import sqlite3

    sqlite3.connect(db).close()
    rc, msg = _run(capsys, "--storage", f"sqlite:///{db}")
    assert rc == 2 and "holds no Optuna study yet" in msg


def test_help_mentions_storage_and_port(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dashboard", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--storage" in out and "--port" in out and "127.0.0.1" in out
