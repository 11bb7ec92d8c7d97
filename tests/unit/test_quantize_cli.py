"""``search quantize`` argument handling (errors before any model is built)."""

from __future__ import annotations

import pytest

from mpq.errors import UserError
from search.cli import main
from search.commands.quantize import parse_overrides


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["backend.gptq=true", "imgsz=256", "name=x"]) == {
        "backend.gptq": True, "imgsz": 256, "name": "x"}
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_overrides(["backend.gptq"])


@pytest.mark.parametrize("argv, message", [
    (["quantize"], "say what to build"),
    (["quantize", "--weights", "16", "--acts", "16"], "float model"),
    (["quantize", "--weights", "4", "--assignment", "a.json"], "not both"),
    (["quantize", "--assignment", "does-not-exist.json"], "file not found"),
    (["quantize", "--weights", "4", "--set", "backend.weight_scale=mse2"], "weight_scale"),
])
def test_bad_requests_are_user_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_assignment_file_names_the_layer(tmp_path, capsys):
    bad = tmp_path / "a.json"
    bad.write_text('{"layers": {"model.0.conv": "W3A8"}}')
    assert main(["quantize", "--assignment", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "a.json" in err and "model.0.conv" in err
