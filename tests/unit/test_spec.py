from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mpq.assignment import Precision
from search.spec import SpecError, load_spec, validate_spec_file

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "m.pt").write_bytes(b"x")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "ann.json").write_text("{}")
    (tmp_path / "calib.txt").write_text("a.jpg\n")
    return tmp_path


def _minimal() -> dict:
    return {"name": "t", "model": "m.pt", "dataset": {"images": "imgs", "annotations": "ann.json"},
            "calibration": {"source": "calib.txt"}}


def test_minimal_spec_resolves_relative_paths_and_has_defaults(files: Path):
    spec = load_spec(_write(files, _minimal()))
    assert spec.model == files / "m.pt"
    assert spec.dataset.images == files / "imgs"
    assert spec.backend.name == "brevitas" and spec.backend.weight_scale == "mse"
    assert spec.candidates == sorted([Precision(4, 16), Precision(4, 8), Precision(8, 16), Precision(8, 8)])
    assert spec.search.budget == 50 and spec.search.objectives == ["map", "latency"]
    assert spec.run_dir() == Path.cwd() / "runs" / "t"


def test_every_problem_is_reported_at_once(files: Path):
    data = _minimal()
    data["imgsz"] = 100
    data["searhc"] = {"budget": 5}
    data["dataset"]["max_imagse"] = 3
    data["backend"] = {"name": "brevitas", "gtpq": True}
    data["candidates"] = ["W3A8"]
    result = validate_spec_file(_write(files, data))
    text = "\n".join(result.problems)
    assert "imgsz: must be a multiple of 32" in text
    assert "searhc: unknown key; did you mean 'search'?" in text
    assert "dataset.max_imagse: unknown key; did you mean 'max_images'?" in text
    assert "did you mean 'gptq'?" in text
    assert "W3A8" in text or "weight bits" in text
    assert len(result.problems) == 5


def test_missing_files_are_named(tmp_path: Path):
    result = validate_spec_file(_write(tmp_path, _minimal()))
    text = "\n".join(result.problems)
    for what in ("model: file not found", "dataset.images: folder not found", "dataset.annotations: file not found",
                 "calibration.source"):
        assert what in text
    with pytest.raises(SpecError) as exc:
        load_spec(tmp_path / "study.yaml")
    assert str(tmp_path / "m.pt") in str(exc.value)


def test_env_vars_and_backend_shorthand(files: Path, monkeypatch: pytest.MonkeyPatch):
    data = _minimal()
    data["model"] = "${MY_MODEL_DIR:-.}/m.pt"
    data["backend"] = "modelopt-onnx"
    spec = load_spec(_write(files, data))
    assert spec.model == files / "m.pt"
    assert spec.backend.name == "modelopt-onnx" and spec.backend.calibration == "entropy"
    monkeypatch.setenv("MY_MODEL_DIR", str(files / "elsewhere"))
    with pytest.raises(SpecError, match="elsewhere"):
        load_spec(files / "study.yaml")


def test_bad_yaml_and_overrides(files: Path):
    p = files / "bad.yaml"
    p.write_text("name: [unclosed\n")
    assert "not valid YAML" in validate_spec_file(p).problems[0]
    spec = load_spec(_write(files, _minimal()), **{"search.budget": 7, "imgsz": 320})
    assert spec.search.budget == 7 and spec.imgsz == 320


def test_bundled_specs_parse():
    # keys and values only: the COCO files are the user's to bring
    for name in ("demo.yaml", "yolov10m_coco.yaml"):
        result = validate_spec_file(REPO / "studies" / name, check_files=False)
        assert result.problems == [], name
    spec = validate_spec_file(REPO / "studies" / "yolov10m_coco.yaml", check_files=False).spec
    assert spec is not None and spec.imgsz == 640 and spec.dataset.max_images == 100


def test_validate_command_exit_codes(files: Path):
    data = _minimal()
    data["searhc"] = 1
    bad = _write(files, data, "bad.yaml")
    good = _write(files, _minimal(), "good.yaml")
    run = [sys.executable, "-m", "search", "validate"]
    out = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "did you mean 'search'" in out.stdout
    out = subprocess.run([*run, str(good), "--no-files"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
