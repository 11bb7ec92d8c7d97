"""Shared helpers for the quantizer backend tests: a small calibration set, session-cached
builds (detection matching lives in :mod:`quantizers.testing`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

_ROOT: Path | None = None
_CACHE: dict[str, Any] = {}


def workdir() -> Path:
    """One temporary folder per test session for the quantized exports."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="yolo-mpq-quantizers-"))
    return _ROOT


def cached(key: str, build: Any) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def calibration_set(paths: list[Path], imgsz: int, n: int = 8, batch_size: int = 8) -> Any:
    """The first ``n`` demo calibration images, preprocessed as the evaluator does."""
    from mpq.data import CalibrationSet, preprocess_many

    def build() -> Any:
        images, _ = preprocess_many(paths[:n], imgsz, progress=False)
        return CalibrationSet(images=images, paths=list(paths[:n]), batch_size=batch_size)

    return cached(f"calib:{n}:{batch_size}:{imgsz}:{[str(p) for p in paths[:n]]}", build)


def sanity_evaluation(spec: Any, model: Any, subset: Any, out: Path) -> tuple[Any, Any, float, Path]:
    """What the uniform-PTQ sanity tests share: the study's COCO evaluator, its calibration set
    (as the search builds it) and the float model's mAP50-95, with exports under ``out``."""
    from evaluators.coco import CocoEvaluator
    from mpq.data import CalibrationSet, preprocess_many, read_calibration_list
    from mpq.model import export_onnx

    cal = spec.calibration
    paths = read_calibration_list(cal.source, cal.max_images)
    images, _ = preprocess_many(paths, model.imgsz, progress=False)
    calib = CalibrationSet(images=images, paths=paths, batch_size=cal.batch_size)
    coco = CocoEvaluator(subset=subset, names=model.names, imgsz=model.imgsz, settings=spec.evaluation,
                         cache_dir=out, progress=False)
    float_map = coco.evaluate(export_onnx(model.module, out / "float.onnx", model.imgsz)).map50_95
    assert float_map > 0.1, "the demo model should detect shapes"
    return coco, calib, float_map, out
