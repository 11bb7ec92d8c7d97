"""Ultralytics itself as the reference for our evaluation contract (and its own mAP, side by side).

- :func:`yolo_dataset` writes a YOLO-format view of a COCO subset (symlinked images named
  by COCO image id, label files, ``data.yaml``), so Ultralytics validates exactly the
  subset we score, and its ``save_json`` predictions carry COCO image ids.
- :func:`ultralytics_onnx` copies an ONNX file with the metadata Ultralytics' AutoBackend
  reads (names, imgsz, end2end); the graph is untouched.
- :func:`ultralytics_val` runs ``YOLO(onnx).val(save_json=True, rect=False)`` and reports
  Ultralytics' internal mAP (its own interpolation and matching) and pycocotools' mAP of
  its saved predictions, plus its images/s. Stock val rounds resized image sides up where
  predict rounds to nearest; ``letterbox="predict"`` runs the same validator with predict's
  rounding (see :func:`ultralytics_val`).
- :func:`ultralytics_predict` runs ``YOLO(onnx).predict`` at the same fixed input size
  (predict letterboxes exactly as we do).

Ultralytics runs offline (``mpq.env.import_ultralytics``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluators.decode import Detections
from evaluators.onnx_graph import load, ultralytics_metadata, write_metadata
from evaluators.session import LAYOUT_END2END

if TYPE_CHECKING:
    from evaluators.coco import CocoEvaluator
    from mpq.data import CocoSubset


@dataclass(frozen=True)
class UltralyticsValResult:
    """Ultralytics' validator on an ONNX model: its own mAP and pycocotools on its predictions."""

    map50_95: float
    map50: float
    coco_map50_95: float
    coco_map50: float
    num_images: int
    num_detections: int
    images_per_s: float
    seconds: float
    speed_ms: dict[str, float]
    predictions: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of every field."""
        return asdict(self)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Ultralytics' logger and stdout for the duration."""
    from mpq.env import import_ultralytics

    import_ultralytics()
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        LOGGER.setLevel(level)


def yolo_dataset(subset: CocoSubset, names: Mapping[int, str], category_ids: Sequence[int], root: Path) -> Path:
    """Write a YOLO-format dataset of ``subset`` under ``root``; returns its ``data.yaml``.

    Images are symlinks named ``<coco image id><suffix>``; crowd annotations are left out
    (pycocotools ignores them too).
    """
    import yaml

    images = root / "images" / "val"
    labels = root / "labels" / "val"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    cls_of = {int(c): i for i, c in enumerate(category_ids)}
    coco = subset.coco()
    for rec in subset.records:
        link = images / f"{rec.id}{rec.path.suffix.lower()}"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(rec.path.resolve())
        w, h = rec.width, rec.height
        if not (w and h):
            from mpq.data import load_image

            h, w = load_image(rec.path).shape[:2]
        rows = []
        for ann in coco.imgToAnns.get(rec.id, []):
            if ann.get("iscrowd", 0) or int(ann["category_id"]) not in cls_of:
                continue
            x, y, bw, bh = ann["bbox"]
            if bw <= 0 or bh <= 0:
                continue
            rows.append(f"{cls_of[int(ann['category_id'])]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                        f"{bw / w:.6f} {bh / h:.6f}")
        (labels / f"{rec.id}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    data = {"path": str(root), "train": "images/val", "val": "images/val",
            "names": {int(k): str(v) for k, v in names.items()}}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    for cache in (root / "labels").glob("*.cache"):
        cache.unlink()
    return yaml_path


def ultralytics_onnx(onnx_path: str | os.PathLike[str], dst: Path, *, names: Mapping[int, str], imgsz: int,
                     layout: str = LAYOUT_END2END) -> Path:
    """A copy of ``onnx_path`` carrying Ultralytics' metadata (names, imgsz, end2end, batch)."""
    model = load(onnx_path)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    dynamic = not dim0.HasField("dim_value")
    batch = 1 if dynamic else int(dim0.dim_value)
    meta = ultralytics_metadata(names=names, imgsz=imgsz, end2end=layout == LAYOUT_END2END,
                                dynamic_batch=dynamic, batch=batch)
    dst.parent.mkdir(parents=True, exist_ok=True)
    return write_metadata(onnx_path, meta, dst)


def _predict_resize_load_image(self: Any, i: int, rect_mode: bool = True, resize_short: bool = False
                               ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """``BaseDataset.load_image`` with predict's rounding: long side to imgsz, each side rounded.

    Stock val rounds the resized sides up (``math.ceil``), the predictor's ``LetterBox``
    rounds them to nearest; with the image already at the letterbox size, val's own
    ``LetterBox(scaleup=False)`` then only pads, exactly as predict (and our evaluator) does.
    """
    import cv2

    im = cv2.imread(self.im_files[i], cv2.IMREAD_COLOR)
    if im is None:
        raise FileNotFoundError(f"Image Not Found {self.im_files[i]}")
    h0, w0 = im.shape[:2]
    size = max(self.imgsz) if isinstance(self.imgsz, (tuple, list)) else self.imgsz
    r = size / max(h0, w0)
    w, h = max(round(w0 * r), 1), max(round(h0 * r), 1)
    if (w, h) != (w0, h0):
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    return im, (h0, w0), im.shape[:2]


def _predict_letterbox_validator() -> Any:
    """A ``DetectionValidator`` whose dataset resizes images as the predictor does (see above)."""
    import types

    from ultralytics.models.yolo.detect import DetectionValidator

    class PredictLetterboxValidator(DetectionValidator):
        def build_dataset(self, img_path: str, mode: str = "val", batch: int | None = None) -> Any:
            dataset: Any = super().build_dataset(img_path, mode, batch)
            dataset.load_image = types.MethodType(_predict_resize_load_image, dataset)
            return dataset

    return PredictLetterboxValidator


def ultralytics_val(onnx_path: str | os.PathLike[str], *, evaluator: CocoEvaluator, workdir: Path,
                    layout: str = LAYOUT_END2END, batch_size: int | None = None,
                    letterbox: str = "val") -> UltralyticsValResult:
    """Ultralytics' validator on ``onnx_path`` over the evaluator's subset, with ``save_json``.

    ``coco_map50_95`` is pycocotools on Ultralytics' own saved predictions (their category
    ids mapped back to the dataset's), scored by the evaluator's ``score`` on the same image ids.

    ``letterbox="val"`` runs the stock validator, whose dataset rounds resized image sides up
    (``math.ceil``) where the predictor (and the seeds' contract, and our evaluator) rounds
    to nearest: a sub-pixel difference in the input that moves a good model's mAP by a few
    thousandths. ``letterbox="predict"`` runs the same validator with predict's rounding
    (only the image loading differs), so its predictions are ours up to its 3-decimal JSON
    rounding: that is the exact check of our decoding, mapping and scoring.
    """
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    from mpq.env import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    if letterbox not in ("val", "predict"):
        raise ValueError(f"letterbox must be 'val' or 'predict', got {letterbox!r}")

    s = evaluator.settings
    workdir = Path(workdir)
    data = yolo_dataset(evaluator.subset, evaluator.names, evaluator.category_ids, workdir / "dataset")
    model_path = ultralytics_onnx(onnx_path, workdir / "model" / "model.onnx", names=evaluator.names,
                                  imgsz=evaluator.imgsz, layout=layout)
    t0 = time.perf_counter()
    with _quiet():
        model = YOLO(str(model_path), task="detect")
        validator = _predict_letterbox_validator() if letterbox == "predict" else None
        metrics = model.val(validator=validator, data=str(data), imgsz=evaluator.imgsz,
                            batch=batch_size or s.batch_size, conf=s.conf, iou=s.iou, max_det=s.max_det,
                            save_json=True, rect=False, plots=False, device="cpu", workers=0, project=str(workdir),
                            name=f"val-{letterbox}", exist_ok=True, verbose=False, half=False)
    seconds = time.perf_counter() - t0
    pred_file = Path(metrics.save_dir) / "predictions.json"
    raw = json.loads(pred_file.read_text()) if pred_file.is_file() else []
    # Ultralytics writes class_map[c] = c + 1 for non-COCO data (coco80_to_91 for COCO): map back by class
    class_map = list(range(1, len(evaluator.names) + 1))
    if len(raw) and max(int(r["category_id"]) for r in raw) > len(evaluator.names):
        from mpq.data import COCO80_TO_91

        class_map = list(COCO80_TO_91)
    to_cls = {c: i for i, c in enumerate(class_map)}
    results = [{"image_id": int(r["image_id"]), "category_id": evaluator.category_ids[to_cls[int(r["category_id"])]],
                "bbox": r["bbox"], "score": r["score"]} for r in raw]
    scored = evaluator.score(results)
    n = len(evaluator.subset)
    return UltralyticsValResult(
        map50_95=float(metrics.box.map), map50=float(metrics.box.map50), coco_map50_95=scored["stats"][0],
        coco_map50=scored["stats"][1], num_images=n, num_detections=len(results), images_per_s=n / seconds,
        seconds=seconds, speed_ms={k: float(v) for k, v in metrics.speed.items()}, predictions=str(pred_file),
        extra={"data": str(data), "model": str(model_path), "letterbox": letterbox, "per_class_map": {
            evaluator.names[int(i)]: float(metrics.box.maps[int(i)]) for i in range(len(evaluator.names))}})


def ultralytics_predict(onnx_path: str | os.PathLike[str], paths: Sequence[Path], *, names: Mapping[int, str],
                        imgsz: int, conf: float, iou: float, max_det: int, workdir: Path,
                        layout: str = LAYOUT_END2END) -> list[Detections]:
    """``YOLO(onnx).predict`` on ``paths`` at a fixed ``imgsz`` input: detections in original pixels."""
    from mpq.env import import_ultralytics

    import_ultralytics()
    from ultralytics import YOLO

    model_path = ultralytics_onnx(onnx_path, Path(workdir) / "predict-model" / "model.onnx", names=names,
                                  imgsz=imgsz, layout=layout)
    out: list[Detections] = []
    with _quiet():
        model = YOLO(str(model_path), task="detect")
        for p in paths:
            (res,) = model.predict(str(p), imgsz=imgsz, conf=conf, iou=iou, max_det=max_det, rect=False,
                                   device="cpu", verbose=False, save=False, half=False)
            b: Any = getattr(res, "boxes", None)
            out.append(Detections(b.xyxy.cpu().numpy().astype(np.float32), b.conf.cpu().numpy().astype(np.float32),
                                  b.cls.cpu().numpy().astype(np.int64)))
    return out
