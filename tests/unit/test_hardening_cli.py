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
