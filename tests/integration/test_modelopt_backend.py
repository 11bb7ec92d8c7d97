"""The ModelOpt torch backend on the demo detector: quantizer rules, exact integer weight
export (4-bit as int8 containers or ONNX INT4), calibration methods, torch vs ONNX Runtime.

Tolerances, from what was measured on the demo model (see the module docstring of
``quantizers.modelopt_backend``):

- weight-only layers (W4A16, W8A16): the exported integers are ModelOpt's own
  (``round(w * bound / amax)``), so the dequantized ONNX weight equals the torch
  fake-quant weight to one float rounding and every conv output agrees to float
  accumulation order: measured ~1e-6 relative, asserted <= 1e-4;
- A8 layers: one stacked activation quantizer per layer turns float-rounding noise into
  whole quantization steps, so activations deep in the network drift by several percent
  *between two torch runs that only use different conv kernels* (MKL-DNN vs native, final
  demo model, uniform W8A8: median 4.0 %, worst layer 32 %; W8A16 1e-6). ONNX Runtime
  (default optimizations) vs torch measured median 8.6 % (4.9 % with ORT's optimizations
  off, which otherwise quantize Conv biases to int32 and fuse integer convs); asserted: no
  more than 3x the torch-vs-torch median. Detections: every confident one matched at
  IoU >= 0.95, median score difference <= 0.02, and the 90th percentile of score
  differences within 2x (+0.01) that of the two torch runs (uniform W8A8 has 82 input
  quantizers in series: even torch vs torch has 7 % of its detections off by more than 0.05
  in score).
"""

from __future__ import annotations

import numpy as np
import pytest
from quantizer_helpers import cached, workdir

pytest.importorskip("modelopt.torch.quantization", reason="the 'modelopt' extra is not installed")

from mpq.assignment import Assignment, Precision  # noqa: E402
from quantizers.modelopt_backend import ModelOptBackend, integer_weight, quant_config  # noqa: E402
from quantizers.modelopt_options import ModelOptOptions  # noqa: E402
from quantizers.testing import match_detections


@pytest.fixture(scope="module")
def backend():
    return ModelOptBackend(options=ModelOptOptions(), device="cpu")


def weight_only(demo_model) -> Assignment:
    """W4A16 and W8A16 alternating over the quantizable layers."""
    return Assignment({lay.name: Precision(4 if i % 2 else 8, 16)
                       for i, lay in enumerate(demo_model.quantizable_layers)})


def build(backend, demo_model, assignment, calib, tag):
    def go():
        q = backend.materialize(demo_model, assignment, calib)
        return q, backend.export(q, workdir() / "modelopt" / f"{tag}-{assignment.digest()}.onnx")

    return cached(f"modelopt-own:{tag}:{assignment.digest()}", go)


def layer_outputs_onnx(path, demo_model, images, optimize=True):
    """Every Conv node's output in ONNX Runtime, by layer name."""
    import onnx
    import onnxruntime as ort

    from mpq.onnx_nodes import with_outputs
    from quantizers.onnx_names import map_layers_to_nodes

    proto = onnx.load(str(path))
    nmap = map_layers_to_nodes(proto, demo_model.layers)
    by_node = {n.name: n for n in proto.graph.node}
    tensors = {lay.name: by_node[nmap.node(lay.name)].output[0] for lay in demo_model.layers}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(with_outputs(proto, tensors.values()).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"images": images}), strict=True))
    return {name: res[t] for name, t in tensors.items()}, res["output0"]


def layer_outputs_torch(module, names, images, mkldnn=True):
    import torch

    feats = {}
    mods = dict(module.named_modules())
    # copies: Ultralytics' SiLU runs in place on the conv output
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o.detach().clone().numpy()))
             for n in names]
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = mkldnn
    try:
        with torch.no_grad():
            out = module(torch.from_numpy(images)).numpy()
    finally:
        torch.backends.mkldnn.enabled = prev
        for h in hooks:
            h.remove()
    return feats, out


def rel_errors(a: dict, b: dict) -> np.ndarray:
    return np.array([np.linalg.norm(a[k] - b[k]) / (np.linalg.norm(b[k]) + 1e-12) for k in b])


# --------------------------------------------------------------------------------------
def test_quant_config_names_each_quantizer_exactly():
    a = Assignment({"model.0.conv": "W4A8", "model.2.cv1.conv": "W8A16", "model.3.conv": "W16A8"})
    cfg = quant_config(a, ModelOptOptions(calibration="entropy"))
    assert cfg["algorithm"] is None
    rules = cfg["quant_cfg"]
    assert rules[0] == {"quantizer_name": "*", "enable": False}
    assert rules[1:] == [
        {"quantizer_name": "model.0.conv.weight_quantizer", "cfg": {"num_bits": 4, "axis": 0}},
        {"quantizer_name": "model.0.conv.input_quantizer",
         "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}},
        {"quantizer_name": "model.2.cv1.conv.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "model.3.conv.input_quantizer",
         "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}},
    ]


def test_exported_integer_weights_are_modelopts(backend, demo_model, calib):
    import onnx
    import torch
    from onnx import numpy_helper

    assignment = weight_only(demo_model)
    qmodel, result = build(backend, demo_model, assignment, calib, "wonly")
    proto = onnx.load(str(result.path))
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), "custom-domain ops left in the graph"
    assert result.metadata["opset"] == 17 and result.metadata["w4_format"] == "int8"
    assert "trt::DequantizeLinear" in result.metadata["modelopt_w4_export"]
    assert result.node_counts == {"DequantizeLinear": len(assignment)}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for name, precision in assignment.items():
        layer = qmodel.module.get_submodule(name)
        q = inits[f"{name}.weight_int{precision.w_bits}"]
        step = inits[f"{name}.weight_scale"]
        assert q.dtype == np.int8 and step.shape == (q.shape[0],)
        bound = 2 ** (precision.w_bits - 1)
        assert q.min() >= -bound and q.max() <= bound - 1
        with torch.no_grad():
            fake = layer.weight_quantizer(layer.weight).numpy()
        np.testing.assert_allclose(q * step[:, None, None, None], fake, rtol=0, atol=1e-6 * np.abs(fake).max())
        assert f"{name}.weight" not in inits, "the float copy of a quantized weight must not stay in the file"
    # float layers keep their float weights
    floats = [lay.name for lay in demo_model.layers if lay.name not in assignment]
    assert floats and all(f"{n}.weight" in inits for n in floats)


def test_weight_only_layers_agree_with_torch_layer_by_layer(backend, demo_model, calib, images):
    qmodel, result = build(backend, demo_model, weight_only(demo_model), calib, "wonly")
    names = [lay.name for lay in demo_model.layers]
    onnx_feats, onnx_out = layer_outputs_onnx(result.path, demo_model, images[:4])
    torch_feats, torch_out = layer_outputs_torch(qmodel.module, names, images[:4])
    rel = rel_errors(onnx_feats, torch_feats)
    assert rel.max() <= 1e-4, f"worst layer {names[int(rel.argmax())]}: {rel.max():.2e}"
    ious, dscore = match_detections(torch_out, onnx_out)
    assert len(ious) > 0 and ious.min() > 0.9999 and dscore.max() < 1e-4


def test_a8_drift_stays_at_the_float_rounding_floor(backend, demo_model, calib, images):
    assignment = Assignment.uniform(demo_model.layers, "W8A8")
    qmodel, result = build(backend, demo_model, assignment, calib, "w8a8")
    names = [lay.name for lay in demo_model.layers]
    x = images[:4]
    onnx_feats, _ = layer_outputs_onnx(result.path, demo_model, x)
    torch_feats, _ = layer_outputs_torch(qmodel.module, names, x)
    torch_native, _ = layer_outputs_torch(qmodel.module, names, x, mkldnn=False)
    floor = np.median(rel_errors(torch_native, torch_feats))
    drift = np.median(rel_errors(onnx_feats, torch_feats))
    assert floor > 1e-4, "two conv kernels should not agree bit for bit through 82 INT8 quantizers"
    assert drift <= 3 * floor + 1e-3, f"ORT vs torch median drift {drift:.3%}, torch vs torch {floor:.3%}"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {"images": images})[0]
    _, torch_out = layer_outputs_torch(qmodel.module, [], images)
    _, torch_native_out = layer_outputs_torch(qmodel.module, [], images, mkldnn=False)
    ious, dscore = match_detections(torch_out, onnx_out)
    ious_floor, dscore_floor = match_detections(torch_out, torch_native_out)
    # final demo model, 16 images, one-to-one head: ORT p90 0.046 (max 0.081), torch vs torch p90 0.040 (max 0.077)
    print(f"\nIoU min/p5: ORT {ious.min():.3f}/{np.percentile(ious, 5):.3f}, torch vs torch "
          f"{ious_floor.min():.3f}/{np.percentile(ious_floor, 5):.3f}; score diff p90 ORT "
          f"{np.percentile(dscore, 90):.3f}, torch vs torch {np.percentile(dscore_floor, 90):.3f}")
    assert len(ious) >= 3
    # with NMS a small score change can let a neighbouring box of the same object survive instead
    # (IoU with the reference box below 1 but well above 0.5): bound the tail by the floor's
    assert np.percentile(ious, 5) >= min(np.percentile(ious_floor, 5) - 0.02, 0.95)
    # a box can also be dropped by NMS on one side only (IoU 0): bound how often, not the minimum
    # (seen on CI with multi-threaded torch: 1 unmatched box among the confident ones)
    assert (ious < 0.5).mean() <= (ious_floor < 0.5).mean() + 0.02
    assert np.median(dscore) <= 0.02
    assert np.percentile(dscore, 90) <= 2 * np.percentile(dscore_floor, 90) + 0.01


def test_int4_storage_matches_int8_containers(backend, demo_model, calib, images):
    """The same quantized model exported both ways: INT4 initializers at opset 21 and int8
    containers at opset 17 give the same ONNX Runtime outputs."""
    import onnx
    import onnxruntime as ort

    a = Assignment({lay.name: Precision(4, 8 if i % 3 == 0 else 16)
                    for i, lay in enumerate(demo_model.quantizable_layers)})
    b8 = backend  # w4_format int8, the default
    b4 = ModelOptBackend(options=ModelOptOptions(w4_format="int4"))
    qmodel = b8.materialize(demo_model, a, calib)
    r8 = b8.export(qmodel, workdir() / "modelopt" / "w4-int8.onnx")
    r4 = b4.export(qmodel, workdir() / "modelopt" / "w4-int4.onnx")
    p4 = onnx.load(str(r4.path))
    assert r4.metadata["opset"] == 21 and r8.metadata["opset"] == 17
    int4 = [i for i in p4.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 2 * len(a)  # weights and zero points
    assert r4.metadata["file_bytes"] < 0.7 * r8.metadata["file_bytes"]
    outs = []
    for r in (r8, r4):
        sess = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {"images": images[:4]})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-4)


def test_input_ranges_are_cached_and_methods_differ(demo_model, calib):
    layers = demo_model.quantizable_layers
    a = Assignment.uniform(layers[:10], "W8A8")
    amax = {}
    for method in ("max", "percentile"):
        be = ModelOptBackend(options=ModelOptOptions(calibration=method, percentile=99.0, weight_rounding="nearest"))
        first = be.materialize(demo_model, a, calib)
        again = be.materialize(demo_model, Assignment.uniform(layers[5:12], "W4A8"), calib)
        assert first.info["input_stats_cached"] is False and again.info["input_stats_cached"] is True
        assert again.timings["calibrate_inputs"] < first.timings["calibrate_inputs"]
        amax[method] = {n: float(first.module.get_submodule(n).input_quantizer.amax) for n in a}
        for n in list(a)[5:10]:  # the same layer got the same cached range in both calls
            assert float(again.module.get_submodule(n).input_quantizer.amax) == amax[method][n]
    assert all(amax["percentile"][n] <= amax["max"][n] for n in a)
    assert any(amax["percentile"][n] < 0.9 * amax["max"][n] for n in a)


def test_mse_weight_ranges_reduce_4bit_weight_error(demo_model, calib):
    a = Assignment.uniform(demo_model.quantizable_layers[:12], "W4A16")
    err = {}
    for method in ("max", "mse"):
        options = ModelOptOptions(weight_calibration=method, weight_rounding="nearest")  # weight error, not output
        q = ModelOptBackend(options=options).materialize(demo_model, a, calib)
        total = 0.0
        for name in a:
            layer = q.module.get_submodule(name)
            ints, step, bits = integer_weight(layer)
            assert bits == 4
            w = layer.weight.detach().numpy()
            total += float(((ints * step[:, None, None, None] - w) ** 2).sum())
        err[method] = total
    assert err["mse"] < 0.9 * err["max"]


@pytest.mark.slow
def test_entropy_calibration_runs(demo_model, calib, images):
    """ModelOpt's histogram entropy search (pure Python, minutes for 82 layers on a CPU)."""
    be = ModelOptBackend(options=ModelOptOptions(calibration="entropy"))
    a = Assignment.uniform(demo_model.layers, "W8A8")
    q = be.materialize(demo_model, a, calib)
    r = be.export(q, workdir() / "modelopt" / "entropy.onnx")
    _, out = layer_outputs_onnx(r.path, demo_model, images[:2])
    assert out.shape == demo_model.output_shape(2) and np.isfinite(out).all()


def test_wrong_options_type_is_an_error():
    from mpq.errors import UserError
    from quantizers.brevitas_options import BrevitasOptions

    with pytest.raises(UserError, match="ModelOptOptions"):
        ModelOptBackend(options=BrevitasOptions())  # type: ignore[arg-type]


@pytest.mark.gpu
def test_calibration_and_export_on_cuda(demo_model, calib, images):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the CUDA calibration path cannot be exercised here")
    be = ModelOptBackend(device="cuda")
    a = Assignment({lay.name: ("W4A8", "W8A16")[i % 2] for i, lay in enumerate(demo_model.quantizable_layers)})
    q = be.materialize(demo_model, a, calib)
    assert {p.device.type for p in q.module.parameters()} == {"cuda"}  # restored float layers too
    result = be.export(q, workdir() / "modelopt" / "cuda.onnx")
    _, out = layer_outputs_onnx(result.path, demo_model, images[:2])
    assert out.shape == demo_model.output_shape(2) and np.isfinite(out).all()
