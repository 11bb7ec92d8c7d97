"""``search quantize`` end to end on the demo study (small subset to stay quick)."""

from __future__ import annotations

import json

from search.cli import main


def _small(tmp_path) -> list[str]:
    return ["--set", f"runs_dir={tmp_path}", "--set", "dataset.max_images=8", "--set", "calibration.max_images=4",
            "--set", "calibration.batch_size=4", "--set", "latency.runs=2", "--set", "latency.warmup=1"]


def test_quantize_uniform_builds_evaluates_and_reuses(tmp_path, capsys):
    out = tmp_path / "w8"
    args = ["quantize", "--weights", "8", "--acts", "8", "--out", str(out), *_small(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "float vs uniform W8A8" in text and "mAP50-95" in text and "Q / DQ / Clip" in text
    metrics = json.loads((out / "metrics.json").read_text())
    q, f = metrics["metrics"], metrics["float"]["metrics"]
    assert 0.0 <= q["map50_95"] <= 1.0 and f["map50_95"] > 0.0
    assert metrics["delta"]["map50_95"] == q["map50_95"] - f["map50_95"]
    assert q["weight_bytes"] < 0.3 * f["weight_bytes"]
    n = 82
    # the demo deploys to ort-cpu: every layer a QLinearConv unit (input Q shared per tensor, output Q,
    # weight and int32 bias DQs), no Clip; the backend's QCDQ export is lowered and removed
    counts = metrics["export"]["node_counts"]
    assert counts.get("Clip", 0) == 0 and counts["DequantizeLinear"] >= 4 * n - 10
    assert metrics["export"]["export_node_counts"] == {"QuantizeLinear": 2 * n, "DequantizeLinear": 3 * n + n,
                                                       "Clip": n}
    # what ONNX Runtime runs (read back from its optimized graph): every quantizable layer an int8 kernel
    assert (q["deploy_target"], q["a8_asked"], q["a8_ran_int8"], q["a8_ran_float"]) == ("ort-cpu", n, n, [])
    assert f"A8 asked {n} / ran int8 {n}" in text and "warning" not in text
    assert q["rule_violations"] == 0 and q["onnx_bytes"] == (out / "model.onnx").stat().st_size
    from quantizers.lowering.checks import check_ort_cpu

    assert check_ort_cpu(out / "model.onnx") == []
    assert (out / "model.onnx").is_file() and (out / "model.onnx.json").is_file()
    # the SiLU between A8 layers runs on integers (deploy.int8_silu, default): QLinearSigmoid + QLinearMul
    summary = json.loads((out / "model.onnx.json").read_text())["summary"]
    silu = summary["silu_int8"]
    assert silu > 0 and counts["DequantizeLinear"] >= 4 * n - 10 + silu
    from evaluators.runtime import int8_layers

    ops = int8_layers(out / "model.onnx", threads=1).int8_activation_ops
    # and the ops between A8 layers (deploy.int8_ops, default): Concat -> QLinearConcat, Add -> QLinearAdd
    between = summary["int8_ops"]
    assert between["Concat"] > 0 and between["Add"] > 0 and between["SiLU"] > 0
    assert ops == {"com.microsoft.QLinearMul": silu, "com.microsoft.QLinearSigmoid": silu,
                   "com.microsoft.QLinearConcat": between["Concat"], "com.microsoft.QLinearAdd": between["Add"]}
    assert "ops between A8 layers on uint8" in text
    assert not (out / "export.onnx").exists()
    assert json.loads((out / "assignment.json").read_text())["layers"]["model.0.conv"] == "W8A8"
    # a second call reuses the finished result
    assert main(args) == 0
    assert "reused a finished result" in capsys.readouterr().out


def test_quantize_rejects_what_the_backend_cannot_build(tmp_path, capsys):
    bad = tmp_path / "dfl.json"
    bad.write_text(json.dumps({"layers": {"model.23.dfl.conv": "W4A16"}}))
    assert main(["quantize", "--assignment", str(bad), *_small(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.23.dfl.conv" in err and "W4A16" in err
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"layers": {"model.0.cnv": "W4A16"}}))
    assert main(["quantize", "--assignment", str(typo), *_small(tmp_path)]) == 2
    assert "did you mean 'model.0.conv'" in capsys.readouterr().err
