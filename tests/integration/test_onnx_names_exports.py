"""Layer -> ONNX node mapping on real exports: the demo YOLOv10n, yolov10m.yaml and yolov8n.yaml
(float, through mpq.model.export_onnx), where weight names and scopes must agree."""

from __future__ import annotations

import pytest

from mpq.model import export_onnx, load_model
from mpq.onnx_nodes import module_name_from_node
from quantizers.onnx_names import map_layers_to_nodes


def _check(model, path):
    import onnx

    proto = onnx.load(str(path))
    weights = {lay.name: model.module.get_submodule(lay.name).weight.detach().numpy() for lay in model.layers}
    nmap = map_layers_to_nodes(proto, model.layers, weights=weights)
    assert len(nmap) == len(model.layers)
    assert len(set(nmap.nodes.values())) == len(model.layers)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == len(model.layers)  # every Conv node is one of our layers
    for lay in model.layers:
        m = nmap.matches[lay.name]
        assert m.methods == ("scope", "weight-name"), (lay.name, m)
        assert module_name_from_node(m.node) == lay.name
    return nmap


def test_demo_model(demo_model, tmp_path):
    nmap = _check(demo_model, export_onnx(demo_model.module, tmp_path / "demo.onnx", demo_model.imgsz))
    assert nmap.node("model.23.dfl.conv") == "/model.23/dfl/conv/Conv"


@pytest.mark.parametrize("arch", ["yolov10m.yaml", "yolov8n.yaml"])
def test_architectures(arch, tmp_path):
    model = load_model(arch, 64)
    nmap = _check(model, export_onnx(model.module, tmp_path / "m.onnx", 64))
    if arch == "yolov10m.yaml":
        assert len(nmap) == 118
        assert nmap.node("model.8.m.0.cv1.2.conv") == "/model.8/m.0/cv1/cv1.2/conv/Conv"
