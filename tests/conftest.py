"""Shared fixtures: the bundled demo study, its model and data (built offline, cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("PYTHONHASHSEED", "0")

REPO = Path(__file__).resolve().parents[1]
DEMO_STUDY = REPO / "studies" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_spec():
    from search.spec import load_spec

    return load_spec(DEMO_STUDY)


@pytest.fixture(scope="session")
def demo_model(demo_spec):
    """The fused float demo detector (do not modify; use ``.fresh()`` for a copy)."""
    from search.model import load_model

    return load_model(demo_spec.model, demo_spec.imgsz, max_det=demo_spec.evaluation.max_det)


@pytest.fixture(scope="session")
def demo_subset(demo_spec):
    from search.data import load_coco_subset

    ds = demo_spec.dataset
    return load_coco_subset(ds.images, ds.annotations, max_images=ds.max_images, image_ids=ds.image_ids)


@pytest.fixture(scope="session")
def demo_calib(demo_spec):
    from search.data import read_calibration_list

    return read_calibration_list(demo_spec.calibration.source, demo_spec.calibration.max_images)


@pytest.fixture(scope="session")
def ultralytics_assets() -> Path:
    from search._env import import_ultralytics

    return Path(import_ultralytics().__file__).parent / "assets"
