"""The ModelOpt ONNX INT8 backend on the demo detector: exclusions by node name, shared
quantized inputs of float layers, capabilities, files, and ModelOpt's own Conv rule."""

from __future__ import annotations

import numpy as np
import pytest
from quantizer_helpers import workdir

pytest.importorskip("modelopt.onnx.quantization", reason="the 'modelopt' extra is not installed")

from mpq.assignment import Assignment, LayerInfo, Precision  # noqa: E402
from quantizers import UnsupportedPrecisionError, get_backend  # noqa: E402
from quantizers.modelopt_onnx_backend import (  # noqa: E402
    CAPABILITIES,
    ModelOptOnnxBackend,
    _modelopt_unsupported_convs,
    int8_conv_supported,
)
from quantizers.modelopt_onnx_options import ModelOptOnnxOptions  # noqa: E402
from quantizers.onnx_inspect import layer_precisions  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    return ModelOptOnnxBackend(options=ModelOptOnnxOptions(calibration="max"))


def test_only_w8a8_or_float_per_conv(demo_model):
    assert CAPABILITIES.allowed("Conv2d") == {Precision(8, 8), Precision(16, 16)}
    assert CAPABILITIES.allowed("Linear") == {Precision(16, 16)}
    layer = demo_model.quantizable_layers[0]
    for p in ("W4A8", "W4A16", "W8A16", "W16A8"):
        assert not CAPABILITIES.supports(layer, Precision.parse(p))
    assert all(CAPABILITIES.supports(lay, Precision(8, 8)) for lay in demo_model.quantizable_layers)


def test_head_layers_sharing_an_input_keep_their_own_precision(backend, demo_model, calib):
    """The box (cv2) and class (cv3) branches of the head read the same feature map: quantize
    one branch only. ModelOpt puts one Q/DQ pair on the shared tensor and feeds it to both;
    the backend rewires the float branch to the float tensor."""
    box = [lay.name for lay in demo_model.quantizable_layers if ".one2one_cv2." in lay.name]
    a = Assignment.uniform(box, "W8A8")
    qmodel = backend.materialize(demo_model, a, calib)
    assert qmodel.module is None and qmodel.onnx_path is not None and qmodel.onnx_path.is_file()
    rewired = qmodel.info["graph_check"]["rewired_float_inputs"]
    assert any(".one2one_cv3." in n for n in rewired)
    assert qmodel.info["nodes_quantized"] == len(box)
    result = backend.export(qmodel, workdir() / "modelopt-onnx" / "head-box.onnx")
    found = {n: g.label for n, g in layer_precisions(result.path).items()}
    assert {n for n, label in found.items() if label != "W16A16"} == set(box)
    assert all(found[n] == "W8A8" for n in box)
    assert result.node_counts["DequantizeLinear"] == len(box) + result.node_counts["QuantizeLinear"]


def test_files_metadata_and_float_export_reuse(backend, demo_model, calib):
    import json

    import onnx

    a = Assignment.uniform(demo_model.quantizable_layers[::3], "W8A8")
    q1 = backend.materialize(demo_model, a, calib)
    q2 = backend.materialize(demo_model, Assignment({}), calib)
    assert q2.info["float_onnx_cached"] is True and q2.info["nodes_quantized"] == 0
    assert q1.timings["quantize"] > 0 and "total" in q1.timings
    out = workdir() / "modelopt-onnx" / "every-third.onnx"
    result = backend.export(q1, out)
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["backend"] == "modelopt-onnx" and meta["assignment"]["digest"] == a.digest()
    assert meta["options"]["calibration"] == "max" and meta["opset"] >= 17
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["yolo_mpq.backend"] == "modelopt-onnx" and props["yolo_mpq.assignment_digest"] == a.digest()
    # dq_only: quantized weights are int8 initializers, no float copy
    proto = onnx.load(str(result.path))
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8) == len(a)


def test_calibration_method_reaches_modelopt(demo_model, calib):
    """max and entropy give different input scales (entropy clips the long tails)."""
    import onnx
    from onnx import numpy_helper

    a = Assignment.uniform(demo_model.quantizable_layers[10:30], "W8A8")
    scales = {}
    for method in ("max", "entropy"):
        be = get_backend(ModelOptOnnxOptions(calibration=method))
        q = be.materialize(demo_model, a, calib)
        proto = onnx.load(str(q.onnx_path))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        scales[method] = {n.input[0]: float(inits[n.input[1]]) for n in proto.graph.node
                          if n.op_type == "QuantizeLinear"}
    assert scales["max"].keys() == scales["entropy"].keys()
    smaller = [t for t in scales["max"] if scales["entropy"][t] < 0.99 * scales["max"][t]]
    assert smaller, "entropy calibration clipped no input range"
    assert all(scales["entropy"][t] <= scales["max"][t] * 1.0001 for t in scales["max"])


def _small_conv_layers() -> list[LayerInfo]:
    def lay(i, cin, cout, k, groups=1):
        return LayerInfo(f"model.{i}.conv", "Conv2d", cin, cout, (k, k), (1, 1), groups, 0, 0, i, f"model.{i}")

    return [lay(0, 3, 8, 3), lay(1, 8, 8, 3), lay(2, 8, 12, 3), lay(3, 12, 12, 1), lay(4, 12, 24, 1),
            lay(5, 24, 24, 3, groups=24), lay(6, 24, 12, 1), lay(7, 12, 12, 3, groups=12), lay(8, 12, 4, 1),
            lay(9, 4, 32, 3)]


def _chain_onnx(layers: list[LayerInfo]):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "images"
    for lay in layers:
        shape = (lay.out_channels, lay.in_channels // lay.groups, *lay.kernel)
        w = numpy_helper.from_array(np.ones(shape, np.float32), f"{lay.name}.weight")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, w.name], [lay.name], name="/" + lay.name.replace(".", "/") + "/Conv",
                                      group=lay.groups, kernel_shape=list(lay.kernel), pads=[lay.kernel[0] // 2] * 4))
        x = lay.name
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_capability_rule_matches_modelopts_own():
    """Small convolutions: our per-layer rule says what ModelOpt's INT8 mode will exclude."""
    layers = _small_conv_layers()
    excluded = set(_modelopt_unsupported_convs(_chain_onnx(layers)))
    ours = {"/" + lay.name.replace(".", "/") + "/Conv" for lay in layers if not int8_conv_supported(lay)[0]}
    assert ours == excluded
    assert excluded and len(excluded) < len(layers)  # the case exercises both outcomes


def test_a_refused_small_conv_is_an_error_naming_it():
    layers = _small_conv_layers()
    bad = next(lay for lay in layers if not int8_conv_supported(lay)[0])
    with pytest.raises(UnsupportedPrecisionError, match=rf"'{bad.name}'.*ModelOpt does not quantize"):
        CAPABILITIES.check(layers, Assignment({bad.name: "W8A8"}))
