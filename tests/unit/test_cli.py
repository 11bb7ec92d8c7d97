from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ultralytics", "brevitas", "modelopt", "tensorrt", "onnxruntime", "optuna", "cv2")


def _heavy_after(code: str) -> None:
    check = (f"{code}; import sys; heavy = [m for m in {HEAVY!r} if m in sys.modules]; print(heavy); "
             "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_import_pulls_no_heavy_frameworks():
    _heavy_after("from search.cli import build_parser; build_parser()")


def test_mpq_and_its_modules_import_without_torch():
    _heavy_after("import importlib, pkgutil, mpq; "
                 "[importlib.import_module(f'mpq.{m.name}') for m in pkgutil.iter_modules(mpq.__path__)]")


def test_backend_declarations_and_the_spec_import_without_frameworks():
    _heavy_after("from quantizers import registry; registry.backends(); import search.spec, evaluators")


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
