"""Per-image COCO evaluation records and a paired bootstrap over images.

How sure is a mAP change measured on 100 images? :class:`PerImageEval` keeps, for one
model on one image set, what pycocotools' ``COCOeval.evaluate`` decided per image (area
``all``, the top ``maxDets[-1]`` detections per image and category): each detection's
score, whether it is a true positive at each IoU threshold, whether it is ignored (matched
to a crowd box), and each image's count of non-ignored ground-truth boxes per category. It
is small (about 40 bytes per detection), is written once per evaluated ONNX file
(:meth:`PerImageEval.save`, keyed by the file's digest by the caller), and is all a
resample needs: no inference, no matching again.

:func:`weighted_map` recomputes mAP50-95 and mAP50 exactly as ``COCOeval.accumulate`` +
``summarize`` do, but for *weighted* image sets: an image drawn ``w`` times in a
bootstrap resample contributes its detections and its ground truth ``w`` times. A resample
changes only per-image multiplicities, not the score order, so the detections of each
category are sorted once (pycocotools' own order: images in id order, then a stable sort
by descending score) and every resample is a weighted cumulative sum over that order,
vectorized over resamples and IoU thresholds. The recall thresholds are found with integer
arithmetic (the smallest true-positive count whose recall ``tp / npig`` reaches each
threshold, as pycocotools' float comparison decides, then the first position whose
cumulative count reaches it), so with unit weights the result is
pycocotools' to the last bit of every precision value (the final mean may differ in the
last place from summation order). With other weights it equals pycocotools run on the
resampled image list up to the order of exactly equal scores of *different* images.

:class:`PairedBootstrap` draws ``n_boot`` resamples of the images once (multinomial
counts, a fixed seed) and applies the *same* resamples to the reference (float) model and
to every trial, so the image-to-image variation they share cancels: the interval of
``mAP(trial) - mAP(float)`` is the percentile interval of the resampled differences, and
a trial identical to float gets ``[0, 0]``.

This module imports only numpy (and pycocotools' result objects are read duck-typed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
METRICS = ("map50_95", "map50")


@dataclass(frozen=True, eq=False)
class PerImageEval:
    """What ``COCOeval.evaluate`` decided per image, for area ``all`` and ``max_det`` detections.

    Detections are stored per category (``cat_start[k]:cat_start[k + 1]``), in the order
    ``COCOeval.accumulate`` sorts them.

    Attributes:
        image_ids: (I,) the evaluated image ids, in pycocotools' (sorted) order.
        cat_ids: (K,) the dataset's category ids, in pycocotools' order.
        iou_thrs: (T,) IoU thresholds (0.50:0.05:0.95).
        rec_thrs: (R,) recall thresholds (0:0.01:1).
        npig: (I, K) non-ignored ground-truth boxes per image and category.
        cat_start: (K + 1,) offsets of each category's detections.
        det_img: (D,) image index of each detection.
        det_score: (D,) score of each detection.
        det_tp: (T, D) matched to a non-ignored ground-truth box at each IoU threshold.
        det_fp: (T, D) not matched and not ignored.
        max_det: detections per image and category (pycocotools' ``maxDets[-1]``).
    """

    image_ids: np.ndarray
    cat_ids: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    npig: np.ndarray
    cat_start: np.ndarray
    det_img: np.ndarray
    det_score: np.ndarray
    det_tp: np.ndarray
    det_fp: np.ndarray
    max_det: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_detections(self) -> int:
        return int(self.det_score.shape[0])

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_cocoeval(cls, ev: Any) -> PerImageEval:
        """Extract the records from a ``COCOeval`` after ``evaluate()`` (bbox, categories on).

        Uses area range ``all`` and ``maxDets[-1]``, the setting of the AP, AP50 and AP75
        summaries.
        """
        p = ev.params
        if not getattr(p, "useCats", 1):
            raise ValueError("per-image records need COCOeval with useCats=1")
        area_all = [tuple(a) for a in p.areaRng].index(tuple(p.areaRng[p.areaRngLbl.index("all")]))
        img_ids = list(p.imgIds)
        cat_ids = list(p.catIds)
        n_img, n_area = len(img_ids), len(p.areaRng)
        max_det = int(p.maxDets[-1])
        n_thr = len(p.iouThrs)
        npig = np.zeros((n_img, len(cat_ids)), np.int64)
        starts = [0]
        imgs: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        tps: list[np.ndarray] = []
        fps: list[np.ndarray] = []
        for k in range(len(cat_ids)):
            base = k * n_area * n_img + area_all * n_img
            k_img: list[np.ndarray] = []
            k_score: list[np.ndarray] = []
            k_m: list[np.ndarray] = []
            k_ig: list[np.ndarray] = []
            for i in range(n_img):
                e = ev.evalImgs[base + i]
                if e is None:
                    continue
                npig[i, k] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                s = np.asarray(e["dtScores"], np.float64)[:max_det]
                k_score.append(s)
                k_img.append(np.full(len(s), i, np.int32))
                k_m.append(np.asarray(e["dtMatches"])[:, :max_det].reshape(n_thr, -1) > 0)
                k_ig.append(np.asarray(e["dtIgnore"])[:, :max_det].reshape(n_thr, -1).astype(bool))
            if k_score:
                s = np.concatenate(k_score)
                order = np.argsort(-s, kind="mergesort")  # what accumulate does
                m = np.concatenate(k_m, axis=1)[:, order]
                ig = np.concatenate(k_ig, axis=1)[:, order]
                scores.append(s[order])
                imgs.append(np.concatenate(k_img)[order])
                tps.append(m & ~ig)
                fps.append(~m & ~ig)
            starts.append(starts[-1] + (len(scores[-1]) if k_score else 0))
        cat_start = np.asarray(starts, np.int64)
        return cls(
            image_ids=np.asarray(img_ids, np.int64), cat_ids=np.asarray(cat_ids, np.int64),
            iou_thrs=np.asarray(p.iouThrs, np.float64), rec_thrs=np.asarray(p.recThrs, np.float64), npig=npig,
            cat_start=cat_start,
            det_img=np.concatenate(imgs) if imgs else np.zeros(0, np.int32),
            det_score=np.concatenate(scores) if scores else np.zeros(0, np.float64),
            det_tp=np.concatenate(tps, axis=1) if tps else np.zeros((n_thr, 0), bool),
            det_fp=np.concatenate(fps, axis=1) if fps else np.zeros((n_thr, 0), bool),
            max_det=max_det)

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the records as a compressed ``.npz`` (atomically: a temporary file, then a rename)."""
        import json

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, version=np.array(FORMAT_VERSION), image_ids=self.image_ids, cat_ids=self.cat_ids,
                iou_thrs=self.iou_thrs, rec_thrs=self.rec_thrs, npig=self.npig, cat_start=self.cat_start,
                det_img=self.det_img, det_score=self.det_score, det_tp=self.det_tp, det_fp=self.det_fp,
                max_det=np.array(self.max_det), info=np.array(json.dumps(self.info, sort_keys=True)))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PerImageEval:
        """Read records written by :meth:`save`; ``ValueError`` for another format version."""
        import json

        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != FORMAT_VERSION:
                raise ValueError(f"{path}: per-image records of format {int(z['version'])}, expected {FORMAT_VERSION}")
            return cls(image_ids=z["image_ids"], cat_ids=z["cat_ids"], iou_thrs=z["iou_thrs"], rec_thrs=z["rec_thrs"],
                       npig=z["npig"], cat_start=z["cat_start"], det_img=z["det_img"], det_score=z["det_score"],
                       det_tp=z["det_tp"], det_fp=z["det_fp"], max_det=int(z["max_det"]),
                       info=json.loads(str(z["info"])))

    # -- metrics --------------------------------------------------------------------------------
    def map(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """mAP50-95 and mAP50 for one image weighting (default: every image once, i.e. pycocotools)."""
        w = np.ones((1, self.num_images), np.int64) if weights is None else np.asarray(weights)[None]
        out = weighted_map(self, w)
        return {m: float(v[0]) for m, v in out.items()}

    def select(self, indices: Sequence[int] | np.ndarray) -> PerImageEval:
        """The records of a subset of the images (by index): what COCOeval gives on those images alone.

        COCOeval matches each image on its own, so a subset's records are the full set's
        restricted to its images (their order kept; the indices are sorted like image ids).
        """
        sel = np.unique(np.asarray(indices, np.int64))
        if len(sel) and (sel[0] < 0 or sel[-1] >= self.num_images):
            raise IndexError(f"image indices must lie in [0, {self.num_images})")
        remap = np.full(self.num_images, -1, np.int64)
        remap[sel] = np.arange(len(sel))
        keep = remap[self.det_img] >= 0
        cat_of = np.repeat(np.arange(len(self.cat_ids)), np.diff(self.cat_start))
        counts = np.bincount(cat_of[keep], minlength=len(self.cat_ids))
        return PerImageEval(
            image_ids=self.image_ids[sel], cat_ids=self.cat_ids, iou_thrs=self.iou_thrs, rec_thrs=self.rec_thrs,
            npig=self.npig[sel], cat_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            det_img=remap[self.det_img[keep]].astype(np.int32), det_score=self.det_score[keep],
            det_tp=self.det_tp[:, keep], det_fp=self.det_fp[:, keep], max_det=self.max_det, info=dict(self.info))

    def same_images(self, other: PerImageEval) -> bool:
        return (np.array_equal(self.image_ids, other.image_ids) and np.array_equal(self.cat_ids, other.cat_ids)
                and np.array_equal(self.npig, other.npig) and np.array_equal(self.iou_thrs, other.iou_thrs))


def _need_counts(rec_thrs: np.ndarray, npig: np.ndarray) -> np.ndarray:
    """(B, R) int64: for each total ``npig[b]`` and threshold, the smallest integer ``k`` with ``k / npig >= r``.

    The comparison is made in float64 exactly as pycocotools' ``searchsorted(tp / npig, r)``
    makes it (``tp / npig`` is monotone in ``tp``), so the index found by searching the
    integer true-positive counts for ``k`` is pycocotools' index. Rows with ``npig`` 0 get 0
    (their category is left out of that resample).
    """
    n = np.maximum(npig, 1).astype(np.float64)[:, None]
    base = np.maximum(np.floor(rec_thrs[None, :] * n) - 2, 0)
    cands = base[..., None] + np.arange(5)[None, None, :]  # (B, R, 5): the answer lies within
    ok = (cands / n[..., None]) >= rec_thrs[None, :, None]
    first = np.argmax(ok, axis=-1)  # r <= 1: k = npig always qualifies
    need = np.take_along_axis(cands, first[..., None], axis=-1)[..., 0]
    return np.where(npig[:, None] > 0, need, 0).astype(np.int64)


@dataclass(frozen=True, eq=False)
class _ClassCounts:
    """One category's records in the form resamples need.

    Only detections that are a true positive at some IoU threshold are kept (``nk``
    positions, in score order): the precision a recall threshold reads is always at a
    true positive, and the envelope there is the maximum over later true positives. The
    other detections only add false positives before a kept one, and are folded into the
    cumulative counts. ``tp``/``fp`` are (I, T, nk): image ``i``'s true/false positives
    at each threshold among the detections up to and including each kept position, so a
    resample's cumulative counts are ``weights @ tp``.
    """

    tp: np.ndarray
    fp: np.ndarray

    @property
    def nk(self) -> int:
        return int(self.tp.shape[-1])


def _class_counts(pe: PerImageEval, k: int) -> _ClassCounts:
    s, e = int(pe.cat_start[k]), int(pe.cat_start[k + 1])
    n_img, n_thr = pe.num_images, len(pe.iou_thrs)
    tp, fp, img = pe.det_tp[:, s:e], pe.det_fp[:, s:e], pe.det_img[s:e].astype(np.int64)
    kept = np.flatnonzero(tp.any(0))
    nk = len(kept)
    if nk == 0:
        z = np.zeros((n_img, n_thr, 0), np.float64)
        return _ClassCounts(z, z)
    seg = np.searchsorted(kept, np.arange(e - s), side="left")  # detection -> first kept position at or after it
    inside = seg < nk  # detections after the last kept one never matter
    out = []
    for flags in (tp, fp):
        cnt = np.zeros((n_thr, n_img * nk), np.float64)
        idx = img[inside] * nk + seg[inside]
        for t in range(n_thr):
            cnt[t] = np.bincount(idx, weights=flags[t, inside], minlength=n_img * nk)
        cnt = np.cumsum(cnt.reshape(n_thr, n_img, nk), axis=-1)
        out.append(np.ascontiguousarray(cnt.transpose(1, 0, 2)))  # (I, T, nk)
    return _ClassCounts(out[0], out[1])


def weighted_map(pe: PerImageEval, weights: np.ndarray, *, max_cells: int = 4_000_000) -> dict[str, np.ndarray]:
    """mAP50-95 and mAP50 for each row of integer image weights ``weights`` (B, I).

    ``weights[b, i]`` is how many times image ``i`` counts in resample ``b`` (0 leaves it
    out). A category with no non-ignored ground truth in a resample is left out of that
    resample's mean, as pycocotools leaves it out (precision -1). Work is chunked so that
    at most ``max_cells`` (B x T x kept detections) values are held at once.
    """
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != pe.num_images:
        raise ValueError(f"weights must be (resamples, {pe.num_images}), got {w.shape}")
    if not np.issubdtype(w.dtype, np.integer) and not np.array_equal(w, np.round(w)):
        raise ValueError("weights must be integer multiplicities")
    if (w < 0).any():
        raise ValueError("weights must not be negative")
    w = w.astype(np.int64)
    wf = w.astype(np.float64)
    n_b = w.shape[0]
    n_t, n_r = len(pe.iou_thrs), len(pe.rec_thrs)
    sums = np.zeros((n_b, n_t), np.float64)  # per threshold: sum over valid categories of sum over R of precision
    valid = np.zeros(n_b, np.int64)
    npig_w = w @ pe.npig  # (B, K)
    cache = pe.__dict__.setdefault("_class_counts", {})
    for k in range(len(pe.cat_ids)):
        has_gt = npig_w[:, k] > 0
        valid += has_gt
        if not has_gt.any():
            continue
        if k not in cache:
            cache[k] = _class_counts(pe, k)
        cc: _ClassCounts = cache[k]
        nk = cc.nk
        if nk == 0:
            continue  # no true positive at any threshold: precision 0 at every recall threshold
        tp_mat = cc.tp.reshape(pe.num_images, n_t * nk)
        fp_mat = cc.fp.reshape(pe.num_images, n_t * nk)
        chunk = max(1, min(n_b, max_cells // (n_t * nk)))
        for b0 in range(0, n_b, chunk):
            wb = wf[b0:b0 + chunk]
            nb = wb.shape[0]
            tp = (wb @ tp_mat).reshape(nb, n_t, nk)  # exact: integer counts in float64
            fp = (wb @ fp_mat).reshape(nb, n_t, nk)
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[..., ::-1], axis=-1)[..., ::-1]  # precision envelope
            need = _need_counts(pe.rec_thrs, npig_w[b0:b0 + nb, k])  # (nb, R)
            # first kept position with tp >= need, per (b, t) row: tp is a nondecreasing integer
            # sequence, so that index is the number of its values below need (a per-row histogram)
            rows = nb * n_t
            tpi = np.rint(tp).astype(np.int64).reshape(rows, nk)
            top = int(max(int(tpi.max(initial=0)), int(need.max(initial=0)))) + 1
            hist = np.bincount((tpi + (np.arange(rows, dtype=np.int64) * top)[:, None]).ravel(),
                               minlength=rows * top).reshape(rows, top)
            below = np.zeros((rows, top + 1), np.int64)
            np.cumsum(hist, axis=1, out=below[:, 1:])  # below[:, k]: values < k
            q_need = np.broadcast_to(need[:, None, :], (nb, n_t, n_r)).reshape(rows, n_r)
            idx = np.take_along_axis(below, q_need, axis=1)
            inside = idx < nk
            q = np.where(inside, np.take_along_axis(pr.reshape(rows, nk), np.minimum(idx, nk - 1), axis=1), 0.0)
            sums[b0:b0 + nb] += np.where(has_gt[b0:b0 + nb, None], q.reshape(nb, n_t, n_r).sum(-1), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = (valid * n_r).astype(np.float64)
        map50_95 = np.where(valid > 0, sums.sum(1) / (denom * n_t), -1.0)
        i50 = int(np.argmin(np.abs(pe.iou_thrs - 0.5)))
        map50 = np.where(valid > 0, sums[:, i50] / denom, -1.0)
    return {"map50_95": map50_95, "map50": map50}


@dataclass(frozen=True)
class BootstrapInterval:
    """A paired bootstrap interval of ``metric(a) - metric(b)`` over the same images.

    ``delta`` is the change on the evaluated images; ``low``/``high`` the percentile
    interval at ``level``; ``std`` the resamples' standard deviation.
    """

    metric: str
    delta: float
    low: float
    high: float
    std: float
    level: float
    n_boot: int
    n_images: int
    seed: int
    method: str = "paired percentile bootstrap over images"

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def within_each_other(a: BootstrapInterval, b: BootstrapInterval) -> bool:
    """True when each change lies inside the other's interval (the two are not told apart)."""
    return a.contains(b.delta) and b.contains(a.delta)


def resample_weights(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n_images) multinomial counts: each row draws ``n_images`` images with replacement."""
    if n_images <= 0 or n_boot <= 0:
        raise ValueError("need at least one image and one resample")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_boot).astype(np.int64)


class PairedBootstrap:
    """Intervals of ``metric(trial) - metric(reference)`` with the same resamples for all trials.

    Args:
        reference: the float model's records on the images.
        n_boot: number of resamples (1000 by default: the 2.5 % tails then hold 25 resamples each).
        seed: seeds the resamples; the same seed gives the same intervals.
        level: the interval's coverage (0.95).
    """

    def __init__(self, reference: PerImageEval, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        self.reference = reference
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        self.level = float(level)
        self.weights = resample_weights(reference.num_images, self.n_boot, self.seed)
        self._ref = self.resampled(reference)
        self._ref_full = reference.map()

    def resampled(self, pe: PerImageEval) -> dict[str, np.ndarray]:
        """Each metric of ``pe`` on every resample (B,)."""
        if not pe.same_images(self.reference):
            raise ValueError("the two evaluations are not on the same images and ground truth; a paired "
                             "bootstrap needs both models scored on the same image set")
        return weighted_map(pe, self.weights)

    def interval(self, trial: PerImageEval, metric: str = "map50_95") -> BootstrapInterval:
        """The interval of ``metric(trial) - metric(reference)``."""
        return self.intervals(trial, (metric,))[metric]

    def intervals(self, trial: PerImageEval, metrics: Sequence[str] = METRICS) -> dict[str, BootstrapInterval]:
        res = self.resampled(trial)
        full = trial.map()
        out = {}
        for m in metrics:
            out[m] = self._interval(m, full[m] - self._ref_full[m], res[m] - self._ref[m])

        return out

    def compare(self, a: PerImageEval, b: PerImageEval, metric: str = "map50_95") -> BootstrapInterval:
        """The interval of ``metric(a) - metric(b)`` for two trials, on the same resamples."""
        ra, rb = self.resampled(a)[metric], self.resampled(b)[metric]
        return self._interval(metric, a.map()[metric] - b.map()[metric], ra - rb)

    def _interval(self, metric: str, delta: float, diffs: np.ndarray) -> BootstrapInterval:
        alpha = (1.0 - self.level) / 2.0
        lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
        return BootstrapInterval(metric=metric, delta=float(delta), low=float(lo), high=float(hi),
                                 std=float(diffs.std(ddof=1)) if len(diffs) > 1 else 0.0, level=self.level,
                                 n_boot=self.n_boot, n_images=self.reference.num_images, seed=self.seed)
