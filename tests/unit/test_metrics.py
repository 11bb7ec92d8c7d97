"""The fast COCO-style mAP used by the fidelity evaluator equals pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from evaluators.decode import Detections
from evaluators.metrics import detection_map


def _scene(rng: np.random.Generator, n_img: int, nc: int) -> tuple[list[Detections], list[Detections]]:
    refs, dets = [], []
    for _ in range(n_img):
        k = int(rng.integers(0, 6))
        xy = rng.uniform(0, 150, (k, 2))
        wh = rng.uniform(5, 60, (k, 2))
        ref = Detections(np.concatenate([xy, xy + wh], 1).astype(np.float32), np.ones(k, np.float32),
                         rng.integers(0, nc, k))
        # detections: jittered copies (some with a wrong class), duplicates and random boxes
        m = int(rng.integers(0, 40))
        src = rng.integers(0, max(k, 1), m)
        boxes = ref.boxes[src] if k else np.zeros((m, 4), np.float32)
        boxes = boxes + rng.normal(0, rng.uniform(0.5, 8), (m, 4)).astype(np.float32)
        rand = rng.random(m) < 0.3
        boxes[rand] = np.concatenate([rng.uniform(0, 150, (int(rand.sum()), 2))] * 2, 1) + [0, 0, 20, 20]
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        cls = ref.classes[src] if k else rng.integers(0, nc, m)
        flip = rng.random(m) < 0.15
        cls = np.where(flip, rng.integers(0, nc, m), cls)
        dets.append(Detections(boxes.astype(np.float32), rng.random(m).astype(np.float32), cls.astype(np.int64)))
        refs.append(ref)
    return dets, refs


def _pycocotools(dets: list[Detections], refs: list[Detections], nc: int) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1, "width": 256, "height": 256} for i in range(len(refs))]
    anns = []
    for i, r in enumerate(refs):
        for b, c in zip(r.boxes.tolist(), r.classes.tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
    results = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "score": float(s)}
               for i, d in enumerate(dets) for b, s, c in zip(d.boxes.tolist(), d.scores.tolist(),
                                                               d.classes.tolist(), strict=True)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c + 1, "name": str(c)} for c in range(nc)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.areaRng = [ev.params.areaRng[0]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    p = ev.eval["precision"][:, :, :, 0, -1]
    return float(p[p > -1].mean()), float(p[0][p[0] > -1].mean())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_detection_map_equals_pycocotools(seed: int):
    rng = np.random.default_rng(seed)
    dets, refs = _scene(rng, 25, 4)
    ours = detection_map(dets, refs)
    map50_95, map50 = _pycocotools(dets, refs, 4)
    assert ours.map50_95 == pytest.approx(map50_95, abs=1e-9)
    assert ours.map50 == pytest.approx(map50, abs=1e-9)
    assert 0.0 < ours.map50_95 < 1.0


def test_identical_detections_score_one_and_nothing_scores_zero():
    rng = np.random.default_rng(5)
    _, refs = _scene(rng, 10, 3)
    assert detection_map(refs, refs).map50_95 == pytest.approx(1.0)
    empty = [Detections.empty() for _ in refs]
    assert detection_map(empty, refs).map50_95 == 0.0
    assert np.isnan(detection_map(refs, empty).map50_95)  # no reference boxes: undefined
    with pytest.raises(ValueError, match="reference lists"):
        detection_map(refs[:2], refs)
