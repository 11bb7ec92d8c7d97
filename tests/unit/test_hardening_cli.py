"""Issue 14, hardening: command-line values are checked by the spec's own validators, and
storage URLs never show their password (one line each, no traceback)."""

from __future__ import annotations

import pytest

from search.cli import main


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_budget_below_one_is_refused(capsys, value):
    line = _refused(capsys, "run", "--budget", value)
    assert "--budget" in line and "greater than 0" in line


def test_inspect_imgsz_not_a_multiple_of_32_is_refused_like_the_spec(capsys):
    line = _refused(capsys, "inspect", "--imgsz", "200")
    assert "--imgsz" in line and "multiple of 32" in line and "192" in line
    from search.spec import check_value

    assert check_value("imgsz", "224") == 224
    with pytest.raises(ValueError, match="greater than or equal to 32"):
        check_value("imgsz", "0")


def test_workers_below_one_is_refused(capsys):
    assert "--workers" in _refused(capsys, "run", "--workers", "0")


def test_run_settings_refuse_a_zero_budget(demo_spec, tmp_path):
    from mpq.errors import UserError
    from search.study import RunSettings

    with pytest.raises(UserError, match="at least 1"):
        RunSettings.from_spec(demo_spec, tmp_path, budget=0)
    assert RunSettings.from_spec(demo_spec, tmp_path, budget=None).budget == demo_spec.search.budget


# -- secrets ------------------------------------------------------------------------------------
SECRET_URLS = [
    ("postgresql://mpq:p@ss@W0rd@dbhost:5432/mpq", "p@ss@W0rd"),
    ("postgresql://mpq@dbhost/mpq?sslmode=require&password=Top:Secret", "Top:Secret"),
    ("postgresql://mpq:a/b?c#d@dbhost/mpq", "a/b?c#d"),
]


@pytest.mark.parametrize("url,secret", SECRET_URLS)
def test_redact_hides_every_character_of_the_password(url, secret):
    from search.storage import redact, scrub

    shown = redact(url)
    assert "***" in shown
    for piece in (secret, *secret.split("@"), *secret.split(":")):
        if len(piece) > 2:
            assert piece not in shown.replace("dbhost", "").replace("mpq", ""), (url, shown)
    assert secret not in scrub(f"connection to {url} failed: bad password {secret}", url)


def test_connectable_fills_a_redacted_url_from_the_environment(monkeypatch):
    from search.storage import STORAGE_ENV, connectable, redact

    real = "postgresql://mpq:p@ss@dbhost/mpq"
    assert connectable(real) == "postgresql://mpq:p%40ss@dbhost/mpq"  # '@' in a password reaches the server
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert connectable(redact(real)) == "postgresql://mpq@dbhost/mpq"  # libpq then reads PGPASSWORD/~/.pgpass
    monkeypatch.setenv(STORAGE_ENV, real)
    assert connectable(redact(real)) == "postgresql://mpq:p%40ss@dbhost/mpq"
    assert connectable("postgresql://mpq@h/db?password=***&sslmode=require") == "postgresql://mpq@h/db?sslmode=require"


def test_run_files_and_study_attributes_record_the_redacted_url(tmp_path):
    from search.commands import DEFAULT_STUDY
    from search.spec import load_spec

    spec = load_spec(DEFAULT_STUDY, **{"search.storage": SECRET_URLS[0][0]})
    assert spec.search.storage == SECRET_URLS[0][0]  # the run itself connects with the real one
    assert "W0rd" not in spec.to_yaml() and "***" in spec.to_yaml()
    assert "W0rd" not in str(spec.record())


@pytest.mark.parametrize("url,secret", SECRET_URLS[:2])
def test_report_storage_errors_do_not_print_the_password(capsys, tmp_path, url, secret):
    (tmp_path / "spec.yaml").write_text(
        "name: demo\nmodel: demo://yolov10n-shapes.pt\n"
        "dataset: {images: demo://images/val, annotations: demo://annotations/instances_val.json}\n"
        "calibration: {source: demo://calib.txt}\n")
    for bad in (url.replace("dbhost", "127.0.0.1:1"), url.replace("postgresql", "postgresq")):
        assert main(["report", str(tmp_path), "--storage", bad]) != 0
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err
        assert secret not in err and "W0rd" not in err and "Secret" not in err, err
