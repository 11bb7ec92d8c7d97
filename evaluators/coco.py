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
- ``COCOeval(iouType="bbox")`` restricted to the subset's image ids;
- what COCOeval decided per image (:class:`evaluators.bootstrap.PerImageEval`) is kept for
  each evaluated file, in ``cache_dir/per-image/<onnx digest>-<subset and settings key>.npz``,
  so a paired bootstrap interval of a mAP change costs no extra inference
  (:meth:`CocoEvaluator.per_image`).

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
from evaluators.bootstrap import PerImageEval
from evaluators.decode import Detections, decode, to_coco_json, to_original
from evaluators.errors import ModelFormatError
from evaluators.session import ModelIO, SessionReport, check_image_input, detect_layout, open_session
from mpq.data import LetterboxMeta, class_to_category
from mpq.files import file_digest
from mpq.keys import image_list_digest, per_image_key

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


def postprocess_info(layout: str, settings: EvaluationSpec, multi_label: bool = True) -> dict[str, Any]:
    """How detections were made from a model's output (for tables and metadata files)."""
    if layout == "end2end":
        return {"kind": "topk", "head": "one2one", "conf": settings.conf, "max_det": settings.max_det,
                "label": f"NMS-free top-k (one-to-one head), conf > {settings.conf:g}, max_det {settings.max_det}"}
    return {"kind": "nms", "head": "one2many", "conf": settings.conf, "iou": settings.iou,
            "max_det": settings.max_det, "multi_label": multi_label, "class_aware": True,
            "label": f"NMS (one-to-many head), conf > {settings.conf:g}, IoU {settings.iou:g}, "
                     f"max_det {settings.max_det}{', multi-label' if multi_label else ''}"}


def _empty_results(gt: Any) -> Any:
    """A pycocotools result set with no detections (``loadRes`` refuses an empty list)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset["images"] = list(gt.dataset["images"])
    res.dataset["categories"] = list(gt.dataset["categories"])
    res.dataset["annotations"] = []
    res.createIndex()
    return res


class PerImageStore:
    """Per-image records of evaluated files, by file digest: the last few in memory, all in
    ``cache_dir/per-image/<digest>-<key>.npz`` (``key``: :func:`mpq.keys.per_image_key`)."""

    def __init__(self, *, cache_dir: Path | None, key: str, keep: int = 8) -> None:
        self.cache_dir = cache_dir
        self.key = key
        self.keep = keep
        self._memory: dict[str, PerImageEval] = {}

    def file(self, digest: str) -> Path | None:
        """The records file of a digest (None without a cache folder)."""
        return None if self.cache_dir is None else self.cache_dir / "per-image" / f"{digest}-{self.key}.npz"

    def get(self, digest: str) -> PerImageEval | None:
        """The records of a digest, from memory or the cache folder (None when neither has them)."""
        if digest in self._memory:
            return self._memory[digest]
        path = self.file(digest)
        if path is None or not path.is_file():
            return None
        try:
            pe = PerImageEval.load(path)
        except (OSError, ValueError, KeyError):
            return None
        self._remember(digest, pe)
        return pe

    def put(self, digest: str, pe: PerImageEval) -> Path | None:
        """Keep the records of a digest (and write them to the cache folder); returns the file."""
        self._remember(digest, pe)
        path = self.file(digest)
        if path is not None:
            pe.save(path)
        return path

    def _remember(self, digest: str, pe: PerImageEval) -> None:
        recent = [(k, v) for k, v in self._memory.items() if k != digest][-(self.keep - 1):]
        self._memory = {digest: pe, **dict(recent)}


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
        self.records = PerImageStore(cache_dir=self.cache_dir, key=per_image_key(
            subset.image_ids, subset.annotations_path, imgsz=self.imgsz, category_ids=self.category_ids,
            settings=f"{self.settings.conf} {self.settings.iou} {self.settings.max_det} {multi_label}"))

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

    def score(self, results: list[dict[str, Any]], *, per_image: bool = False) -> dict[str, Any]:
        """pycocotools COCOeval of COCO-format results on the subset: stats and per-class AP.

        With ``per_image``, also what COCOeval decided per image (``"per_image"``, a
        :class:`~evaluators.bootstrap.PerImageEval`).
        """
        from pycocotools.cocoeval import COCOeval

        gt = self.subset.coco()
        cat_to_name = {cat: self.names[i] for i, cat in enumerate(self.category_ids)}
        with contextlib.redirect_stdout(io.StringIO()):
            # no results: COCOeval on an empty result set (every category with GT scores 0)
            dt = gt.loadRes(results) if results else _empty_results(gt)
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
        if not results:
            stats = [0.0] * 12
        out: dict[str, Any] = {"stats": stats, "per_class": per_class, "classes_without_gt": without_gt}
        if per_image:
            out["per_image"] = PerImageEval.from_cocoeval(ev)
        return out

    # -- per-image records (bootstrap) --------------------------------------------------------
    def per_image_file(self, onnx_digest: str) -> Path | None:
        """Where the per-image records of the file with digest ``onnx_digest`` are kept (None: no cache_dir)."""
        return self.records.file(onnx_digest)

    def per_image(self, onnx_path: str | os.PathLike[str]) -> PerImageEval:
        """What COCOeval decided per image for ``onnx_path`` on the subset: from the records
        :meth:`evaluate` keeps (memory, then ``cache_dir``); evaluated only when neither has it."""
        digest = file_digest(onnx_path)
        pe = self.records.get(digest)
        if pe is None:
            self.evaluate(onnx_path)
            pe = self.records.get(digest)
        assert pe is not None
        return pe

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
        scored = self.score(results, per_image=True)
        t_end = time.perf_counter()
        digest = file_digest(onnx_path)
        records = self.records.put(digest, scored["per_image"])
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
            extra={"onnx": str(onnx_path), "onnx_sha256": digest, "layout": pred.layout,
                   "postprocess": postprocess_info(pred.layout, s, self.multi_label),
                   "per_image": str(records) if records is not None else None,
                   "input_shape": [d if isinstance(d, int) else str(d) for d in pred.io.input_shape],
                   "imgsz": self.imgsz, "conf": s.conf, "iou": s.iou, "max_det": s.max_det,
                   "multi_label": self.multi_label, "session": pred.report.to_dict(),
                   "timings": {k: round(v, 4) for k, v in timings.items()},
                   "coco_stats": dict(zip(COCO_STAT_NAMES, stats, strict=True)),
                   "classes_without_gt": scored["classes_without_gt"],
                   "annotations": str(self.subset.annotations_path),
                   "category_ids": list(self.category_ids)},
        )
