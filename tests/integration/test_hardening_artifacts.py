"""Issue 14, hardening: every artifact records its digest and size where it is written, and a
cached trial, float baseline or sweep table whose file does not match is rebuilt with a
one-line warning naming the file (real pipeline on the demo; one all-float trial)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mpq.assignment import Assignment
from mpq.files import file_record, record_mismatch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The pipeline of a tiny demo study, with one all-float trial built and the float baseline."""
    from search.pipeline import TrialPipeline
    from search.spec import load_spec

    tmp = tmp_path_factory.mktemp("artifacts")
    data = yaml.safe_load((REPO / "studies" / "demo.yaml").read_text())
    data.update(name="art", granularity="block", runs_dir=str(tmp / "runs"))
    data["dataset"]["max_images"] = 4
    data["calibration"].update(max_images=4, batch_size=4)
    data["latency"] = {"engine": "ort", "warmup": 0, "runs": 1}
    (tmp / "art.yaml").write_text(yaml.safe_dump(data))
    pipe = TrialPipeline.for_spec(load_spec(tmp / "art.yaml"), progress=False)
    pipe.run(Assignment())
    return pipe


def _warned(capsys, path: Path) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(lines) == 1 and str(path) in lines[0], err
    return lines[0]


def test_a_trial_records_its_artifact_and_a_changed_one_is_rebuilt(pipeline, capsys):
    out_dir = pipeline.resources.paths.trial(Assignment().digest())
    onnx_path = out_dir / "model.onnx"
    record = json.loads((out_dir / "metrics.json").read_text())["files"][0]
    assert record == file_record(onnx_path)
    assert pipeline.run(Assignment()).cached  # intact: reused
    onnx_path.write_bytes(onnx_path.read_bytes()[:-10])  # truncated
    capsys.readouterr()
    result = pipeline.run(Assignment())
    assert not result.cached and "bytes" in _warned(capsys, onnx_path)
    assert record_mismatch(onnx_path, json.loads((out_dir / "metrics.json").read_text())["files"][0]) is None


def test_a_trial_without_a_recorded_digest_is_not_reused(pipeline, capsys):
    out_dir = pipeline.resources.paths.trial(Assignment().digest())
    metrics = out_dir / "metrics.json"
    data = json.loads(metrics.read_text())
    data.pop("files")
    metrics.write_text(json.dumps(data))
    capsys.readouterr()
    assert pipeline.cached(Assignment(), out_dir) is None
    assert "no recorded digest" in _warned(capsys, out_dir / "model.onnx")
    metrics.write_text("{\"digest\": ")  # half-written
    assert pipeline.cached(Assignment(), out_dir) is None
    _warned(capsys, metrics)


def test_a_changed_float_model_is_exported_again(pipeline, capsys):
    from search.baseline import FloatBaseline

    path = pipeline.baseline.onnx()
    assert record_mismatch(path, json.loads((path.parent / "source.json").read_text())["file"]) is None
    original = path.read_bytes()
    path.write_bytes(original[:100] + b"\0" + original[101:])  # same size, other content
    capsys.readouterr()
    again = FloatBaseline(pipeline.resources, pipeline.evaluator).onnx()
    assert "SHA-256" in _warned(capsys, path)
    assert again.read_bytes() == original


def test_a_changed_sweep_table_is_computed_again(pipeline, capsys):
    from mpq.files import write_sealed_json
    from search.sensitivity import load_cached, sweep_candidates, sweep_key, table_path

    res = pipeline.resources
    metric = res.spec.sensitivity.metric
    path = table_path(res, metric)
    table = {"metric": metric, "key": sweep_key(res, metric, sweep_candidates(res)),
             "groups": [g.name for g in res.groups], "scores": {res.groups[0].name: {"W4A16": 0.5}}}
    write_sealed_json(path, table)
    assert load_cached(res) is not None
    path.write_text(path.read_text().replace("0.5", "0.9"))
    capsys.readouterr()
    assert load_cached(res) is None
    _warned(capsys, path)
    path.write_text(path.read_text()[:40])  # half-written
    assert load_cached(res) is None
    _warned(capsys, path)


def test_the_report_warns_about_a_listed_trial_whose_artifact_changed(pipeline, capsys):
    from search.report import TrialRow, _warn_changed_artifacts
    from search.results import TrialMetrics

    result = pipeline.run(Assignment())
    row = TrialRow(number=7, digest=result.digest, label="float", policy="", metrics=result.metrics,
                   summary={}, assignment={}, artifact=str(result.artifact), timings={})
    capsys.readouterr()
    _warn_changed_artifacts([row])
    assert "warning:" not in capsys.readouterr().err
    result.artifact.write_bytes(result.artifact.read_bytes()[:50])
    _warn_changed_artifacts([row])
    assert "trial 7" in _warned(capsys, result.artifact)
    assert isinstance(result.metrics, TrialMetrics)
