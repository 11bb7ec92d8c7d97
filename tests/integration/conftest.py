"""Fixtures shared by the integration tests: the float ONNX of the demo model, a small
calibration set and preprocessed evaluation images (each built once per module)."""

from __future__ import annotations

import pytest
from evaluator_helpers import export
from quantizer_helpers import cached, calibration_set


@pytest.fixture(scope="module")
def float_onnx(demo_model):
    return export(demo_model.module, "float", demo_model.imgsz)


@pytest.fixture(scope="module")
def calib(demo_calib, demo_model):
    return calibration_set(demo_calib, demo_model.imgsz, n=8, batch_size=8)


@pytest.fixture(scope="module")
def images(demo_subset, demo_model):
    from mpq.data import preprocess_many

    return cached("eval-images-16", lambda: preprocess_many(demo_subset.paths[:16], demo_model.imgsz,
                                                            progress=False)[0])
