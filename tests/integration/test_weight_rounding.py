"""Cached output-aware weight rounding (``quantizers/rounding.py``, ``quantizers/weight_store.py``) in the backends:

- the cached integers of a layer are exactly what Brevitas' own GPTQ (``gptq_mode``, as
  ``gptq: true`` runs it) gives that layer when it is the only one quantized (then its
  inputs are the float model's, the approximation the cache makes for every layer);
- a materialized model carries exactly the cached integers (and bias correction is
  computed from them);
- a second backend instance with the same cache folder loads them from disk without
  computing anything; the key changes with the model, the calibration images (list and file
  contents), the layer table and the options that decide the weights, and only with those;
- a damaged (truncated) cache file is detected by its digest and rebuilt, with a warning.

The default backend instance and the 8-image calibration set are shared with the contract
suite (one one-time computation per test session).
"""

from __future__ import annotations

import json

import pytest
from quantizer_helpers import cached, calibration_set

from mpq.assignment import Assignment
from quantizers.brevitas_backend import BrevitasBackend, BrevitasError
from quantizers.brevitas_options import BrevitasOptions


@pytest.fixture(scope="module")
def backend():
    from quantizers import get_backend

    return cached("backend:brevitas", lambda: get_backend("brevitas", device="cpu"))


def _pick(demo_model) -> list[str]:
    """The RGB input conv, a depthwise conv, a strided 3x3 conv, a 1x1 conv and a head conv."""
    q = demo_model.quantizable_layers
    dw = next(lay for lay in q if lay.groups > 1)
    strided = next(lay for lay in q if lay.stride[0] == 2 and lay.groups == 1 and lay.index > 0)
    one = next(lay for lay in q if lay.kernel == (1, 1) and lay.index > 10)
    return [q[0].name, dw.name, strided.name, one.name, q[-1].name]


def _ints(module, name: str):
    import torch

    return module.get_submodule(name).quant_weight().int().to(torch.int8)


@pytest.mark.parametrize("bits", [4, 8])
def test_cached_integers_are_brevitas_gptq_of_that_layer(backend, demo_model, calib, bits):
    """Per layer, the cache holds exactly Brevitas' single-layer GPTQ result (act order, same scales)."""
    import torch

    assert backend.rounding == "gptq"
    store, _ = backend.rounded_weights(demo_model, calib)
    sequential = BrevitasBackend(options=BrevitasOptions(gptq=True, bias_correction=False))
    changed = 0
    for name in _pick(demo_model):
        ref = sequential.materialize(demo_model, Assignment({name: f"W{bits}A16"}), calib).module
        want = _ints(ref, name)
        got = store.get(name, bits)
        assert got is not None
        torch.testing.assert_close(got.ints, want, atol=0, rtol=0, msg=f"{name} W{bits}: integers differ")
        torch.testing.assert_close(got.scale.reshape(-1), ref.get_submodule(name).quant_weight().scale.reshape(-1),
                                   atol=0, rtol=0)
        nearest = BrevitasBackend(options=BrevitasOptions(weight_rounding="nearest", bias_correction=False))
        rtn = _ints(nearest.materialize(demo_model, Assignment({name: f"W{bits}A16"}), calib).module, name)
        changed += int((rtn != want).sum())
    assert changed > 0, "GPTQ should move some integers away from round-to-nearest"


def test_materialized_model_carries_the_cached_integers(backend, demo_model, calib):
    """Every weight-quantized layer of a mixed assignment holds the cached integers and scale;
    the bias correction is the analytic one for those weights; A16/float layers are untouched."""
    import torch

    layers = demo_model.quantizable_layers
    precs = ["W4A16", "W4A8", "W8A16", "W8A8", "W16A8"]
    assignment = Assignment({lay.name: precs[i % len(precs)] for i, lay in enumerate(layers) if i % 6 != 5})
    qmodel = backend.materialize(demo_model, assignment, calib)
    store, how = backend.rounded_weights(demo_model, calib)
    assert how == "memory" and qmodel.info["weights"]["served_from"] == "memory"
    for name, p in assignment.items():
        layer = qmodel.module.get_submodule(name)
        if not p.quantizes_weights:
            continue
        rw = store.get(name, p.w_bits)
        torch.testing.assert_close(_ints(qmodel.module, name), rw.ints, atol=0, rtol=0)
        torch.testing.assert_close(layer.quant_weight().value, rw.dequantized(), atol=0, rtol=0)
    # bias correction is computed from the cached weights: E[W_f x] - E[W_q x] over the calibration set
    name = next(n for n, p in assignment.items() if str(p) == "W4A16")
    float_layer = demo_model.module.get_submodule(name)
    qlayer = qmodel.module.get_submodule(name)
    inputs = []
    hook = float_layer.register_forward_pre_hook(lambda m, i: inputs.append(i[0].detach()))
    try:
        with torch.no_grad():
            demo_model.module(torch.from_numpy(calib.images))
    finally:
        hook.remove()
    x = inputs[0]
    with torch.no_grad():
        y_float = float_layer(x).mean(dim=(0, 2, 3))
        y_quant = qlayer(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(y_quant, y_float, atol=2e-4, rtol=1e-3)


def test_rerun_loads_from_disk_and_pays_nothing(demo_model, demo_calib, tmp_path, monkeypatch):
    """A second instance on the same cache folder loads the weights (no computation), and they
    are the same; a different calibration set is a different key and is computed."""
    import torch

    import quantizers.weight_store as ws

    calib = calibration_set(demo_calib, demo_model.imgsz, n=2, batch_size=2)
    layer = demo_model.quantizable_layers[3].name
    first = BrevitasBackend(cache_dir=tmp_path)
    q1 = first.materialize(demo_model, Assignment({layer: "W4A16"}), calib)
    assert q1.info["weights"]["served_from"] == "computed" and q1.timings["weights"] > 0
    files = sorted(p.name for p in tmp_path.iterdir())
    key = q1.info["weights"]["key"]
    assert files == [f"brevitas-{key}.pt", f"brevitas-{key}.pt.json"]
    meta = json.loads((tmp_path / f"brevitas-{key}.pt.json").read_text())
    assert meta["seconds"] > 0 and meta["layers"] == len(demo_model.quantizable_layers)
    assert meta["parts"]["method"] == "gptq"

    def no_compute(*args, **kwargs):
        raise AssertionError("the weights were computed again")

    monkeypatch.setattr(ws, "build_store", no_compute)
    second = BrevitasBackend(cache_dir=tmp_path)
    q2 = second.materialize(demo_model, Assignment({layer: "W4A16", demo_model.quantizable_layers[7].name: "W8A8"}),
                            calib)
    assert q2.info["weights"]["served_from"] == "disk" and q2.info["weights"]["key"] == key
    assert q2.timings["weights"] < 0.5 * q1.timings["weights"]
    torch.testing.assert_close(_ints(q2.module, layer), _ints(q1.module, layer), atol=0, rtol=0)
    # the same instance serves later calls from memory
    q3 = second.materialize(demo_model, Assignment({layer: "W4A8"}), calib)
    assert q3.info["weights"]["served_from"] == "memory"
    # another calibration set is another key: it is computed, not served
    other = calibration_set(demo_calib[2:], demo_model.imgsz, n=2, batch_size=2)
    with pytest.raises(AssertionError, match="computed again"):
        second.materialize(demo_model, Assignment({layer: "W4A16"}), other)


def test_cache_key_follows_model_calibration_and_weight_options(demo_model, demo_calib):
    import torch

    from quantizers.weight_store import store_key

    calib = calibration_set(demo_calib, demo_model.imgsz, n=2, batch_size=2)

    def key(model=demo_model, cal=calib, **options) -> str:
        return store_key(BrevitasBackend(options=BrevitasOptions(**options)).weights.key(model, cal))

    base = key()
    assert base == key()
    # options that do not decide the weights leave the key alone
    assert key(bias_correction=False) == base
    assert key(act_calibration="mse", act_quant_type="asym") == base
    # those that do change it
    for options in ({"weight_rounding": "gpfq"}, {"weight_scale": "max"}, {"weight_scale_8bit": "mse"},
                    {"weight_granularity": "per_tensor"}):
        assert key(**options) != base, options
    # other calibration images
    assert key(cal=calibration_set(demo_calib[2:], demo_model.imgsz, n=2, batch_size=2)) != base
    # another model: the same architecture with one weight changed
    other = demo_model.fresh()
    with torch.no_grad():
        other.module.get_submodule(demo_model.quantizable_layers[5].name).weight[0, 0, 0, 0] += 1e-3
    assert key(model=other) != base


def test_sequential_gptq_ignores_the_cache(demo_model, calib):
    """``gptq: true`` keeps its meaning (sequential Brevitas GPTQ from the float weights)."""
    b = BrevitasBackend(options=BrevitasOptions(gptq=True))
    assert b.rounding == "nearest"
    layer = demo_model.quantizable_layers[3].name
    q = b.materialize(demo_model, Assignment({layer: "W4A16"}), calib)
    assert "gptq" in q.timings and q.timings["weights"] == 0.0
    assert q.info["weights"] == {"rounding": "nearest"}


def test_empty_calibration_is_a_user_error(demo_model, calib):
    from mpq.data import CalibrationSet

    empty = CalibrationSet(images=calib.images[:0], paths=[], batch_size=4)
    b = BrevitasBackend(options=BrevitasOptions(bias_correction=False))
    with pytest.raises(BrevitasError, match="calibration"):
        b.materialize(demo_model, Assignment({demo_model.quantizable_layers[3].name: "W4A16"}), empty)


def test_modelopt_takes_the_cached_integers(demo_model, calib):
    """ModelOpt torch: the cached integers become the layer's weights with ModelOpt's own amax,
    its fake quantization and the exported ONNX integers reproduce them exactly, and the
    cached integers beat ModelOpt's round-to-nearest on each layer's output error."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from quantizer_helpers import workdir

    from quantizers import get_backend
    from quantizers.modelopt_backend import integer_weight
    from quantizers.modelopt_options import ModelOptOptions
    from quantizers.rounding import collect_hessians, output_error

    try:
        backend = cached("backend:modelopt", lambda: get_backend("modelopt", device="cpu"))
    except Exception as exc:  # noqa: BLE001 - ModelOpt not installed here
        pytest.skip(f"modelopt unavailable: {exc}")
    assert backend.rounding == "gptq"
    layers = demo_model.quantizable_layers
    assignment = Assignment({lay.name: ("W4A16", "W8A16", "W4A8")[i % 3] for i, lay in enumerate(layers)
                             if i % 5 != 4})
    qmodel = backend.materialize(demo_model, assignment, calib)
    store, _ = backend.rounded_weights(demo_model, calib)
    assert qmodel.info["weights"]["key"] == store.key
    result = backend.export(qmodel, workdir() / "modelopt" / "cached-weights.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(result.path)).graph.initializer}
    for name, p in assignment.items():
        layer = qmodel.module.get_submodule(name)
        rw = store.get(name, p.w_bits)
        ints, step, bits = integer_weight(layer)
        assert bits == p.w_bits
        np.testing.assert_array_equal(ints, rw.ints.numpy())
        np.testing.assert_array_equal(inits[f"{name}.weight_int{bits}"], rw.ints.numpy())
        with torch.no_grad():
            fake = layer.weight_quantizer(layer.weight)
        torch.testing.assert_close(fake, rw.dequantized(), rtol=0, atol=1e-6 * float(fake.abs().max()))
    # output-aware: lower output error than ModelOpt's own nearest rounding, layer by layer (4 bits)
    nearest = get_backend(ModelOptOptions(weight_rounding="nearest"), device="cpu")
    w4 = [n for n, p in assignment.items() if p.w_bits == 4][:6]
    rtn = nearest.materialize(demo_model, Assignment({n: "W4A16" for n in w4}), calib)
    mods = {n: demo_model.module.get_submodule(n) for n in w4}
    H = collect_hessians(demo_model.module, mods, lambda: [torch.from_numpy(b) for b in calib.batches()], w4, "cpu")
    better = 0
    for n in w4:
        w = mods[n].weight
        with torch.no_grad():
            e_rtn = output_error(w, rtn.module.get_submodule(n).weight_quantizer(w), H[n])
        e_cached = output_error(w, store.get(n, 4).dequantized(), H[n])
        better += e_cached < e_rtn
    assert better == len(w4)

