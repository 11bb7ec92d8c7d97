"""The seeds' sanity rule for both ModelOpt paths on the demo detector: uniform W8A8 PTQ with
the backends' default options loses at most 1.0 point of COCO mAP50-95 (pycocotools
through ONNX Runtime, the demo study's 100 evaluation images and 32 calibration images).

If W8 PTQ collapses, the pipeline is wrong, not the bit width. About a minute on a 2-core
CPU (entropy calibration of the ONNX path is most of it): marked ``slow``; the figures are
in docs/benchmarks.md, "ModelOpt backends".
"""

from __future__ import annotations

import pytest
from quantizer_helpers import sanity_evaluation

pytest.importorskip("modelopt.torch.quantization", reason="the 'modelopt' extra is not installed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluation(demo_spec, demo_model, demo_subset, tmp_path_factory):
    return sanity_evaluation(demo_spec, demo_model, demo_subset, tmp_path_factory.mktemp("modelopt-sanity"))


@pytest.mark.parametrize("name", ["modelopt", "modelopt-onnx"])
def test_w8a8_loses_at_most_one_point(name, demo_model, evaluation):
    from mpq.assignment import Assignment
    from quantizers import get_backend

    coco, calib, float_map, out = evaluation
    backend = get_backend(name)  # the study defaults
    qmodel = backend.materialize(demo_model, Assignment.uniform(demo_model.layers, "W8A8"), calib)
    result = backend.export(qmodel, out / f"{name}-w8a8.onnx")
    q_map = coco.evaluate(result.path).map50_95
    assert q_map >= float_map - 0.010, f"{name} W8A8 mAP50-95 {q_map:.4f} vs float {float_map:.4f}"
