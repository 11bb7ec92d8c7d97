"""Issue 14, hardening: ``search validate`` and the start of ``search run`` check the data's
contents (a corrupt image, a broken annotation, an empty calibration list), naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from search.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_spec(tmp_path, demo_spec):
    """A copy of the demo's evaluation data and calibration list that a test can damage."""
    ds = demo_spec.dataset
    images = tmp_path / "images"
    images.mkdir()
    anns = json.loads(ds.annotations.read_text())
    keep = sorted(im["id"] for im in anns["images"])[:12]
    anns["images"] = [im for im in anns["images"] if im["id"] in keep]
    anns["annotations"] = [a for a in anns["annotations"] if a["image_id"] in keep]
    for im in anns["images"]:
        shutil.copy(ds.images / im["file_name"], images / im["file_name"])
    (tmp_path / "instances.json").write_text(json.dumps(anns))
    calib = [p for p in demo_spec.calibration.source.read_text().splitlines() if p.strip()][:4]
    (tmp_path / "calib.txt").write_text("\n".join(str(demo_spec.calibration.source.parent / p) for p in calib))
    data = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    data.update(name="data", runs_dir=str(tmp_path / "runs"))
    data["dataset"] = {"images": str(images), "annotations": str(tmp_path / "instances.json")}
    data["calibration"] = {"source": str(tmp_path / "calib.txt")}
    spec = tmp_path / "data.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec, images, anns


@pytest.fixture
def wide(monkeypatch):
    from search.console import console, console_err

    monkeypatch.setattr(console, "width", 1000)
    monkeypatch.setattr(console_err, "width", 1000)


def test_intact_data_is_valid(data_spec, capsys, wide):
    spec, _, _ = data_spec
    assert main(["validate", str(spec)]) == 0, capsys.readouterr()


def test_a_corrupt_image_is_found_before_any_work(data_spec, capsys, wide):
    spec, images, anns = data_spec
    bad = images / anns["images"][5]["file_name"]
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["validate", str(spec)]) == 1
    out = capsys.readouterr().out
    assert str(bad) in out and "cannot be decoded" in out
    assert main(["run", "--study", str(spec), "--budget", "1", "--no-report"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(bad) in err
    assert not (spec.parent / "runs" / "data" / "sensitivity.json").exists()  # no sweep ran


def test_broken_annotations_and_an_empty_calibration_list(data_spec, capsys, wide):
    spec, _, anns = data_spec
    anns["annotations"][0]["category_id"] = 999
    anns["annotations"][1]["image_id"] = 123456
    del anns["annotations"][2]["bbox"]
    (spec.parent / "instances.json").write_text(json.dumps(anns))
    (spec.parent / "calib.txt").write_text("# nothing\n")
    assert main(["validate", str(spec)]) == 1
    out = capsys.readouterr().out
    for text in ("category 999", "image id 123456", "'bbox'", "calibration list is empty"):
        assert text in out, (text, out)
    (spec.parent / "instances.json").write_text('{"images": [')
    assert main(["validate", str(spec)]) == 1
    assert "not valid JSON" in capsys.readouterr().out
