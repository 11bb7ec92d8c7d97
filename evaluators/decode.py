"""Decode YOLO outputs into per-image detections, as Ultralytics' validator does.

- End-to-end (YOLOv10, ``(N, K, 6)`` rows ``[x1, y1, x2, y2, score, class]`` sorted by
  score): keep rows with ``score > conf``, at most ``max_det`` (Ultralytics'
  ``non_max_suppression(..., end2end=True)``).
- Raw (``(N, 4 + nc, anchors)`` rows ``[cx, cy, w, h, class scores...]``): candidates with a
  class score ``> conf`` (every such class with ``multi_label``, as the validator does, else
  the best class), at most ``max_nms`` by score, class-aware NMS at ``iou`` (boxes offset by
  ``class * 7680``), at most ``max_det``.

Boxes stay in input (letterboxed) pixels; :func:`to_original` maps them back.
NMS uses torchvision's kernel when torch is already imported, and an exact numpy greedy
NMS otherwise (same rule: drop boxes whose IoU with a kept box is above the threshold).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpq.data import LetterboxMeta, unletterbox_boxes

MAX_WH = 7680
MAX_NMS = 30000


@dataclass(frozen=True, eq=False)
class Detections:
    """Detections of one image: ``boxes`` (k, 4) xyxy float32, ``scores`` (k,), ``classes`` (k,) int."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        """No detection."""
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def top(self, n: int) -> Detections:
        """The ``n`` highest-scoring detections."""
        order = np.argsort(-self.scores, kind="stable")[:n]
        return Detections(self.boxes[order], self.scores[order], self.classes[order])

    def above(self, conf: float) -> Detections:
        """The detections scoring above ``conf``."""
        keep = self.scores >= conf
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    """Center-size boxes to corner boxes."""
    out = np.empty_like(b)
    half = b[..., 2:4] / 2
    out[..., 0:2] = b[..., 0:2] - half
    out[..., 2:4] = b[..., 0:2] + half
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS: indices of kept boxes, highest score first (torchvision's rule)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        ious = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[ious <= iou]
    return np.asarray(keep, dtype=np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """NMS with torchvision's C++ kernel when torch is loaded in this process, else numpy."""
    if "torch" in sys.modules:
        try:
            import torch
            import torchvision

            keep = torchvision.ops.nms(torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
                                       torch.from_numpy(np.ascontiguousarray(scores, np.float32)), float(iou))
            return keep.numpy().astype(np.int64)
        except Exception:  # noqa: BLE001 - torchvision missing or broken: numpy gives the same result
            pass
    return nms_numpy(boxes, scores, iou)


def decode_end2end(output: np.ndarray, *, conf: float, max_det: int) -> list[Detections]:
    """``(N, K, 6)`` end-to-end rows -> detections with ``score > conf`` (at most ``max_det``)."""
    out = []
    for pred in np.asarray(output, dtype=np.float32):
        keep = np.flatnonzero(pred[:, 4] > conf)[:max_det]
        rows = pred[keep]
        out.append(Detections(rows[:, :4].copy(), rows[:, 4].copy(), np.rint(rows[:, 5]).astype(np.int64)))
    return out


def decode_raw(output: np.ndarray, *, conf: float, iou: float, max_det: int, multi_label: bool = True,
               max_nms: int = MAX_NMS) -> list[Detections]:
    """``(N, 4 + nc, anchors)`` raw predictions -> class-aware NMS detections."""
    out = []
    arr = np.asarray(output, dtype=np.float32)
    nc = arr.shape[1] - 4
    multi_label = multi_label and nc > 1
    for pred in arr:
        x = pred.T  # (anchors, 4 + nc)
        cls = x[:, 4:]
        cand = cls.max(1) > conf
        x, cls = x[cand], cls[cand]
        if not len(x):
            out.append(Detections.empty())
            continue
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = np.nonzero(cls > conf)
            boxes, scores, classes = box[i], cls[i, j], j
        else:
            j = cls.argmax(1)
            scores = cls[np.arange(len(cls)), j]
            keep = scores > conf
            boxes, scores, classes = box[keep], scores[keep], j[keep]
        if len(scores) > max_nms:
            top = np.argsort(-scores, kind="stable")[:max_nms]
            boxes, scores, classes = boxes[top], scores[top], classes[top]
        kept = nms(boxes + classes[:, None].astype(np.float32) * MAX_WH, scores, iou)[:max_det]
        out.append(Detections(boxes[kept], scores[kept], classes[kept].astype(np.int64)))
    return out


def decode(output: np.ndarray, layout: str, *, conf: float, iou: float, max_det: int,
           multi_label: bool = True) -> list[Detections]:
    """Decode a batch of outputs of either layout (``end2end`` or ``raw``)."""
    if layout == "end2end":
        return decode_end2end(output, conf=conf, max_det=max_det)
    if layout == "raw":
        return decode_raw(output, conf=conf, iou=iou, max_det=max_det, multi_label=multi_label)
    raise ValueError(f"unknown output layout {layout!r} (expected 'end2end' or 'raw')")


def to_original(dets: Detections, meta: LetterboxMeta) -> Detections:
    """Map boxes from the letterboxed input back to original image pixels (clipped)."""
    if not len(dets):
        return dets
    return Detections(unletterbox_boxes(dets.boxes, meta, clip=True), dets.scores, dets.classes)


def to_coco_json(dets: Sequence[Detections], image_ids: Sequence[int], category_ids: Sequence[int]) -> list[dict]:
    """COCO results (``bbox`` as x, y, w, h) for detections already in original pixels."""
    results: list[dict] = []
    cats = np.asarray(category_ids, dtype=np.int64)
    for d, img_id in zip(dets, image_ids, strict=True):
        if not len(d):
            continue
        b = d.boxes.astype(np.float64)
        xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        cls = cats[d.classes]
        for box, score, cat in zip(xywh.tolist(), d.scores.tolist(), cls.tolist(), strict=True):
            results.append({"image_id": int(img_id), "category_id": int(cat), "bbox": box, "score": float(score)})
    return results
