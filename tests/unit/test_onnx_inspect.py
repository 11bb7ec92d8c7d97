"""Reading a layer's precision back from the Q/DQ patterns of a graph (quantizers/onnx_inspect.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mpq.onnx_nodes import module_name_from_node
from quantizers.onnx_inspect import layer_precisions


def _conv_graph(weight_nodes: list, weight_inits: list, weight_out: str, *, quant_input: bool) -> onnx.ModelProto:
    inits = [*weight_inits, numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp")]
    nodes = list(weight_nodes)
    x = "x"
    if quant_input:
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="/model.3/conv/xq"),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="/model.3/conv/xdq")]
        x = "xdq"
    nodes.append(helper.make_node("Conv", [x, weight_out], ["y"], name="/model.3/conv/Conv"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _w_scale() -> onnx.TensorProto:
    return numpy_helper.from_array(np.full([3], 0.1, np.float32), "w_scale")


def test_float_weight_quantized_in_graph_to_int8_is_8_bits():
    """float -> QuantizeLinear(int8 zero point 0) -> DequantizeLinear holds 8-bit weights, not 4."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=[3, 2, 1, 1]).astype(np.float32), "w")
    zp = numpy_helper.from_array(np.zeros([3], np.int8), "w_zp")
    nodes = [helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="/model.3/conv/wq", axis=0),
             helper.make_node("DequantizeLinear", ["wq", "w_scale", "w_zp"], ["wdq"], name="/model.3/conv/wdq", axis=0)]
    prec = layer_precisions(_conv_graph(nodes, [w, _w_scale(), zp], "wdq", quant_input=True))["model.3.conv"]
    assert (prec.w_bits, prec.a_bits) == (8, 8)


def test_float_weight_quantized_with_clip_reads_the_clip_range():
    w = numpy_helper.from_array(np.ones([3, 2, 1, 1], np.float32), "w")
    zp = numpy_helper.from_array(np.zeros([3], np.int8), "w_zp")
    lo = numpy_helper.from_array(np.array(-8, np.int8), "lo")
    hi = numpy_helper.from_array(np.array(7, np.int8), "hi")
    nodes = [helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["wq"], name="/model.3/conv/wq", axis=0),
             helper.make_node("Clip", ["wq", "lo", "hi"], ["wc"], name="/model.3/conv/clip"),
             helper.make_node("DequantizeLinear", ["wc", "w_scale", "w_zp"], ["wdq"], name="/model.3/conv/wdq", axis=0)]
    prec = layer_precisions(_conv_graph(nodes, [w, _w_scale(), zp, lo, hi], "wdq", quant_input=False))
    assert (prec["model.3.conv"].w_bits, prec["model.3.conv"].a_bits) == (4, 16)


@pytest.mark.parametrize(("values", "bits"), [([-8, 7], 4), ([-100, 90], 8)])
def test_integer_initializer_bits_follow_its_values(values, bits):
    q = np.array(values * 3, np.int8).reshape(3, 2, 1, 1)
    nodes = [helper.make_node("DequantizeLinear", ["wq", "w_scale"], ["wdq"], name="/model.3/conv/wdq", axis=0)]
    prec = layer_precisions(_conv_graph(nodes, [numpy_helper.from_array(q, "wq"), _w_scale()], "wdq",
                                        quant_input=False))
    assert prec["model.3.conv"].w_bits == bits


def test_unquantized_conv_is_float():
    w = numpy_helper.from_array(np.ones([3, 2, 1, 1], np.float32), "w")
    prec = layer_precisions(_conv_graph([], [w], "w", quant_input=False))["model.3.conv"]
    assert (prec.w_bits, prec.a_bits, prec.weight_detail) == (16, 16, "float")


def test_layer_name_from_node_scopes():
    assert module_name_from_node("/model.0/conv/Conv") == "model.0.conv"
    assert module_name_from_node("/model.23/one2one_cv2.0/one2one_cv2.0.2/Conv") == "model.23.one2one_cv2.0.2"
    assert module_name_from_node("Conv_12") is None
