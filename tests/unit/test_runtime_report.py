"""What ran as int8: the ORT read-back's classification and the TensorRT inspector parser."""

from __future__ import annotations

import json

from evaluators.runtime import RuntimeReport, report_from_dict
from evaluators.tensorrt import parse_engine_information

LAYER_NODES = {"model.0.conv": "/model.0/conv/Conv", "model.1.conv": "/model.1/conv/Conv",
               "model.2.conv": "/model.2/conv/Conv"}
ASKED = {"model.0.conv": "W8A8", "model.1.conv": "W8A8", "model.2.conv": "W4A16"}


def _layers_trt10():
    return [
        {"Name": "/model.0/conv/input_quant/QuantizeLinear", "LayerType": "Scale",
         "Inputs": [{"Name": "images", "Format/Datatype": "Row major linear FP32"}]},
        {"Name": "model.0.conv.weight + /model.0/conv/weight_dequant/DequantizeLinear + /model.0/conv/Conv + "
                 "PWN(PWN(/model.0/act/Sigmoid), /model.0/act/Mul)",
         "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Channel major INT8 format where channel % 32 == 0"}]},
        {"Name": "/model.1/conv/Conv + PWN(/model.1/act/Mul)", "LayerType": "CaskConvolution",
         "ParameterType": "Convolution", "Inputs": [{"Name": "y", "Format/Datatype": "Channel major FP16 format"}]},
        {"Name": "/model.2/conv/Conv", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "z", "Format/Datatype": "Channel major FP16 format"}]},
    ]


def test_tensorrt10_inspector_json():
    report = parse_engine_information(json.dumps({"Layers": _layers_trt10(), "Bindings": ["images", "output0"]}),
                                      LAYER_NODES, ASKED)
    assert report.engine == "tensorrt"
    assert report.per_layer["model.0.conv"].int8 and not report.per_layer["model.1.conv"].int8
    assert (report.asked_a8, report.ran_int8) == (2, 1)
    assert report.a8_ran_float == ["model.1.conv"] and "model.1.conv" in report.warnings[0]


def test_tensorrt11_inspector_json_splits_format_and_datatype():
    layers = _layers_trt10()
    for entry in layers:
        for t in entry["Inputs"]:
            fmt = t.pop("Format/Datatype")
            t["Format"], t["DataType"] = fmt, ("Int8" if "INT8" in fmt else "Half")
    report = parse_engine_information({"Layers": layers, "I/O Tensors": [{"Name": "images"}]}, LAYER_NODES, ASKED)
    assert report.per_layer["model.0.conv"].int8 and report.ran_int8 == 1


def test_names_only_engine_is_reported_unknown():
    names = [e["Name"] for e in _layers_trt10()]
    report = parse_engine_information({"Layers": names}, LAYER_NODES, ASKED)
    assert report.ran_int8 == 0 and report.notes
    assert report.per_layer["model.0.conv"].kernel.startswith("unknown")


def test_report_round_trips_through_json():
    report = parse_engine_information({"Layers": _layers_trt10()}, LAYER_NODES, ASKED)
    again = report_from_dict(json.loads(json.dumps(report.to_dict())))
    assert isinstance(again, RuntimeReport)
    assert again.to_dict()["per_layer"] == report.to_dict()["per_layer"]
    assert again.label() == "A8 asked 2 / ran int8 1"
