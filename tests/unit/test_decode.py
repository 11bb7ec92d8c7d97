"""Decoding of YOLO outputs and NMS, checked against Ultralytics' own post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from evaluators.decode import (
    Detections,
    decode,
    decode_end2end,
    decode_raw,
    nms_numpy,
    to_coco_json,
    to_original,
    xywh2xyxy,
)
from mpq.data import letterbox


def _random_boxes(rng: np.random.Generator, n: int, size: float = 192.0) -> np.ndarray:
    xy = rng.uniform(0, size * 0.8, (n, 2))
    wh = rng.uniform(4, size * 0.3, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_nms_numpy_matches_torchvision():
    import torch
    import torchvision

    rng = np.random.default_rng(0)
    for n, thr in ((50, 0.5), (400, 0.7), (1000, 0.3)):
        boxes = _random_boxes(rng, n)
        scores = rng.random(n).astype(np.float32)
        ours = nms_numpy(boxes, scores, thr)
        theirs = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()
        assert ours.tolist() == theirs.tolist()


def test_end2end_decoding_follows_ultralytics():
    import torch
    from ultralytics.utils.nms import non_max_suppression

    rng = np.random.default_rng(1)
    out = np.zeros((2, 300, 6), np.float32)
    out[..., :4] = _random_boxes(rng, 600).reshape(2, 300, 4)
    out[..., 4] = np.sort(rng.random((2, 300)) ** 3, axis=1)[:, ::-1]
    out[..., 5] = rng.integers(0, 6, (2, 300))
    out[0, 10, 4] = 0.001  # exactly at the threshold: dropped (strict >)
    ours = decode_end2end(out, conf=0.001, max_det=100)
    theirs = non_max_suppression(torch.from_numpy(out), 0.001, 0.7, max_det=100, end2end=True)
    for d, t in zip(ours, theirs, strict=True):
        t = t.numpy()
        assert len(d) == len(t) <= 100
        np.testing.assert_array_equal(d.boxes, t[:, :4])
        np.testing.assert_array_equal(d.scores, t[:, 4])
        np.testing.assert_array_equal(d.classes, t[:, 5].astype(np.int64))
    assert d.classes.dtype == np.int64


@pytest.mark.parametrize("multi_label", [True, False])
def test_raw_decoding_matches_ultralytics_nms(multi_label: bool):
    import torch
    import torchvision  # noqa: F401  (Ultralytics uses its NMS kernel when imported)
    from ultralytics.utils.nms import non_max_suppression

    rng = np.random.default_rng(2)
    nc, anchors = 6, 756
    raw = np.zeros((3, 4 + nc, anchors), np.float32)
    centers = rng.uniform(10, 180, (3, anchors, 2))
    sizes = rng.uniform(5, 60, (3, anchors, 2))
    raw[:, 0:2] = centers.transpose(0, 2, 1)
    raw[:, 2:4] = sizes.transpose(0, 2, 1)
    raw[:, 4:] = rng.random((3, nc, anchors)) ** 6
    ours = decode_raw(raw, conf=0.01, iou=0.7, max_det=300, multi_label=multi_label)
    theirs = non_max_suppression(torch.from_numpy(raw), 0.01, 0.7, multi_label=multi_label, max_det=300)
    for d, t in zip(ours, theirs, strict=True):
        t = t.numpy()
        assert len(d) == len(t) > 0
        np.testing.assert_allclose(d.boxes, t[:, :4], atol=1e-4)
        np.testing.assert_allclose(d.scores, t[:, 4], atol=1e-7)
        np.testing.assert_array_equal(d.classes, t[:, 5].astype(np.int64))


def test_decode_dispatch_and_bad_layout():
    out = np.zeros((1, 300, 6), np.float32)
    assert len(decode(out, "end2end", conf=0.001, iou=0.7, max_det=300)[0]) == 0
    with pytest.raises(ValueError, match="end2end"):
        decode(out, "boxes", conf=0.001, iou=0.7, max_det=300)


def test_xywh2xyxy():
    np.testing.assert_array_equal(xywh2xyxy(np.array([[10.0, 20.0, 4.0, 6.0]])), [[8.0, 17.0, 12.0, 23.0]])


def test_to_original_and_coco_json():
    img = np.zeros((179, 256, 3), np.uint8)
    _, meta = letterbox(img, 192)
    d = Detections(np.array([[0.0, 0.0, 192.0, 192.0], [50.0, 60.0, 70.0, 90.0]], np.float32),
                   np.array([0.9, 0.4], np.float32), np.array([2, 0]))
    orig = to_original(d, meta)
    # the first box covers the whole input: clipped to the original image
    np.testing.assert_allclose(orig.boxes[0], [0, 0, 256, 179], atol=1e-4)
    res = to_coco_json([orig, Detections.empty()], [7, 8], [11, 12, 13])
    assert [r["category_id"] for r in res] == [13, 11] and {r["image_id"] for r in res} == {7}
    x, y, w, h = res[0]["bbox"]
    assert (x, y) == (0.0, 0.0) and w == pytest.approx(256, abs=1e-3) and h == pytest.approx(179, abs=1e-3)
