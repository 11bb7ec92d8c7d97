"""Layer name <-> ONNX node mapping on small hand-built graphs (no model, no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from mpq.assignment import LayerInfo
from mpq.onnx_nodes import module_name_from_node
from quantizers.onnx_names import OnnxNameError, map_layers_to_nodes, weight_source


@pytest.mark.parametrize("node, module", [
    ("/model.0/conv/Conv", "model.0.conv"),
    ("/model.8/m.1/cv1/cv1.0/conv/Conv", "model.8.m.1.cv1.0.conv"),
    ("/model.23/one2one_cv2.2/one2one_cv2.2.0/conv/Conv", "model.23.one2one_cv2.2.0.conv"),
    ("/model.23/one2one_cv3.1/one2one_cv3.1.1/one2one_cv3.1.1.0/conv/Conv", "model.23.one2one_cv3.1.1.0.conv"),
    ("/model.22/cv2.1/cv2.1.2/Conv", "model.22.cv2.1.2"),
    ("/model.2/m/m.0/cv1/conv/Conv_1", "model.2.m.0.cv1.conv"),  # a called Sequential 'm', duplicate op suffix
    ("/model.10/attn/proj/conv/Conv", "model.10.attn.proj.conv"),
    ("Conv_12", None),
    ("node_conv2d", None),
    ("/Conv", None),
])
def test_module_name_from_node(node, module):
    assert module_name_from_node(node) == module


def _layer(name: str, cin: int, cout: int, k: int = 3, groups: int = 1, index: int = 0) -> LayerInfo:
    return LayerInfo(name, "Conv2d", cin, cout, (k, k), (1, 1), groups, cout * cin // groups * k * k, 0, index,
                     name.rsplit(".", 1)[0])


def _graph(convs: list[tuple[str, str, tuple[int, ...]]], quantize_weight: str | None = None):
    """A chain of Conv nodes: (node name, weight initializer name, weight shape)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "images"
    for i, (node_name, wname, shape) in enumerate(convs):
        w = rng.standard_normal(shape).astype(np.float32)
        inits.append(numpy_helper.from_array(w, wname))
        w_in = wname
        if wname == quantize_weight:  # float weight -> Q -> DQ, as ModelOpt/ORT write it
            inits += [numpy_helper.from_array(np.full((shape[0],), 0.01, np.float32), f"{wname}_scale"),
                      numpy_helper.from_array(np.zeros((shape[0],), np.int8), f"{wname}_zp")]
            nodes += [helper.make_node("QuantizeLinear", [wname, f"{wname}_scale", f"{wname}_zp"], [f"{wname}_q"],
                                       name=f"{wname}_QuantizeLinear", axis=0),
                      helper.make_node("DequantizeLinear", [f"{wname}_q", f"{wname}_scale", f"{wname}_zp"],
                                       [f"{wname}_dq"], name=f"{wname}_DequantizeLinear", axis=0)]
            w_in = f"{wname}_dq"
        out = f"y{i}"
        nodes.append(helper.make_node("Conv", [x, w_in], [out], name=node_name,
                                      pads=[shape[2] // 2] * 4, kernel_shape=list(shape[2:])))
        x = out
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), inits


def test_maps_by_weight_name_and_scope_through_qdq():
    model, _ = _graph([("/model.0/conv/Conv", "model.0.conv.weight", (8, 3, 3, 3)),
                       ("/model.1/cv1/cv1.0/conv/Conv", "model.1.cv1.0.conv.weight", (16, 8, 1, 1))],
                      quantize_weight="model.1.cv1.0.conv.weight")
    layers = [_layer("model.0.conv", 3, 8), _layer("model.1.cv1.0.conv", 8, 16, k=1, index=1)]
    nmap = map_layers_to_nodes(model, layers)
    assert nmap.nodes == {"model.0.conv": "/model.0/conv/Conv", "model.1.cv1.0.conv": "/model.1/cv1/cv1.0/conv/Conv"}
    assert nmap.matches["model.1.cv1.0.conv"].methods == ("scope", "weight-name")
    assert nmap.matches["model.1.cv1.0.conv"].weight == "model.1.cv1.0.conv.weight"
    assert nmap.layer("/model.0/conv/Conv") == "model.0.conv" and nmap.layer("nope") is None
    conv = [n for n in model.graph.node if n.op_type == "Conv"][1]
    assert weight_source(model, conv.input[1]) == "model.1.cv1.0.conv.weight"


def test_renamed_weights_and_unscoped_names_need_the_content_clue():
    model, inits = _graph([("Conv_0", "onnx::Conv_101", (8, 3, 3, 3)), ("Conv_1", "onnx::Conv_102", (16, 8, 1, 1))])
    layers = [_layer("model.0.conv", 3, 8), _layer("model.1.conv", 8, 16, k=1, index=1)]
    with pytest.raises(OnnxNameError, match=r"'model.0.conv' \(Conv2d\) matches no Conv node"):
        map_layers_to_nodes(model, layers, source="renamed.onnx")
    from onnx import numpy_helper

    weights = {"model.0.conv": numpy_helper.to_array(inits[0]), "model.1.conv": numpy_helper.to_array(inits[1])}
    nmap = map_layers_to_nodes(model, layers, weights=weights)
    assert nmap.nodes == {"model.0.conv": "Conv_0", "model.1.conv": "Conv_1"}
    assert nmap.matches["model.0.conv"].methods == ("weight-content",)


def test_shape_mismatch_and_missing_layers_are_named():
    model, _ = _graph([("/model.0/conv/Conv", "model.0.conv.weight", (8, 3, 3, 3))])
    with pytest.raises(OnnxNameError) as err:
        map_layers_to_nodes(model, [_layer("model.0.conv", 3, 16), _layer("model.5.conv", 8, 8, index=1)],
                            source="demo.onnx")
    text = str(err.value)
    assert text.startswith("demo.onnx: cannot map layers")
    assert "'model.0.conv'" in text and "(8, 3, 3, 3)" in text and "(16, 3, 3, 3)" in text
    assert "'model.5.conv'" in text


def test_two_layers_cannot_claim_one_node():
    # the scope says model.0.conv, the weight name says model.1.conv: each clue alone picks the node
    model, _ = _graph([("/model.0/conv/Conv", "model.1.conv.weight", (8, 3, 3, 3))])
    with pytest.raises(OnnxNameError, match="matches both layer 'model.0.conv' and layer 'model.1.conv'"):
        map_layers_to_nodes(model, [_layer("model.0.conv", 3, 8), _layer("model.1.conv", 3, 8, index=1)])
