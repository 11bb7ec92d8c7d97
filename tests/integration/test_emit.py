"""Graph emission (``quantizers.emit``) against the backend's traced export: the same layers,
integers, scales and ranges, and the same lowered file, output for output; the trial
pipeline emits by default and traces when asked or when emission cannot write a layer."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from quantizer_helpers import workdir

from mpq.assignment import Assignment, Precision
from quantizers.emit import EmitUnsupported, LayerParams, emit_qdq
from quantizers.lowering import graph as G
from quantizers.lowering import lower

DEMO_STUDY = Path(__file__).resolve().parents[2] / "studies" / "demo.yaml"
MIX = ("W4A16", "W4A8", "W8A16", "W8A8", "W16A8", "W16A16")


def _mixed(model, seed: int) -> Assignment:
    rng = random.Random(seed)
    picks = {lay.name: Precision.parse(rng.choice(MIX)) for lay in model.quantizable_layers}
    return Assignment({k: v for k, v in picks.items() if not v.is_float})


def _layers(path, model, assignment):
    proto = G.load(path)
    asked = {lay.name: "W16A16" for lay in model.layers} | {k: str(v) for k, v in assignment.items()}
    return {lq.name: lq for lq in G.read_layers(proto, G.layer_names(proto, model.layers), asked)}


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return np.array_equal(np.asarray(a), np.asarray(b))


def _same_q(p, q) -> bool:
    if p is None or q is None:
        return p is None and q is None
    return _same(p.scale, q.scale) and _same(p.zero_point, q.zero_point) and p.qtype == q.qtype


@pytest.mark.parametrize("backend_name", ["brevitas", "modelopt"])
@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_emission_writes_what_the_traced_export_holds(target, backend_name, demo_model, calib, float_onnx):
    """Every layer read back from the emitted graph equals the one read from the backend's own
    traced export, and both lower to files whose outputs are identical."""
    import onnxruntime as ort

    from quantizers import get_backend

    backend = get_backend(backend_name, device="cpu", target=target)
    assignment = _mixed(demo_model, seed=3)
    kinds = {str(p) for _, p in assignment.items()}
    assert {"W4A8", "W8A8", "W4A16", "W16A8"} <= kinds
    qmodel = backend.materialize(demo_model, assignment, calib)
    out = workdir() / f"emit-{backend_name}-{target}"
    traced = backend.export(qmodel, out / "traced.onnx").path
    emitted = backend.emit(qmodel, out / "emitted.onnx", float_onnx).path
    t, e = _layers(traced, demo_model, assignment), _layers(emitted, demo_model, assignment)
    assert set(t) == set(e)
    for name in t:
        a, b = t[name], e[name]
        assert _same_q(a.x_q, b.x_q), name
        assert _same(a.weight_int, b.weight_int) and _same_q(a.w_q, b.w_q) and a.w_clip == b.w_clip, name
        assert _same(a.weight_float, b.weight_float), name
        assert _same(a.bias, b.bias) and _same(a.bias_int, b.bias_int) and _same_q(a.bias_q, b.bias_q), name
        assert _same_q(a.y_q, b.y_q), name
    outputs, violations = [], []
    for src in (traced, emitted):
        low = lower(src, src.with_suffix(".lowered.onnx"), target=target, layers=demo_model.layers,
                    assignment={k: str(v) for k, v in assignment.items()}, images=calib.images)
        violations.append(sorted((v.rule, v.node) for v in low.violations))  # W16A8 layers break ort-cpu rules
        sess = ort.InferenceSession(str(low.path), providers=["CPUExecutionProvider"])
        outputs.append(sess.run(None, {"images": calib.images[:4]})[0])
    assert np.array_equal(outputs[0], outputs[1])
    assert violations[0] == violations[1]


def test_emission_refuses_a_layer_the_float_graph_does_not_hold(demo_model, float_onnx):
    with pytest.raises(EmitUnsupported, match="model.99.nope"):
        emit_qdq(float_onnx, {"model.99.nope": LayerParams()}, demo_model.layers)


def test_the_trial_pipeline_emits_and_traces_to_the_same_result(tmp_path):
    """A trial built by emission (the default) and the same trial traced (``deploy.export:
    trace``) hand out files that compute the same detections and the same mAP."""
    import onnxruntime as ort

    from search.pipeline import TrialPipeline
    from search.spec import load_spec

    results = {}
    for how in ("emit", "trace"):
        spec = load_spec(DEMO_STUDY, runs_dir=str(tmp_path), deploy={"target": "ort-cpu", "export": how},
                         **{"dataset.max_images": 16, "calibration.max_images": 8})
        pipeline = TrialPipeline.for_spec(spec, run_dir=tmp_path / how, progress=False)
        model = pipeline.resources.model
        picks = _mixed(model, seed=5)
        result = pipeline.run(Assignment({k: v for k, v in picks.items() if str(v) != "W16A8"}))
        assert f"export.{how}" in result.timings
        results[how] = result
    e, t = results["emit"], results["trace"]
    assert e.metrics.map50_95 == t.metrics.map50_95
    assert e.metrics.a8_ran_int8 == t.metrics.a8_ran_int8
    x = np.random.default_rng(0).random((1, 3, 192, 192), dtype=np.float32)
    runs = [ort.InferenceSession(str(r.artifact), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
            for r in (e, t)]
    assert np.array_equal(runs[0], runs[1])
