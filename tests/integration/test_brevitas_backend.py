"""Brevitas backend specifics on the demo detector (the backend contract is in
``test_backend_contract.py``): exactness of the export, the cached analytic bias
correction against Brevitas' own, scale choices, GPTQ/GPFQ, devices."""

from __future__ import annotations

import numpy as np
import pytest
from quantizer_helpers import calibration_set, workdir

from mpq.assignment import Assignment, Precision
from quantizers.base import metadata_path
from quantizers.brevitas_backend import BrevitasBackend, BrevitasError, quant_layer
from quantizers.brevitas_options import BrevitasOptions
from quantizers.onnx_inspect import layer_precisions
from quantizers.testing import match_detections


@pytest.fixture(scope="module")
def calib(demo_calib, demo_model):
    return calibration_set(demo_calib, demo_model.imgsz, n=4, batch_size=4)


@pytest.fixture(scope="module")
def backend():
    return BrevitasBackend(options=BrevitasOptions(), device="cpu")


def _pick(demo_model):
    """A depthwise strided conv, a plain strided conv, the RGB input conv, a 1x1 conv and a head conv."""
    q = demo_model.quantizable_layers
    dw = next(lay for lay in q if lay.groups > 1)
    strided = next(lay for lay in q if lay.stride[0] == 2 and lay.groups == 1 and lay.index > 0)
    one = next(lay for lay in q if lay.kernel == (1, 1) and lay.index > 10)
    return [q[0].name, dw.name, strided.name, one.name, q[-1].name]


def test_input_quantizer_is_bit_exact_in_onnx(tmp_path):
    """Q/DQ in ONNX Runtime computes exactly what Brevitas computes on the same input."""
    import brevitas.nn as qnn
    import onnxruntime as ort
    import torch
    from brevitas.export import export_onnx_qcdq
    from brevitas.graph.calibrate import calibration_mode

    from quantizers.brevitas_backend import input_quantizer

    torch.manual_seed(0)
    for act_type in ("sym", "asym"):
        probe = qnn.QuantIdentity(act_quant=input_quantizer(BrevitasOptions(act_quant_type=act_type)),
                                  return_quant_tensor=False)
        x = torch.randn(8, 16, 24, 24) * 3 + 0.5
        with torch.no_grad(), calibration_mode(probe):
            probe(x)
        probe.eval()
        path = tmp_path / f"q-{act_type}.onnx"
        export_onnx_qcdq(probe, args=x[:1], export_path=str(path), dynamo=False, opset_version=17,
                         input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_array_equal(out, probe(x).numpy())


def test_analytic_bias_correction_equals_brevitas(demo_model, calib):
    """The cached correction W_f.E[unfold(x)] - W_q.E[unfold(Q(x))] is what Brevitas'
    bias_correction_mode measures by running the model.

    With round-to-nearest weights: Brevitas' mode takes its float reference from the layer's
    ``weight`` with quantization off, which after GPTQ (cached or sequential) holds the
    quantized values, not the float ones; ours always uses the float layer (checked for the
    cached GPTQ weights in ``test_weight_rounding.py``)."""
    import torch
    from brevitas.graph.calibrate import bias_correction_mode

    names = _pick(demo_model)
    ours_backend = BrevitasBackend(options=BrevitasOptions(weight_rounding="nearest"))
    ref_backend = BrevitasBackend(options=BrevitasOptions(bias_correction=False, weight_rounding="nearest"))
    for prec in ("W4A8", "W16A8"):
        assignment = Assignment({n: prec for n in names})
        ours = ours_backend.materialize(demo_model, assignment, calib).module
        ref = ref_backend.materialize(demo_model, assignment, calib).module
        with torch.no_grad(), bias_correction_mode(ref):
            for batch in calib.batches():
                ref(torch.from_numpy(batch))
        for n in names:
            base = demo_model.module.get_submodule(n).bias
            want = ref.get_submodule(n).bias - base
            got = ours.get_submodule(n).bias - base
            assert want.abs().max() > 1e-4, "the correction should not be trivially zero"
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_stats_are_cached_across_calls_and_deterministic(demo_model, demo_calib):
    calib = calibration_set(demo_calib, demo_model.imgsz, n=4, batch_size=4)
    names = _pick(demo_model)
    nearest = BrevitasOptions(weight_rounding="nearest")  # this test is about the statistics cache
    b = BrevitasBackend(options=nearest)
    first = b.materialize(demo_model, Assignment({names[0]: "W4A8"}), calib)
    second = b.materialize(demo_model, Assignment({names[1]: "W8A8", names[0]: "W4A8"}), calib)
    assert first.info["stats_cached"] is False and second.info["stats_cached"] is True
    assert second.timings["calibrate"] < 0.5 * max(first.timings["calibrate"], 1e-3)
    again = BrevitasBackend(options=nearest).materialize(demo_model, Assignment({names[0]: "W4A8"}), calib)
    import torch

    torch.testing.assert_close(again.module.get_submodule(names[0]).bias,
                               second.module.get_submodule(names[0]).bias, atol=0, rtol=0)
    # a different calibration set is not served from the cache
    other = calibration_set(demo_calib[4:], demo_model.imgsz, n=4, batch_size=4)
    third = b.materialize(demo_model, Assignment({names[0]: "W4A16"}), other)
    assert third.info["stats_cached"] is False


def test_weight_only_export_is_exact(backend, demo_model, calib, demo_subset):
    """Weight-only quantization has no rounding at run time: ONNX and torch agree to float precision
    (with the default, cached GPTQ weights)."""
    import onnxruntime as ort
    import torch

    from mpq.data import preprocess_many

    b = backend
    layers = demo_model.quantizable_layers[::3]
    q = b.materialize(demo_model, Assignment.uniform(layers, "W4A16"), calib)
    result = b.export(q, workdir() / "brevitas" / "w4a16.onnx")
    images = preprocess_many(demo_subset.paths[:8], demo_model.imgsz, progress=False)[0]
    out = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    with torch.no_grad():
        ref = q.module(torch.from_numpy(images)).numpy()
    ious, dscore = match_detections(ref, out)
    assert len(ious) > 0 and ious.min() > 0.9999 and dscore.max() < 1e-4
    # 4-bit weights: int8 containers clipped to [-7, 7], one scale per output channel
    found = layer_precisions(result.path)
    assert {g.weight_detail for n, g in found.items() if g.w_bits == 4} == {"int8 -> Clip[-7, 7] -> DequantizeLinear"}
    counts = result.node_counts
    assert counts == {"Clip": len(layers), "DequantizeLinear": len(layers)}
    assert sorted(n for n, g in found.items() if g.w_bits == 4) == sorted(lay.name for lay in layers)
    meta = metadata_path(result.path).read_text()
    assert '"digest"' in meta and '"node_counts"' in meta and '"opset": 17' in meta


@pytest.mark.parametrize("act_type, zp", [("sym", "int8"), ("asym", "uint8")])
def test_act_quant_type_in_graph(demo_model, calib, act_type, zp):
    b = BrevitasBackend(options=BrevitasOptions(act_quant_type=act_type, bias_correction=False,
                                                weight_rounding="nearest"))
    name = demo_model.quantizable_layers[5].name
    q = b.materialize(demo_model, Assignment({name: "W8A8"}), calib)
    result = b.export(q, workdir() / "brevitas" / f"a8-{act_type}.onnx")
    g = layer_precisions(result.path)[name]
    assert g.label == "W8A8" and f"QuantizeLinear({zp})" in g.input_detail


def test_mse_weight_scales_beat_max_at_4_bits(demo_model):
    """Per layer, the MSE-searched 4-bit scales reconstruct the weights better than max scaling."""
    import torch

    better = 0
    layers = demo_model.quantizable_layers[::16]
    for lay in layers:
        conv = demo_model.module.get_submodule(lay.name)
        err = {}
        for method in ("max", "mse"):
            q = quant_layer(conv, Precision(4, 16), BrevitasOptions(weight_scale=method))
            with torch.no_grad():
                err[method] = float(((q.quant_weight().value - conv.weight) ** 2).mean())
            assert tuple(q.quant_weight().scale.shape) == (conv.out_channels, 1, 1, 1)
        assert err["mse"] <= err["max"] * 1.0001
        better += err["mse"] < 0.95 * err["max"]
    assert better >= len(layers) // 2
    q = quant_layer(demo_model.module.get_submodule(layers[1].name), Precision(4, 16),
                    BrevitasOptions(weight_scale="max", weight_granularity="per_tensor"))
    assert q.quant_weight().scale.numel() == 1 and int(q.quant_weight().bit_width) == 4


@pytest.mark.parametrize("algo", ["gptq", "gpfq"])
def test_gptq_gpfq_reduce_layer_output_error(demo_model, calib, algo):
    """With the same 4-bit scales, GPTQ/GPFQ give each layer a smaller output error on the
    calibration images than round-to-nearest (measured with float inputs to the layer)."""
    import torch

    names = _pick(demo_model)[1:4]
    assignment = Assignment({n: "W4A16" for n in names})
    opts = {"bias_correction": False}
    rtn = BrevitasBackend(options=BrevitasOptions(**opts, weight_rounding="nearest")).materialize(
        demo_model, assignment, calib)
    gpx = BrevitasBackend(options=BrevitasOptions(**opts, **{algo: True})).materialize(demo_model, assignment, calib)
    assert algo in gpx.timings
    inputs: dict[str, torch.Tensor] = {}
    hooks = [demo_model.module.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: inputs.__setitem__(n, i[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            demo_model.module(torch.from_numpy(calib.images))
    finally:
        for h in hooks:
            h.remove()
    for n in names:
        x = inputs[n]
        with torch.no_grad():
            ref = demo_model.module.get_submodule(n)(x)
            e_rtn = float(((rtn.module.get_submodule(n)(x) - ref) ** 2).mean())
            e_gpx = float(((gpx.module.get_submodule(n)(x) - ref) ** 2).mean())
        assert e_gpx < e_rtn, f"{algo} did not reduce the output error of {n}: {e_gpx} >= {e_rtn}"


def test_quant_linear_layer():
    import torch

    lin = torch.nn.Linear(32, 16)
    q = quant_layer(lin, Precision(8, 16), BrevitasOptions())
    assert type(q).__name__ == "QuantLinear"
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(q(x), lin(x), atol=0.05)
        assert tuple(q.quant_weight().scale.shape) == (16, 1)


def test_wrong_device_and_options_are_user_errors(demo_model, calib):
    import torch

    from mpq.errors import UserError

    if not torch.cuda.is_available():
        with pytest.raises(BrevitasError, match="cuda"):
            BrevitasBackend(device="cuda")
    from quantizers.modelopt_options import ModelOptOptions

    with pytest.raises(UserError, match="BrevitasOptions"):
        BrevitasBackend(options=ModelOptOptions())  # type: ignore[arg-type]


@pytest.mark.gpu
def test_calibration_runs_on_cuda(demo_model, calib):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the CUDA calibration path cannot be exercised here")
    b = BrevitasBackend(device="cuda")
    q = b.materialize(demo_model, Assignment.uniform(demo_model.quantizable_layers[:10], "W4A8"), calib)
    assert next(q.module.parameters()).device.type == "cuda"
    result = b.export(q, workdir() / "brevitas" / "cuda.onnx")
    assert result.path.is_file()


def _run(module, x):
    import torch

    with torch.no_grad():
        y = module(torch.from_numpy(x))
    return y[0] if isinstance(y, (tuple, list)) else y


def test_layers_built_once_are_reused_and_compute_what_a_fresh_build_computes(demo_model, calib):
    """A backend keeps each layer it built per precision; a later build reuses it, and the
    model computes exactly what a fresh backend's build computes (bias correction included)."""
    import torch

    names = [lay.name for lay in demo_model.quantizable_layers]
    a = Assignment({n: Precision.parse("W4A8" if k % 2 else "W8A16") for k, n in enumerate(names)})
    b = Assignment({n: Precision.parse("W4A8" if k % 3 else "W8A8") for k, n in enumerate(names)})
    backend = BrevitasBackend(options=BrevitasOptions(), device="cpu", target="ort-cpu")
    x = calib.images[:2]
    first = backend.materialize(demo_model, a, calib)
    y_first = _run(first.module, x)
    second = backend.materialize(demo_model, b, calib)
    assert 0 < second.timings["layers_reused"] < len(names)  # the W4A8 layers both share
    again = backend.materialize(demo_model, a, calib)
    assert again.timings["layers_reused"] == len(names)
    fresh = BrevitasBackend(options=BrevitasOptions(), device="cpu", target="ort-cpu").materialize(demo_model, a, calib)
    assert torch.equal(_run(again.module, x), _run(fresh.module, x))
    assert torch.equal(_run(first.module, x), y_first)  # building b changed nothing a holds


def test_sequential_gptq_builds_are_not_reused(demo_model, calib):
    names = [lay.name for lay in demo_model.quantizable_layers][:3]
    a = Assignment({n: Precision.parse("W4A16") for n in names})
    backend = BrevitasBackend(options=BrevitasOptions(gptq=True), device="cpu")
    backend.materialize(demo_model, a, calib)
    assert backend.materialize(demo_model, a, calib).timings["layers_reused"] == 0
