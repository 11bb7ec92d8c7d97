"""A fast, vectorized COCO-style bbox mAP for detections scored against reference boxes.

This is what :mod:`evaluators.fidelity` uses to score a candidate model's detections
against the float model's detections (pseudo-labels) hundreds of times per sweep, where
building pycocotools objects per call would cost more than the inference. It follows
pycocotools' ``COCOeval`` for the ``all`` area range with no crowd boxes:

- per image and class, detections sorted by score, at most ``max_dets`` (100) of them;
- greedy matching per IoU threshold (0.50:0.05:0.95): each detection, best score first,
  takes the unmatched reference box of its class with the highest IoU >= threshold;
- precision made monotone, sampled at 101 recall points; AP is their mean, mAP the mean
  over classes that have reference boxes.

``tests/unit/test_metrics.py`` checks it against pycocotools on random data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evaluators.decode import Detections, box_iou

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class MapResult:
    """mAP50-95, mAP50 and per-class AP50-95 (classes with reference boxes only)."""

    map50_95: float
    map50: float
    per_class: dict[int, float]
    num_ref: int
    num_det: int


def _match_image(det: Detections, ref: Detections, thresholds: np.ndarray) -> np.ndarray:
    """True-positive matrix (len(det), T) of one image's detections (sorted by score)."""
    tp = np.zeros((len(det), len(thresholds)), dtype=bool)
    if not len(det) or not len(ref):
        return tp
    iou = box_iou(det.boxes.astype(np.float64), ref.boxes.astype(np.float64))
    iou = np.where(det.classes[:, None] == ref.classes[None, :], iou, -1.0)
    # only detections that reach the lowest threshold with some box can ever match
    candidates = np.flatnonzero(iou.max(1) >= thresholds.min() - 1e-12)
    if not len(candidates):
        return tp
    matched = np.zeros((len(thresholds), len(ref)), dtype=bool)
    t_idx = np.arange(len(thresholds))
    for d in candidates:  # detections are in score order: greedy by score, as pycocotools
        cand = np.where(matched, -1.0, iou[d][None, :])
        # pycocotools keeps the last of equal-IoU boxes; argmax of the reversed row does the same
        best = cand.shape[1] - 1 - cand[:, ::-1].argmax(1)
        ok = cand[t_idx, best] >= np.minimum(thresholds, 1 - 1e-10)
        matched[t_idx[ok], best[ok]] = True
        tp[d, ok] = True
    return tp


def _ap(tp: np.ndarray, scores: np.ndarray, n_ref: int) -> np.ndarray:
    """101-point interpolated AP per threshold (pycocotools' accumulate)."""
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    ctp = np.cumsum(tp, 0, dtype=np.float64)
    cfp = np.cumsum(~tp, 0, dtype=np.float64)
    recall = ctp / n_ref
    precision = ctp / (ctp + cfp + np.spacing(1))
    ap = np.zeros(tp.shape[1])
    for t in range(tp.shape[1]):
        pr = np.maximum.accumulate(precision[::-1, t])[::-1]
        idx = np.searchsorted(recall[:, t], RECALL_POINTS, side="left")
        valid = idx < len(pr)
        q = np.zeros(len(RECALL_POINTS))
        q[valid] = pr[idx[valid]]
        ap[t] = q.mean()
    return ap


def detection_map(dets: Sequence[Detections], refs: Sequence[Detections], *, max_dets: int = 100,
                  thresholds: np.ndarray = IOU_THRESHOLDS) -> MapResult:
    """COCO-style mAP of ``dets`` against reference boxes ``refs`` (one entry per image)."""
    if len(dets) != len(refs):
        raise ValueError(f"{len(dets)} detection lists for {len(refs)} reference lists")
    tps, scores, classes = [], [], []
    n_ref: dict[int, int] = {}
    for det, ref in zip(dets, refs, strict=True):
        for c in np.unique(ref.classes):
            n_ref[int(c)] = n_ref.get(int(c), 0) + int((ref.classes == c).sum())
        if not len(det):
            continue
        # at most max_dets per image and class, best first (pycocotools' per-category maxDets)
        order = np.argsort(-det.scores, kind="mergesort")
        cls_sorted = det.classes[order]
        rank = np.zeros(len(order), dtype=np.int64)
        for c in np.unique(cls_sorted):
            m = cls_sorted == c
            rank[m] = np.arange(int(m.sum()))
        order = order[rank < max_dets]
        d = Detections(det.boxes[order], det.scores[order], det.classes[order])
        tps.append(_match_image(d, ref, thresholds))
        scores.append(d.scores)
        classes.append(d.classes)
    tp = np.concatenate(tps) if tps else np.zeros((0, len(thresholds)), bool)
    sc = np.concatenate(scores) if scores else np.zeros(0)
    cl = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    per_class: dict[int, np.ndarray] = {}
    for c, n in sorted(n_ref.items()):
        m = cl == c
        per_class[c] = _ap(tp[m], sc[m], n) if m.any() else np.zeros(len(thresholds))
    if not per_class:
        return MapResult(float("nan"), float("nan"), {}, 0, int(len(sc)))
    aps = np.stack(list(per_class.values()))
    i50 = int(np.argmin(np.abs(thresholds - 0.5)))
    return MapResult(map50_95=float(aps.mean()), map50=float(aps[:, i50].mean()),
                     per_class={c: float(v.mean()) for c, v in per_class.items()},
                     num_ref=int(sum(n_ref.values())), num_det=int(len(sc)))
