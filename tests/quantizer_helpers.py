"""Shared helpers for the quantizer backend tests: a small calibration set, session-cached
builds, and detection matching between two end-to-end outputs (N, max_det, 6)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a`` (N, 4) against ``b`` (M, 4)."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:4] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:4] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def match_detections(ref: np.ndarray, out: np.ndarray, conf: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """For every confident detection of ``ref`` (rows ``[x1, y1, x2, y2, score, class]``),
    the IoU of the best same-class detection of ``out`` and the score difference to it.

    Works per image on (N, D, 6) arrays; the order of rows may differ (top-k ties).
    Returns two flat arrays (IoU, |score difference|), one entry per confident ``ref`` row.
    """
    ious: list[float] = []
    dscores: list[float] = []
    assert ref.shape[0] == out.shape[0], "different batch sizes"
    for r_img, o_img in zip(ref, out, strict=True):
        r = r_img[r_img[:, 4] > conf]
        o = o_img[o_img[:, 4] > conf / 4]
        for det in r:
            same = o[o[:, 5] == det[5]]
            if len(same) == 0:
                ious.append(0.0)
                dscores.append(float(det[4]))
                continue
            iou = box_iou(det[None, :4], same[:, :4])[0]
            k = int(iou.argmax())
            ious.append(float(iou[k]))
            dscores.append(float(abs(same[k, 4] - det[4])))
    return np.array(ious), np.array(dscores)


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
