from __future__ import annotations

import subprocess
import sys


def test_cli_import_pulls_no_heavy_frameworks():
    code = ("import sys; from search.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'ultralytics', 'brevitas', 'modelopt', 'tensorrt', 'onnxruntime', "
            "'optuna', 'cv2') if m in sys.modules]; print(heavy); assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_help_lists_commands_and_unknown_command_suggests():
    out = subprocess.run([sys.executable, "-m", "search", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("validate", "inspect", "schema"):
        assert cmd in out.stdout
    out = subprocess.run([sys.executable, "-m", "search", "inspcet"], capture_output=True, text=True)
    assert out.returncode == 2 and "Did you mean 'inspect'" in out.stderr


def test_schema_command_prints_json_schema():
    import json

    out = subprocess.run([sys.executable, "-m", "search", "schema"], capture_output=True, text=True)
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert "dataset" in schema["properties"] and schema.get("additionalProperties") is False
