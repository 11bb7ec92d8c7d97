from __future__ import annotations

import numpy as np
import pytest

from mpq.model import LAYOUT_END2END, LAYOUT_RAW, ModelLoadError, export_onnx, load_model


def test_yolov10m_architecture_layers():
    m = load_model("yolov10m.yaml", 640)
    assert m.total_convs == 142  # as built, with the one-to-many training head
    assert len(m.layers) == 118  # after end-to-end fusion: the seeds' 118 DequantizeLinear
    assert len(m.quantizable_layers) == 117
    assert [lay.name for lay in m.layers if not lay.quantizable] == ["model.23.dfl.conv"]
    assert m.layout == LAYOUT_END2END and m.output_shape() == (1, 300, 6)
    assert 20 <= len(m.groups("block")) <= 26
    params = sum(lay.params for lay in m.layers)
    assert 15e6 < params < 17e6
    # MACs of the first conv: 48 out x 320x320 x (3x3x3)
    first = m.layers[0]
    assert first.name == "model.0.conv" and first.macs == 48 * 320 * 320 * 27
    assert m.layer("model.8.m.0.cv1.2.conv").kind == "Conv2d"


def test_demo_model_loads_end2end(demo_model):
    import torch

    assert demo_model.layout == LAYOUT_END2END
    assert demo_model.names[0] == "circle" and demo_model.num_classes == 6
    with torch.no_grad():
        out = demo_model.module(demo_model.dummy_input(2))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == demo_model.output_shape(2)
    assert not any(p.requires_grad for p in demo_model.module.parameters())
    # BatchNorm is folded
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in demo_model.module.modules())


def test_raw_layout_for_non_end2end_models():
    m = load_model("yolov8n.yaml", 64)
    assert m.layout == LAYOUT_RAW
    import torch

    with torch.no_grad():
        out = m.module(m.dummy_input())
    assert tuple(out.shape) == m.output_shape() == (1, 84, 64 + 16 + 4)


def test_float_onnx_matches_torch(demo_model, demo_calib, tmp_path):
    import onnxruntime as ort
    import torch

    from mpq.data import preprocess_many

    images, _ = preprocess_many(demo_calib[:4], demo_model.imgsz, progress=False)
    path = export_onnx(demo_model.module, tmp_path / "float.onnx", demo_model.imgsz)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "images"
    onnx_out = sess.run(None, {"images": images})[0]
    with torch.no_grad():
        torch_out = demo_model.module(torch.from_numpy(images)).numpy()
    assert onnx_out.shape == torch_out.shape == (4, 300, 6)
    keep = torch_out[..., 4] > 0.25  # confident detections: same boxes, scores, classes
    assert keep.sum() > 0
    np.testing.assert_allclose(onnx_out[keep], torch_out[keep], atol=1e-2, rtol=1e-3)


def test_bad_model_files_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="bad.pt: cannot be read"):
        load_model(bad)
    with pytest.raises(ModelLoadError, match="expected an Ultralytics checkpoint"):
        load_model(tmp_path / "model.onnx")
    with pytest.raises(ModelLoadError, match="architecture file not found"):
        load_model(tmp_path / "nonexistent_arch.yaml")
