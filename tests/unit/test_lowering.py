"""The lowering rules on small hand-built Q/DQ graphs (no model, no backend)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from lowering_helpers import qcdq_model, run

from quantizers.lowering import LoweringError, lower, metadata_path, target_info
from quantizers.lowering import graph as G
from quantizers.lowering.checks import check_ort_cpu, check_tensorrt
from quantizers.lowering.graph import QParams, quantize_like_onnx


def _x(n: int = 2, c: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.0, (n, c, 8, 8)).astype(np.float32)


def _save(tmp_path, model, name="src.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _nodes(path, op):
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


def _const_of(model, name):
    index = G.GraphIndex(model)
    return index.const(name)


# --------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------
def test_int8_zero_point_0_is_uint8_zero_point_128():
    x = np.linspace(-20, 20, 4001, dtype=np.float32)
    s = np.float32(0.1)
    q8 = quantize_like_onnx(x, QParams(s, np.int8(0), "int8"))
    u = QParams(s, np.int8(0), "int8").to_uint8()
    assert u.qtype == "uint8" and int(u.zero_point) == 128
    qu = quantize_like_onnx(x, u)
    np.testing.assert_array_equal(q8 + 128, qu)
    np.testing.assert_array_equal(G.dequantize(q8, QParams(s, np.int8(0), "int8")), G.dequantize(qu, u))


def test_target_info():
    assert target_info("ort-cpu").needs_output_quant
    assert not target_info("tensorrt").needs_output_quant
    assert not target_info("qcdq").needs_output_quant
    with pytest.raises(LoweringError, match="unknown deploy target"):
        target_info("tflite")


# --------------------------------------------------------------------------------------
# ort-cpu
# --------------------------------------------------------------------------------------
def test_ort_cpu_a8_layer_becomes_a_fusable_unit(tmp_path):
    src = _save(tmp_path, qcdq_model([{"w_bits": 4}]))
    dst = tmp_path / "low.onnx"
    result = lower(src, dst, target="ort-cpu")
    assert result.int8_layers == 1 and result.a8_layers == 1 and not result.violations
    assert check_ort_cpu(dst) == []
    model = onnx.load(str(dst))
    assert not [n for n in model.graph.node if n.op_type == "Clip"], "the weight Clip is applied offline"
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    index = G.GraphIndex(model)
    x_dq, w_dq, b_dq = (index.producer[i] for i in conv.input)
    assert (x_dq.op_type, w_dq.op_type, b_dq.op_type) == ("DequantizeLinear",) * 3
    assert index.const(x_dq.input[2]).dtype == np.uint8 and int(index.const(x_dq.input[2])) == 128
    w = index.const(w_dq.input[0])
    assert w.dtype == np.int8 and w_dq.input[0] == "model.0.conv.weight" and -7 <= w.min() and w.max() <= 7
    b = index.const(b_dq.input[0])
    assert b.dtype == np.int32 and np.all(index.const(b_dq.input[2]) == 0)
    np.testing.assert_allclose(index.const(b_dq.input[1]),
                               np.float32(index.const(x_dq.input[1])) * index.const(w_dq.input[1]), rtol=0)
    (q,) = index.consumers[conv.output[0]]
    assert q.op_type == "QuantizeLinear" and index.const(q.input[2]).dtype == np.uint8
    # the same numbers: int8 zp 0 -> uint8 zp 128 is exact, the bias was on the int32 grid
    x = _x()
    np.testing.assert_allclose(run(onnx.load(str(src)), x), run(model, x), rtol=0, atol=1e-6)
    # metadata says what each layer became and why W4 buys size only
    meta = result.metadata
    assert meta["layers"]["model.0.conv"]["form"] == "qdq-int8"
    assert any("W4 buys weight size" in n for n in meta["notes"])
    assert metadata_path(dst).is_file()


def test_ort_cpu_bias_off_grid_is_rounded_to_int32(tmp_path):
    src = _save(tmp_path, qcdq_model([{"bias_on_grid": False}]))
    dst = tmp_path / "low.onnx"
    lower(src, dst, target="ort-cpu")
    x = _x()
    a, b = run(onnx.load(str(src)), x), run(onnx.load(str(dst)), x)
    # half an int32 step (s_x * s_w ~ 1e-3) at most before the output quantizer: rare one-step flips
    assert np.mean(np.abs(a - b) > 1e-6) < 0.01


def test_ort_cpu_weight_only_layer_holds_float_grid_values(tmp_path):
    src = _save(tmp_path, qcdq_model([{"a8": False, "out_q": False, "w_bits": 4}]))
    dst = tmp_path / "low.onnx"
    result = lower(src, dst, target="ort-cpu")
    model = onnx.load(str(dst))
    assert not [n for n in model.graph.node if n.op_type in ("DequantizeLinear", "QuantizeLinear", "Clip")]
    assert result.layers["model.0.conv"]["form"] == "float-grid"
    w = _const_of(model, "model.0.conv.weight")
    assert w.dtype == np.float32
    scale = _const_of(onnx.load(str(src)), "model.0.conv.ws")
    assert len(np.unique(np.rint(w / scale[:, None, None, None]))) <= 15  # 4-bit grid values
    x = _x()
    np.testing.assert_array_equal(run(onnx.load(str(src)), x), run(model, x))
    assert check_ort_cpu(dst) == []


def test_ort_cpu_needs_an_output_quantizer_or_images(tmp_path):
    src = _save(tmp_path, qcdq_model([{"out_q": False}]))
    with pytest.raises(LoweringError, match="model.0.conv"):
        lower(src, tmp_path / "low.onnx", target="ort-cpu")
    result = lower(src, tmp_path / "low.onnx", target="ort-cpu", images=_x(4), cache_dir=tmp_path / "cache")
    assert result.int8_layers == 1 and check_ort_cpu(tmp_path / "low.onnx") == []
    out = result.layers["model.0.conv"]
    assert out["output_quant"] == "lowering" and out["output"]["qtype"] == "uint8"
    assert result.metadata["output_calibration"]["method"] == "minmax"
    again = lower(src, tmp_path / "low2.onnx", target="ort-cpu", images=_x(4), cache_dir=tmp_path / "cache")
    assert again.metadata["output_calibration"]["cached"] is True


def test_ort_cpu_layers_reading_one_tensor_share_one_input_quantizer(tmp_path):
    from lowering_helpers import conv_block
    from onnx import TensorProto, helper

    nodes, inits = [], []
    a = conv_block(nodes, inits, layer="model.0.conv", x="images", cin=4, cout=8, seed=0, silu=False)
    b = conv_block(nodes, inits, layer="model.1.conv", x="images", cin=4, cout=8, seed=1, silu=False)
    nodes.append(helper.make_node("Add", [a, b], ["sum"], name="/model.2/Add"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    src = _save(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = lower(src, tmp_path / "low.onnx", target="ort-cpu")
    assert result.int8_layers == 2
    assert len(_nodes(tmp_path / "low.onnx", "QuantizeLinear")) == 3  # one shared input Q + two output Qs


def test_ort_cpu_lowered_graph_runs_as_qlinearconv(tmp_path):
    from evaluators.runtime import int8_layers

    src = _save(tmp_path, qcdq_model([{}, {"a8": False, "out_q": False}, {}]))
    dst = tmp_path / "low.onnx"
    lower(src, dst, target="ort-cpu")
    asked = {"model.0.conv": "W8A8", "model.1.conv": "W8A16", "model.2.conv": "W8A8"}
    report = int8_layers(dst, asked=asked)
    assert (report.asked_a8, report.ran_int8) == (2, 2) and report.warnings == []
    assert report.per_layer["model.1.conv"].int8 is False
    # the backend's QCDQ export runs every layer as float: visible, not silent
    before = int8_layers(src, asked=asked)
    assert before.ran_int8 == 0 and before.a8_ran_float == ["model.0.conv", "model.2.conv"]
    assert "2 of 2 layers asked for A8 run as float" in before.warnings[0]


def test_qcdq_target_copies_the_export(tmp_path):
    src = _save(tmp_path, qcdq_model())
    result = lower(src, tmp_path / "same.onnx", target="qcdq")
    assert (tmp_path / "same.onnx").read_bytes() == src.read_bytes()
    assert result.layers["model.0.conv"]["form"] == "as-exported" and result.int8_layers == 0


def test_unsupported_activation_grid_is_an_error_naming_the_layer(tmp_path):
    model = qcdq_model()
    for n in model.graph.node:  # a 4-bit activation grid: Clip between the input Q and DQ
        if n.op_type == "DequantizeLinear" and "input_quant" in n.name:
            from onnx import helper

            clip = helper.make_node("Clip", [n.input[0], "model.0.conv.wlo", "model.0.conv.whi"], ["xclip"],
                                    name="/model.0/conv/input_quant/Clip")
            n.input[0] = "xclip"
            model.graph.node.insert(list(model.graph.node).index(n), clip)
            break
    src = _save(tmp_path, model)
    with pytest.raises(LoweringError, match="model.0.conv.*sub-8-bit"):
        lower(src, tmp_path / "low.onnx", target="ort-cpu")


# --------------------------------------------------------------------------------------
# tensorrt
# --------------------------------------------------------------------------------------
def test_tensorrt_lowering_follows_every_rule(tmp_path):
    src = _save(tmp_path, qcdq_model([{"w_bits": 4, "out_q": False}, {"a8": False, "out_q": False}, {}]))
    assert {v.rule for v in check_tensorrt(src)} >= {"weight-direct", "weight-only-conv"}  # Clip, weight-only DQ
    dst = tmp_path / "trt.onnx"
    result = lower(src, dst, target="tensorrt")
    assert check_tensorrt(dst) == [] and not result.violations
    assert [v["form"] for v in result.layers.values()] == ["qdq-int8", "float-grid", "qdq-int8"]
    model = onnx.load(str(dst))
    index = G.GraphIndex(model)
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = index.const(n.input[2])
            assert zp.dtype == np.int8 and np.all(zp == 0)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert index.const(conv.input[2]).dtype == np.float32  # float bias
    assert any("INT4" in n for n in result.notes)
    x = _x()
    np.testing.assert_allclose(run(onnx.load(str(src)), x), run(model, x), rtol=0, atol=1e-5)


def test_tensorrt_refuses_asymmetric_activations(tmp_path):
    model = qcdq_model([{"out_q": False}])
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == "model.0.conv.xz":
            n.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(np.uint8(7), "model.0.conv.xz"))
    src = _save(tmp_path, model)
    with pytest.raises(LoweringError, match="model.0.conv.*symmetric"):
        lower(src, tmp_path / "trt.onnx", target="tensorrt")


# --------------------------------------------------------------------------------------
# the rule checkers: a graph breaking each rule is caught, with that rule's id
# --------------------------------------------------------------------------------------
def _trt_valid(tmp_path):
    src = _save(tmp_path, qcdq_model([{"out_q": False}, {"a8": False, "out_q": False}]))
    dst = tmp_path / "trt.onnx"
    lower(src, dst, target="tensorrt")
    model = onnx.load(str(dst))
    assert check_tensorrt(model) == []
    return model


def _set_const(model, name, value):
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(value), name))
            return
    raise KeyError(name)


def _break_trt(model, rule):
    from onnx import helper

    g = model.graph
    index = G.GraphIndex(model)
    conv = next(n for n in g.node if n.op_type == "Conv")
    x_dq = index.producer[conv.input[0]]
    w_dq = index.producer[conv.input[1]]
    if rule == "zero-point":
        _set_const(model, x_dq.input[2], np.int8(3))
    elif rule == "int8-type":
        _set_const(model, x_dq.input[2], np.uint8(0))
    elif rule == "scale":
        _set_const(model, x_dq.input[1], np.float32(-0.1))
    elif rule == "activation-per-tensor":
        _set_const(model, x_dq.input[1], np.full(4, 0.05, np.float32))
        x_dq.attribute.append(helper.make_attribute("axis", 1))
    elif rule == "weight-axis":
        for a in w_dq.attribute:
            if a.name == "axis":
                a.i = 1
    elif rule == "weight-direct":
        w = w_dq.input[0]
        g.node.insert(0, helper.make_node("Clip", [w, "", ""], ["w_clipped"], name="clip_w"))
        w_dq.input[0] = "w_clipped"
    elif rule == "weight-range":
        w = index.const(w_dq.input[0]).copy()
        w.reshape(-1)[0] = -128
        _set_const(model, w_dq.input[0], w)
    elif rule == "qdq-pairs":
        q = index.producer[x_dq.input[0]]
        g.node.append(helper.make_node("Cast", [q.output[0]], ["q_cast"], name="cast_q", to=1))
        g.output.append(helper.make_tensor_value_info("q_cast", onnx.TensorProto.FLOAT, None))
    elif rule == "weight-only-conv":
        conv.input[0] = index.producer[x_dq.input[0]].input[0]
    elif rule == "bias-float":
        b = conv.input[2]
        g.initializer.extend([onnx.numpy_helper.from_array(np.zeros(8, np.int32), "b_int"),
                              onnx.numpy_helper.from_array(np.full(8, 0.001, np.float32), "b_s")])
        g.node.insert(0, helper.make_node("DequantizeLinear", ["b_int", "b_s"], ["b_dq"], name="bias_dq", axis=0))
        conv.input[2] = "b_dq"
        del b
    elif rule == "opset":
        model.opset_import[0].version = 12
    else:
        raise AssertionError(rule)


@pytest.mark.parametrize("rule", ["zero-point", "int8-type", "scale", "activation-per-tensor", "weight-axis",
                                  "weight-direct", "weight-range", "qdq-pairs", "weight-only-conv", "bias-float",
                                  "opset"])
def test_tensorrt_checker_catches_each_broken_rule(tmp_path, rule):
    from quantizers.lowering.checks import TENSORRT_RULES

    assert rule in TENSORRT_RULES
    model = _trt_valid(tmp_path)
    _break_trt(model, rule)
    found = {v.rule for v in check_tensorrt(model)}
    assert rule in found, f"{rule} not caught: {found}"


def _ort_valid(tmp_path):
    src = _save(tmp_path, qcdq_model([{}, {"a8": False, "out_q": False}]))
    dst = tmp_path / "ort.onnx"
    lower(src, dst, target="ort-cpu")
    model = onnx.load(str(dst))
    assert check_ort_cpu(model) == []
    return model


def _break_ort(model, rule):
    from onnx import helper

    g = model.graph
    index = G.GraphIndex(model)
    conv = next(n for n in g.node if n.op_type == "Conv" and index.producer.get(n.input[0]) is not None
                and index.producer[n.input[0]].op_type == "DequantizeLinear")
    x_dq, w_dq, b_dq = (index.producer[i] for i in conv.input)
    if rule == "dq-inputs":
        conv.input[2] = "model.1.conv.bias"  # a float initializer
    elif rule == "u8-activations":
        q = index.producer[x_dq.input[0]]
        for node in (q, x_dq):
            node.input[2] = "zp_s8"
        g.initializer.append(onnx.numpy_helper.from_array(np.int8(0), "zp_s8"))
    elif rule == "s8-weights":
        g.node.insert(0, helper.make_node("Clip", [w_dq.input[0], "", ""], ["w_clipped"], name="clip_w"))
        w_dq.input[0] = "w_clipped"
    elif rule == "int32-bias":
        _set_const(model, b_dq.input[1], index.const(b_dq.input[1]) * 2)
    elif rule == "output-q":
        (q,) = index.consumers[conv.output[0]]
        g.node.append(helper.make_node("Relu", [conv.output[0]], ["y_relu"], name="relu"))
        g.output.append(helper.make_tensor_value_info("y_relu", onnx.TensorProto.FLOAT, None))
    elif rule == "no-weight-only-dq":
        other = next(n for n in g.node if n.op_type == "Conv" and n is not conv)
        w = index.const(other.input[1])
        g.initializer.extend([onnx.numpy_helper.from_array(np.zeros(w.shape, np.int8), "w8"),
                              onnx.numpy_helper.from_array(np.float32(0.01), "w8s")])
        g.node.insert(0, helper.make_node("DequantizeLinear", ["w8", "w8s"], ["w8dq"], name="w8_dq"))
        other.input[1] = "w8dq"
    else:
        raise AssertionError(rule)


@pytest.mark.parametrize("rule", ["dq-inputs", "u8-activations", "s8-weights", "int32-bias", "output-q",
                                  "no-weight-only-dq"])
def test_ort_cpu_checker_catches_each_broken_rule(tmp_path, rule):
    from quantizers.lowering.checks import ORT_CPU_RULES

    assert rule in ORT_CPU_RULES
    model = _ort_valid(tmp_path)
    _break_ort(model, rule)
    found = {v.rule for v in check_ort_cpu(model)}
    assert rule in found, f"{rule} not caught: {found}"


def test_strict_deploy_turns_violations_into_an_error(tmp_path):
    from quantizers.lowering import DeploySpec

    src = _save(tmp_path, qcdq_model())
    # a W16A8 layer cannot be an integer kernel on ort-cpu: its float weight stays behind a fake-quant input
    model = qcdq_model([{"w_bits": None, "out_q": False}])
    src = _save(tmp_path, model, "w16a8.onnx")
    result = lower(src, tmp_path / "low.onnx", target="ort-cpu")
    assert result.layers["model.0.conv"]["form"] == "fake-quant" and result.violations
    with pytest.raises(LoweringError, match="deploy.strict"):
        lower(src, tmp_path / "low2.onnx", target="ort-cpu", options=DeploySpec(target="ort-cpu", strict=True))


def test_a16_layer_reading_the_previous_output_quantizer_stays_weight_only(tmp_path):
    # model.0.conv (W8A8, no activation) quantizes its output; model.1.conv (W8A16) reads that
    # dequantized output: it has no input quantizer of its own and must not become an int8 layer
    src = _save(tmp_path, qcdq_model([{"silu": False}, {"a8": False, "out_q": False}]))
    asked = {"model.0.conv": "W8A8", "model.1.conv": "W8A16"}
    dst = tmp_path / "low.onnx"
    result = lower(src, dst, target="ort-cpu", assignment=asked)
    assert result.layers["model.0.conv"]["form"] == "qdq-int8"
    assert result.layers["model.1.conv"]["form"] == "float-grid" and "mismatch" not in result.layers["model.1.conv"]
    assert not result.violations
    x = _x()
    np.testing.assert_allclose(run(onnx.load(str(src)), x), run(onnx.load(str(dst)), x), rtol=0, atol=1e-5)


def test_next_layers_input_quantizer_on_this_output_is_shared(tmp_path):
    # ModelOpt ONNX style: one Q -> DQ on model.0.conv's output is model.1.conv's input quantizer;
    # lowered, the Conv's output must still go to exactly one QuantizeLinear (else no QLinearConv)
    from evaluators.runtime import int8_layers

    # model.1.conv has no Q/DQ of its own: its (8-bit) input is model.0.conv's output quantizer
    src = _save(tmp_path, qcdq_model([{"silu": False}, {"a8": False, "out_q": False}]), "shared.onnx")
    asked = {"model.0.conv": "W8A8", "model.1.conv": "W8A8"}
    result = lower(src, tmp_path / "low.onnx", target="ort-cpu", assignment=asked, images=_x(4))
    assert result.int8_layers == 2 and not result.violations
    low = onnx.load(str(tmp_path / "low.onnx"))
    conv0 = next(n for n in low.graph.node if n.name == "/model.0/conv/Conv")
    assert [n.op_type for n in low.graph.node if conv0.output[0] in n.input] == ["QuantizeLinear"]
    assert int8_layers(tmp_path / "low.onnx", asked=asked).ran_int8 == 2


# --------------------------------------------------------------------------------------
# ort-cpu: the SiLU between A8 layers on integers
# --------------------------------------------------------------------------------------
def test_ort_cpu_silu_between_a8_layers_runs_as_qlinear_sigmoid_and_mul(tmp_path):
    from evaluators.runtime import int8_layers
    from quantizers.lowering import DeploySpec

    # three W8A8 layers with SiLU: the first two SiLUs feed the next layer's input quantizer (int8), the
    # last one is the graph output (stays float)
    src = _save(tmp_path, qcdq_model([{}, {}, {}]))
    on, off = tmp_path / "silu-int8.onnx", tmp_path / "silu-float.onnx"
    result = lower(src, on, target="ort-cpu")
    lower(src, off, target="ort-cpu", options=DeploySpec(target="ort-cpu", int8_silu=False))
    acts = result.metadata["activations"]
    assert {k: acts[k] for k in ("silu_int8", "silu_float")} == {"silu_int8": 2, "silu_float": 1}
    assert acts["int8_ops"] == {}  # deploy.int8_ops: nothing between these layers but the SiLU
    assert not result.violations and check_ort_cpu(on) == []
    model = onnx.load(str(on))
    index = G.GraphIndex(model)
    sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == 3
    for sig in (n for n in sigmoids if not n.name.startswith("/model.2/")):
        x_dq = index.producer[sig.input[0]]
        assert x_dq.op_type == "DequantizeLinear" and index.consumers[sig.input[0]] == [sig], "its own DQ"
        (q,) = index.consumers[sig.output[0]]
        assert q.op_type == "QuantizeLinear" and index.const(q.input[2]).dtype == np.uint8
        (mul,) = (n for n in model.graph.node if n.op_type == "Mul" and n.name.startswith(sig.name.rsplit("/", 1)[0]))
        assert all(index.producer[i].op_type == "DequantizeLinear" for i in mul.input)
        assert {u.op_type for u in index.consumers[mul.output[0]]} == {"QuantizeLinear"}
    asked = {f"model.{k}.conv": "W8A8" for k in range(3)}
    report = int8_layers(on, asked=asked)
    assert report.ran_int8 == 3 and report.int8_activation_ops == {"com.microsoft.QLinearMul": 2,
                                                                   "com.microsoft.QLinearSigmoid": 2}
    assert int8_layers(off, asked=asked).int8_activation_ops == {}
    # the same function up to the Sigmoid's 8-bit grid (a fraction of the next quantizer's step)
    x = _x()
    a, b = run(onnx.load(str(on)), x, optimize=True), run(onnx.load(str(off)), x, optimize=True)
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()


def test_ort_cpu_checker_catches_a_broken_activation_unit(tmp_path):
    from onnx import helper

    src = _save(tmp_path, qcdq_model([{}, {}]))
    dst = tmp_path / "low.onnx"
    lower(src, dst, target="ort-cpu")
    model = onnx.load(str(dst))
    assert check_ort_cpu(model) == []
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.name.startswith("/model.0/"))
    model.graph.node.append(helper.make_node("Relu", [mul.output[0]], ["mul_relu"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("mul_relu", onnx.TensorProto.FLOAT, None))
    found = [v for v in check_ort_cpu(model) if v.rule == "activation-unit"]
    assert found and found[0].node == mul.name and "Relu" in found[0].message


def test_int8_activation_pairs_become_uint8_on_the_same_grid():
    """ort-cpu: a backend's int8 activation Q -> DQ (ModelOpt ONNX quantizes Add/Split outputs so)
    becomes uint8 with zero point + 128: same outputs, exactly; weights' Q/DQ are left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quantizers.lowering.ort_cpu import activations_to_uint8

    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(3, np.int8), "z"),
             numpy_helper.from_array(np.array(0.5, np.float32), "w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("Mul", ["d", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).normal(0, 4, (4, 64)).astype(np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert activations_to_uint8(model) == 1
    zps = {n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    (zp,) = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name in zps]
    assert zp.dtype == np.uint8 and int(zp) == 131
    assert np.array_equal(run(model), before)
    assert activations_to_uint8(model) == 0  # already uint8
