"""``deploy.int8_ops`` (:mod:`quantizers.lowering.ort_cpu_ops`) on a small hand-built C2f-like
graph: Split, a bottleneck Add, MaxPool and Concat between three W8A8 layers become the QDQ
units ONNX Runtime runs on uint8 (QLinearConcat, QLinearAdd, Q/DQ dropped)."""

from __future__ import annotations

import numpy as np
import onnx
from lowering_helpers import conv_block, run

from quantizers.lowering import DeploySpec, lower
from quantizers.lowering import graph as G
from quantizers.lowering.checks import check_ort_cpu

ASKED = {f"model.{k}.conv": "W8A8" for k in range(3)}


def _x(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.0, (n, 4, 8, 8)).astype(np.float32)


def c2f_like(tmp_path, *, concat_is_output: bool = False, cast: bool = False):
    """conv0 (SiLU) -> Split -> a, b; conv1(b) (SiLU) -> Add(b, .) -> c; MaxPool(c) -> p;
    Concat(a, b, c, p) -> conv2 (SiLU) -> output (or the Concat is the output). ``cast``: b
    goes through a float -> float Cast first (as in ModelOpt's exported quantizers)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    t0 = conv_block(nodes, inits, layer="model.0.conv", x="images", cin=4, cout=8, seed=0)
    inits.append(numpy_helper.from_array(np.array([4, 4], dtype=np.int64), "split_sizes"))
    nodes.append(helper.make_node("Split", [t0, "split_sizes"], ["a", "b0" if cast else "b"], name="/model.1/Split",
                                  axis=1))
    if cast:
        nodes.append(helper.make_node("Cast", ["b0"], ["b"], name="/model.1/Cast", to=TensorProto.FLOAT))
    m = conv_block(nodes, inits, layer="model.1.conv", x="b", cin=4, cout=4, seed=1)
    nodes.append(helper.make_node("Add", ["b", m], ["c"], name="/model.1/Add"))
    nodes.append(helper.make_node("MaxPool", ["c"], ["p"], name="/model.1/MaxPool", kernel_shape=[3, 3],
                                  pads=[1, 1, 1, 1], strides=[1, 1]))
    nodes.append(helper.make_node("Concat", ["a", "b", "c", "p"], ["d"], name="/model.1/Concat", axis=1))
    out = "d" if concat_is_output else conv_block(nodes, inits, layer="model.2.conv", x="d", cin=16, cout=8, seed=2)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                         ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "src.onnx"
    onnx.save(model, str(path))
    return path


def test_float_to_float_casts_do_not_hide_the_ops(tmp_path):
    src = c2f_like(tmp_path, cast=True)
    result = lower(src, tmp_path / "low.onnx", target="ort-cpu", assignment=ASKED, images=_x(8))
    assert result.metadata["activations"]["int8_ops"] == {"Add": 1, "Concat": 1, "MaxPool": 1, "SiLU": 2, "Split": 1}
    assert "Cast" not in G.op_counts(onnx.load(str(tmp_path / "low.onnx"))) and not result.violations


def _optimized_ops(path, tmp_path) -> dict[str, int]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return G.op_counts(onnx.load(str(tmp_path / "optimized.onnx")))


def test_ops_between_a8_layers_become_uint8_units(tmp_path):
    from evaluators.runtime import int8_layers

    src = c2f_like(tmp_path)
    on, off = tmp_path / "ops-int8.onnx", tmp_path / "ops-float.onnx"
    result = lower(src, on, target="ort-cpu", assignment=ASKED, images=_x(8), cache_dir=tmp_path / "cache")
    lower(src, off, target="ort-cpu", assignment=ASKED, options=DeploySpec(target="ort-cpu", int8_ops=False))
    acts = result.metadata["activations"]
    assert acts["int8_ops"] == {"Add": 1, "Concat": 1, "MaxPool": 1, "SiLU": 2, "Split": 1}
    # conv0's SiLU feeds the Split, conv1's the Add only (its grid calibrated); conv2's is the graph output
    assert acts["int8_ops_calibrated"] == 1 and acts["silu_int8"] == 2 and acts["silu_float"] == 1
    assert not result.violations and check_ort_cpu(on) == []
    model = onnx.load(str(on))
    index = G.GraphIndex(model)
    for op in ("Split", "Add", "MaxPool", "Concat"):
        (node,) = (n for n in model.graph.node if n.op_type == op)
        data = node.input[:1] if op in ("Split", "MaxPool") else node.input
        assert all(index.producer[t].op_type == "DequantizeLinear" and len(index.consumers[t]) == 1 for t in data)
        for o in node.output:
            (q,) = index.consumers[o]
            assert q.op_type == "QuantizeLinear" and index.const(q.input[2]).dtype == np.uint8
    # Split and MaxPool: one grid in and out (ONNX Runtime drops their Q/DQ)
    for op in ("Split", "MaxPool"):
        node = next(n for n in model.graph.node if n.op_type == op)
        grids = {(float(index.const(x.input[1])), int(index.const(x.input[2])))
                 for x in [index.producer[node.input[0]]] + [index.consumers[o][0] for o in node.output]}
        assert len(grids) == 1, op
    ops = _optimized_ops(on, tmp_path)
    assert ops.get("com.microsoft.QLinearConcat") == 1 and ops.get("com.microsoft.QLinearAdd") == 1
    # float ops left: the last SiLU (the graph output); the one quantizer left quantizes the image
    assert not {"Add", "Concat", "MaxPool"} & set(ops) and ops["Sigmoid"] == 1 and ops["QuantizeLinear"] == 1, ops
    off_ops = _optimized_ops(off, tmp_path)
    assert ops.get("DequantizeLinear", 0) + ops.get("QuantizeLinear", 0) < (
        off_ops.get("DequantizeLinear", 0) + off_ops.get("QuantizeLinear", 0))
    report = int8_layers(on, asked=ASKED)
    assert report.ran_int8 == 3
    assert report.int8_activation_ops["com.microsoft.QLinearConcat"] == 1
    # the same function up to the new 8-bit grids
    x = _x(seed=1)
    a, b = run(onnx.load(str(on)), x, optimize=True), run(onnx.load(str(off)), x, optimize=True)
    assert np.abs(a - b).max() < 0.1 * np.abs(b).max()
    again = lower(src, tmp_path / "again.onnx", target="ort-cpu", assignment=ASKED, images=_x(8),
                  cache_dir=tmp_path / "cache")
    assert again.metadata["activations"]["int8_ops_calibration"]["cached"] is True


def test_option_off_leaves_the_ops_float(tmp_path):
    src = c2f_like(tmp_path)
    off = tmp_path / "off.onnx"
    result = lower(src, off, target="ort-cpu", assignment=ASKED, images=_x(8),
                   options=DeploySpec(target="ort-cpu", int8_ops=False))
    assert "int8_ops" not in result.metadata["activations"]
    model = onnx.load(str(off))
    index = G.GraphIndex(model)
    for op in ("Split", "Add", "MaxPool", "Concat"):
        node = next(n for n in model.graph.node if n.op_type == op)
        assert all(index.producer[t].op_type != "DequantizeLinear" for t in node.input if t in index.producer), op
    ops = _optimized_ops(off, tmp_path)
    assert "com.microsoft.QLinearConcat" not in ops and "com.microsoft.QLinearAdd" not in ops


def test_without_images_or_next_to_float_ops_they_stay_float(tmp_path):
    # without calibration images the SiLU read by the Add only has no grid: it, the Add, and
    # everything that reads them stay float, and the lowering still succeeds
    src = c2f_like(tmp_path)
    result = lower(src, tmp_path / "no-images.onnx", target="ort-cpu", assignment=ASKED)
    assert result.metadata["activations"]["int8_ops"] == {} and not result.violations
    # a Concat that is the graph output cannot end in a quantizer: nothing before it changes either
    src = c2f_like(tmp_path, concat_is_output=True)
    asked = {k: v for k, v in ASKED.items() if k != "model.2.conv"}
    result = lower(src, tmp_path / "out.onnx", target="ort-cpu", assignment=asked, images=_x(8))
    assert result.metadata["activations"]["int8_ops"] == {} and not result.violations


def test_checker_catches_a_broken_concat_unit(tmp_path):
    from onnx import helper

    src = c2f_like(tmp_path)
    dst = tmp_path / "low.onnx"
    lower(src, dst, target="ort-cpu", assignment=ASKED, images=_x(8))
    model = onnx.load(str(dst))
    assert check_ort_cpu(model) == []
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    model.graph.node.append(helper.make_node("Relu", [concat.output[0]], ["concat_relu"], name="relu"))
    model.graph.output.append(helper.make_tensor_value_info("concat_relu", onnx.TensorProto.FLOAT, None))
    found = [v for v in check_ort_cpu(model) if v.rule == "activation-unit"]
    assert found and found[0].node == concat.name and "Relu" in found[0].message


def test_a_group_read_by_layers_on_two_grids_takes_the_wider_one(tmp_path):
    # conv0 (SiLU) -> MaxPool -> conv2 (input grid 0.05) and conv3 (input grid 0.1): the MaxPool's
    # input and output share the wider grid (0.1), conv2's input quantizer re-quantizes from it
    from onnx import TensorProto, helper

    from evaluators.runtime import int8_layers

    nodes, inits = [], []
    t0 = conv_block(nodes, inits, layer="model.0.conv", x="images", cin=4, cout=8, seed=0)
    nodes.append(helper.make_node("MaxPool", [t0], ["p"], name="/model.1/MaxPool", kernel_shape=[2, 2],
                                  strides=[2, 2]))
    outs = [conv_block(nodes, inits, layer=f"model.{k}.conv", x="p", cin=8, cout=8, seed=k, x_scale=s)
            for k, s in ((2, 0.05), (3, 0.1))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                         ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", "c", "h", "w"])
                               for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, dst = tmp_path / "src.onnx", tmp_path / "low.onnx"
    onnx.save(model, str(src))
    asked = {f"model.{k}.conv": "W8A8" for k in (0, 2, 3)}
    result = lower(src, dst, target="ort-cpu", assignment=asked)  # no images: no calibrated grid needed
    acts = result.metadata["activations"]
    assert acts["int8_ops"] == {"MaxPool": 1, "SiLU": 1} and acts["int8_ops_requantized"] == 1
    low = onnx.load(str(dst))
    index = G.GraphIndex(low)
    pool = next(n for n in low.graph.node if n.op_type == "MaxPool")
    (q,) = index.consumers[pool.output[0]]
    assert float(index.const(q.input[1])) == np.float32(0.1)
    assert float(index.const(index.producer[pool.input[0]].input[1])) == np.float32(0.1)
    assert not result.violations and int8_layers(dst, asked=asked).ran_int8 == 3
    assert "MaxPool" not in _optimized_ops(dst, tmp_path)  # runs on uint8 (NhwcMaxPool), Q/DQ dropped
