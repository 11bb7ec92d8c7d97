"""COCO bbox accuracy of an ONNX detector through ONNX Runtime, scored by pycocotools.

The evaluation contract, which ``tests/integration/test_coco_contract.py`` proves against
Ultralytics itself:

- the study's subset (sorted image ids, first ``max_images``, or an id-list file);
- Ultralytics' letterbox (``auto=False``, scale up, centred padding of 114), BGR -> RGB,
  /255, NCHW float32; preprocessed once per run directory (``cache_dir``, an ``.npz``),
  so a trial pays only for inference, decoding and scoring;
- decoding of YOLOv10 end-to-end ``(N, 300, 6)`` or raw ``(N, 4 + nc, anchors)`` outputs
  with NMS (:mod:`evaluators.decode`), conf 0.001, IoU 0.7, at most 300 detections;
- boxes mapped back through the exact letterbox of each image, classes mapped to the
  dataset's category ids (by name, else COCO's 80 -> 91 order or sorted ids);
- ``COCOeval(iouType="bbox")`` restricted to the subset's image ids.

Batches of ``settings.batch_size`` images go through one ``session.run`` when the model's
batch dimension is dynamic; a model exported with a fixed batch gets batches of that size
(the last one padded).
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluators.base import AccuracyResult
from evaluators.decode import Detections, decode, to_coco_json, to_original
from evaluators.errors import ModelFormatError
from evaluators.session import ModelIO, SessionReport, check_image_input, detect_layout, open_session
from mpq.data import LetterboxMeta, class_to_category
from mpq.files import file_digest
from mpq.keys import image_list_digest

if TYPE_CHECKING:
    from mpq.data import CocoSubset
    from mpq.options import EvaluationSpec

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


@dataclass(frozen=True, eq=False)
class Prediction:
    """Detections of one model on the subset (original image pixels) and how they were made."""

    detections: list[Detections]
    report: SessionReport
    io: ModelIO
    layout: str
    batch_size: int
    timings: dict[str, float] = field(default_factory=dict)


def _settings(settings: EvaluationSpec | None) -> EvaluationSpec:
    if settings is not None:
        return settings
    from mpq.options import EvaluationSpec

    return EvaluationSpec()


def run_batches(sess: Any, io: ModelIO, images: np.ndarray, batch_size: int, fixed_batch: int | None,
                *, outputs: list[str] | None = None, progress: bool = False,
                description: str = "inference") -> list[list[np.ndarray]]:
    """Run ``images`` through a session in batches; returns, per output name, the batch arrays.

    A fixed-batch model gets batches of exactly its size (the last one zero-padded, the
    padding dropped from the outputs).
    """
    bs = fixed_batch or batch_size
    names = outputs or [io.output_names[0]]
    half = io.input_type == "tensor(float16)"
    results: list[list[np.ndarray]] = [[] for _ in names]
    starts = list(range(0, len(images), bs))
    iterator: Any = starts
    if progress and len(starts) > 2:
        from rich.progress import track

        iterator = track(starts, description=description, transient=True)
    for s in iterator:
        batch = images[s:s + bs]
        n = len(batch)
        if fixed_batch and n < fixed_batch:
            batch = np.concatenate([batch, np.zeros((fixed_batch - n, *batch.shape[1:]), batch.dtype)])
        if half:
            batch = batch.astype(np.float16)
        outs = sess.run(names, {io.input_name: np.ascontiguousarray(batch)})
        for k, o in enumerate(outs):
            results[k].append(np.asarray(o, dtype=np.float32)[:n])
    return results


class CocoEvaluator:
    """COCO mAP of ONNX models on a study's evaluation subset.

    Args:
        subset: the evaluation images and annotations (:func:`mpq.data.load_coco_subset`).
        names: the model's class names (index -> name), mapped to the dataset's categories.
        imgsz: the square input size the models were exported at.
        settings: providers, thresholds, batch size, threads (``spec.evaluation``).
        cache_dir: where the preprocessed images are cached (``run_dir / "cache"``).
        progress: show rich progress bars for preprocessing and inference.
        multi_label: raw-output NMS keeps every class above ``conf`` per box (as Ultralytics'
            validator does); end-to-end outputs are not affected.
    """

    def __init__(self, *, subset: CocoSubset, names: Mapping[int, str], imgsz: int,
                 settings: EvaluationSpec | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 progress: bool = True, multi_label: bool = True):
        self.subset = subset
        self.names = {int(k): str(v) for k, v in names.items()}
        self.imgsz = int(imgsz)
        self.settings = _settings(settings)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self.multi_label = multi_label
        self.category_ids = class_to_category(self.names, subset.categories)
        self._images: tuple[np.ndarray, list[LetterboxMeta]] | None = None
        self.preprocess_seconds = 0.0

    # -- data -------------------------------------------------------------------------------
    @property
    def cache_file(self) -> Path | None:
        """Where the preprocessed subset is cached (``None`` without a cache folder)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"eval-{self.imgsz}-{len(self.subset)}-{image_list_digest(self.subset.paths)}.npz"

    def images(self) -> tuple[np.ndarray, list[LetterboxMeta]]:
        """The preprocessed subset ``(N, 3, S, S)`` and letterbox metas (computed once, cached)."""
        if self._images is None:
            from mpq.data import preprocess_many

            t = time.perf_counter()
            self._images = preprocess_many(self.subset.paths, self.imgsz, cache=self.cache_file,
                                           progress=self.progress, description="preprocess eval images")
            self.preprocess_seconds = time.perf_counter() - t
        return self._images

    # -- inference ----------------------------------------------------------------------------
    def predict(self, onnx_path: str | os.PathLike[str]) -> Prediction:
        """Detections of ``onnx_path`` on every subset image, in original image pixels."""
        s = self.settings
        images, metas = self.images()
        source = str(onnx_path)
        t0 = time.perf_counter()
        sess, report, mio = open_session(onnx_path, providers=s.providers, threads=s.threads,
                                         disable_cpu_fallback=s.disable_cpu_fallback,
                                         cache_dir=self.cache_dir)
        fixed = check_image_input(mio, self.imgsz, source)
        t1 = time.perf_counter()
        (outs,) = run_batches(sess, mio, images, s.batch_size, fixed, progress=self.progress,
                              description=f"eval {Path(source).name}")
        t2 = time.perf_counter()
        layout = detect_layout(outs[0].shape, num_classes=len(self.names), imgsz=self.imgsz, source=source)
        dets: list[Detections] = []
        for out in outs:
            dets.extend(decode(out, layout, conf=s.conf, iou=s.iou, max_det=s.max_det,
                               multi_label=self.multi_label))
        nc = len(self.names)
        for d in dets:
            if len(d) and (d.classes.min() < 0 or d.classes.max() >= nc):
                raise ModelFormatError(f"{source}: predicts class {int(d.classes.max())}, but the study's model has "
                                       f"{nc} classes ({', '.join(list(self.names.values())[:6])}...); expected "
                                       "a model of the same classes")
        dets = [to_original(d, m) for d, m in zip(dets, metas, strict=True)]
        t3 = time.perf_counter()
        return Prediction(dets, report, mio, layout, fixed or s.batch_size,
                          {"session_s": t1 - t0, "inference_s": t2 - t1, "decode_s": t3 - t2})

    # -- scoring ------------------------------------------------------------------------------
    def coco_results(self, dets: list[Detections]) -> list[dict[str, Any]]:
        """COCO-format results of detections in original pixels (one entry per subset image)."""
        return to_coco_json(dets, self.subset.image_ids, self.category_ids)

    def score(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """pycocotools COCOeval of COCO-format results on the subset: stats and per-class AP."""
        from pycocotools.cocoeval import COCOeval

        gt = self.subset.coco()
        cat_to_name = {cat: self.names[i] for i, cat in enumerate(self.category_ids)}
        if not results:
            return {"stats": [0.0] * 12, "per_class": {}, "classes_without_gt": []}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results)
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = list(self.subset.image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        per_class: dict[str, float] = {}
        without_gt: list[str] = []
        for k, cat in enumerate(ev.params.catIds):
            if cat not in cat_to_name:
                continue
            p = precision[:, :, k, 0, -1]
            if (p > -1).any():
                per_class[cat_to_name[cat]] = float(p[p > -1].mean())
            else:
                without_gt.append(cat_to_name[cat])
        stats = [float(x) for x in ev.stats]  # -1: no ground truth in that area range (pycocotools)
        return {"stats": stats, "per_class": per_class, "classes_without_gt": without_gt}

    def evaluate(self, onnx_path: str | os.PathLike[str]) -> AccuracyResult:
        """COCO mAP of ``onnx_path`` on the subset (see the module docstring for the contract).

        ``images_per_s`` is what a search trial pays per image: session creation, inference,
        decoding and COCOeval; the cached preprocessing is not counted (its time, non-zero
        only on the first call, is ``extra["timings"]["preprocess_s"]``).
        """
        start = time.perf_counter()
        self.images()
        t_ready = time.perf_counter()
        pred = self.predict(onnx_path)
        t_pred = time.perf_counter()
        results = self.coco_results(pred.detections)
        scored = self.score(results)
        t_end = time.perf_counter()
        stats = scored["stats"]
        n = len(self.subset)
        trial_s = t_end - t_ready
        s = self.settings
        timings = {**pred.timings, "cocoeval_s": t_end - t_pred, "trial_s": trial_s,
                   "preprocess_s": t_ready - start}
        return AccuracyResult(
            map50_95=stats[0], map50=stats[1], map75=stats[2], map_small=stats[3], map_medium=stats[4],
            map_large=stats[5], per_class=scored["per_class"], num_images=n, num_detections=len(results),
            images_per_s=n / trial_s if trial_s > 0 else 0.0, seconds=t_end - start,
            provider=pred.report.provider, batch_size=pred.batch_size,
            extra={"onnx": str(onnx_path), "onnx_sha256": file_digest(onnx_path), "layout": pred.layout,
                   "input_shape": [d if isinstance(d, int) else str(d) for d in pred.io.input_shape],
                   "imgsz": self.imgsz, "conf": s.conf, "iou": s.iou, "max_det": s.max_det,
                   "multi_label": self.multi_label, "session": pred.report.to_dict(),
                   "timings": {k: round(v, 4) for k, v in timings.items()},
                   "coco_stats": dict(zip(COCO_STAT_NAMES, stats, strict=True)),
                   "classes_without_gt": scored["classes_without_gt"],
                   "annotations": str(self.subset.annotations_path),
                   "category_ids": list(self.category_ids)},
        )
