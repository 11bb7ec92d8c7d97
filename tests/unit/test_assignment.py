from __future__ import annotations

import json

import pytest

from mpq.assignment import FLOAT, Assignment, LayerInfo, Precision, group_layers


def _layer(name: str, block: str, w: int = 100, i: int = 0, quantizable: bool = True) -> LayerInfo:
    return LayerInfo(name, "Conv2d", 4, w // 4, (1, 1), (1, 1), 1, w, w * 10, i, block, quantizable)


def test_precision_parse_and_str():
    assert Precision.parse("w4a8") == Precision(4, 8)
    assert str(Precision(8, 16)) == "W8A16"
    assert Precision.parse("float") == FLOAT and FLOAT.is_float
    with pytest.raises(ValueError, match="W<bits>A<bits>"):
        Precision.parse("int4")
    with pytest.raises(ValueError, match="weight bits"):
        Precision(2, 8)
    with pytest.raises(ValueError, match="activation bits"):
        Precision(4, 4)


def test_assignment_drops_float_and_digest_is_order_independent():
    a = Assignment({"b": "W4A8", "a": "W8A16", "c": "W16A16"})
    b = Assignment({"a": Precision(8, 16), "b": Precision(4, 8)})
    assert a == b
    assert a.digest() == b.digest()
    assert len(a.digest()) == 16
    assert a["c"] == FLOAT and "c" not in a
    assert Assignment({"a": "W4A8"}).digest() != Assignment({"a": "W4A16"}).digest()


def test_assignment_json_round_trip():
    a = Assignment({"model.0.conv": "W8A8", "model.1.conv": "W4A16"})
    text = a.to_json(note="x")
    assert json.loads(text)["digest"] == a.digest()
    assert Assignment.from_json(text) == a
    assert Assignment.from_json({"model.0.conv": "W8A8", "model.1.conv": "W4A16"}) == a
    with pytest.raises(ValueError, match="model.0.conv"):
        Assignment.from_json({"layers": {"model.0.conv": "W3A8"}}, source="f.json")


def test_groups_and_summary():
    layers = [_layer("model.0.conv", "model.0", 100, 0), _layer("model.1.cv1.conv", "model.1", 300, 1),
              _layer("model.1.cv2.conv", "model.1", 600, 2),
              _layer("model.23.dfl.conv", "model.23", 16, 3, quantizable=False)]
    assert [g.name for g in group_layers(layers, "layer")] == ["model.0.conv", "model.1.cv1.conv", "model.1.cv2.conv"]
    blocks = group_layers(layers, "block")
    assert [(g.name, g.size) for g in blocks] == [("model.0", 1), ("model.1", 2)]
    a = Assignment.from_groups(blocks, {"model.1": "W4A16"})
    assert a.get("model.1.cv1.conv") == a.get("model.1.cv2.conv") == Precision(4, 16)
    s = a.summary(layers)
    assert s["layers"] == 3
    assert s["w4_weight_share"] == pytest.approx(900 / 1000)
    assert s["counts"] == {"W16A16": 1, "W4A16": 2}
    assert Assignment.uniform(layers, "W8A8").summary(layers)["label"] == "uniform W8A8"
    assert Assignment().label() == "float"
    with pytest.raises(ValueError, match="granularity"):
        group_layers(layers, "channel")
