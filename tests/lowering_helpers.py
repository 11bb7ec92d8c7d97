"""Small hand-built Q/DQ graphs (onnx.helper) for the lowering and rule-checker tests.

:func:`qcdq_model` builds one or two convolutions the way the backends export them:
``x -> QuantizeLinear(int8) -> DequantizeLinear -> Conv(W: int8 -> Clip -> DequantizeLinear,
B: float) [-> QuantizeLinear -> DequantizeLinear] -> Sigmoid/Mul (SiLU)``, with node names
in the legacy exporter's scope style (``/model.0/conv/Conv``), so layer names resolve.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _const(name: str, value: Any) -> Any:
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], name=f"{name}/Constant", value=numpy_helper.from_array(
        np.asarray(value), name))


def conv_block(nodes: list[Any], inits: list[Any], *, layer: str, x: str, cin: int, cout: int, seed: int,
               a8: bool = True, w_bits: int | None = 8, clip: bool = True, out_q: bool = True,
               silu: bool = True, x_scale: float = 0.05, bias_on_grid: bool = True) -> str:
    """Append one layer's nodes; return its output tensor (after SiLU if ``silu``)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    parts = layer.split(".")  # model.0.conv -> /model.0/conv (the legacy exporter's scopes)
    scope = "/" + ".".join(parts[:2]) + "/" + "/".join(parts[2:]) if len(parts) > 2 else "/" + layer
    p = layer
    conv_in = x
    if a8:
        nodes.append(_const(f"{p}.xs", np.float32(x_scale)))
        nodes.append(_const(f"{p}.xz", np.int8(0)))
        nodes.append(helper.make_node("QuantizeLinear", [x, f"{p}.xs", f"{p}.xz"], [f"{p}.xq"],
                                      name=f"{scope}/input_quant/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.xq", f"{p}.xs", f"{p}.xz"], [f"{p}.xdq"],
                                      name=f"{scope}/input_quant/DequantizeLinear"))
        conv_in = f"{p}.xdq"
    w_scale = (rng.uniform(0.005, 0.02, cout)).astype(np.float32)
    if w_bits is None:
        w = rng.normal(0, 0.1, (cout, cin, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{p}.weight"))
        w_in = f"{p}.weight"
    else:
        hi = 7 if w_bits == 4 else 127
        q = rng.integers(-hi, hi + 1, (cout, cin, 3, 3)).astype(np.int8)
        nodes.append(_const(f"{p}.wq", q))
        w_src = f"{p}.wq"
        if clip:
            nodes.append(_const(f"{p}.wlo", np.int8(-hi)))
            nodes.append(_const(f"{p}.whi", np.int8(hi)))
            nodes.append(helper.make_node("Clip", [f"{p}.wq", f"{p}.wlo", f"{p}.whi"], [f"{p}.wclip"],
                                          name=f"{scope}/weight_quant/Clip"))
            w_src = f"{p}.wclip"
        nodes.append(_const(f"{p}.ws", w_scale))
        nodes.append(_const(f"{p}.wz", np.zeros(cout, np.int8)))
        nodes.append(helper.make_node("DequantizeLinear", [w_src, f"{p}.ws", f"{p}.wz"], [f"{p}.wdq"],
                                      name=f"{scope}/weight_quant/DequantizeLinear", axis=0))
        w_in = f"{p}.wdq"
    bias = rng.normal(0, 0.5, cout).astype(np.float32)
    if bias_on_grid and a8 and w_bits is not None:
        step = (np.float32(x_scale) * w_scale).astype(np.float32)
        bias = (np.rint(bias / step) * step).astype(np.float32)
    inits.append(numpy_helper.from_array(bias, f"{p}.bias"))
    nodes.append(helper.make_node("Conv", [conv_in, w_in, f"{p}.bias"], [f"{p}.y"], name=f"{scope}/Conv",
                                  pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
    y = f"{p}.y"
    if out_q:
        nodes.append(_const(f"{p}.ys", np.float32(0.1)))
        nodes.append(_const(f"{p}.yz", np.int8(0)))
        nodes.append(helper.make_node("QuantizeLinear", [y, f"{p}.ys", f"{p}.yz"], [f"{p}.yq"],
                                      name=f"{scope}/output_quant/QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.yq", f"{p}.ys", f"{p}.yz"], [f"{p}.ydq"],
                                      name=f"{scope}/output_quant/DequantizeLinear"))
        y = f"{p}.ydq"
    if silu:
        nodes.append(helper.make_node("Sigmoid", [y], [f"{p}.sig"], name=f"{scope}/act/Sigmoid"))
        nodes.append(helper.make_node("Mul", [y, f"{p}.sig"], [f"{p}.out"], name=f"{scope}/act/Mul"))
        y = f"{p}.out"
    return y


def qcdq_model(layers: list[dict[str, Any]] | None = None, *, opset: int = 17, cin: int = 4) -> Any:
    """A chain of :func:`conv_block` layers (default: one W8A8 layer with an output quantizer)."""
    from onnx import TensorProto, helper

    layers = layers if layers is not None else [{}]
    nodes: list[Any] = []
    inits: list[Any] = []
    x = "images"
    c = cin
    for k, spec in enumerate(layers):
        cout = spec.pop("cout", 8)
        x = conv_block(nodes, inits, layer=spec.pop("layer", f"model.{k}.conv"), x=x, cin=c, cout=cout,
                       seed=k, **spec)
        c = cout
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                         ["batch", cin, 8, 8])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def run(model: Any, x: np.ndarray, *, optimize: bool = False) -> np.ndarray:
    """Run ``model`` in ONNX Runtime (graph optimizations off unless ``optimize``)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]
