"""Evaluation and calibration data: COCO-format subsets, image lists, calibration sets, letterbox.

- :func:`load_coco_subset` reads an images folder + instances json and picks a
  deterministic subset (the first ``max_images`` ids in sorted order, or the ids of an
  id-list file), checking that every picked image exists.
- :func:`read_calibration_list` reads a text list of image paths (relative to the list's
  folder, e.g. ``quant100.txt``) or every image of a folder, in sorted order; a
  :class:`CalibrationSet` holds them preprocessed, as backends calibrate on them.
- :func:`letterbox` is Ultralytics' ``LetterBox(auto=False, scaleup=True, center=True)``:
  keep aspect, resize with INTER_LINEAR, pad evenly with 114. :func:`preprocess` adds
  BGR->RGB, /255, CHW float32. :func:`unletterbox_boxes` maps boxes back, as
  Ultralytics' ``scale_boxes`` does.
- :func:`class_to_category` maps model class indices to the dataset's category ids (by
  name, or COCO's 80->91 order, or sorted ids when counts match).

Errors name the file at fault and say what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpq.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PAD_VALUE = 114


class DataError(UserError):
    """Bad or missing data; the message names the file."""


# --------------------------------------------------------------------------------------
# Images and letterbox
# --------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as BGR uint8 HWC, with a clear error for missing or corrupt files."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise DataError(f"image cannot be decoded (corrupt or not an image): {path}")
    return img


@dataclass(frozen=True)
class LetterboxMeta:
    """How an image was letterboxed: original (h, w), scale ratio and top/left padding."""

    orig_shape: tuple[int, int]
    ratio: float
    pad_left: int
    pad_top: int
    new_shape: tuple[int, int]


def letterbox(img: np.ndarray, imgsz: int | tuple[int, int]) -> tuple[np.ndarray, LetterboxMeta]:
    """Ultralytics' LetterBox(new_shape=imgsz, auto=False, scaleup=True, center=True)."""
    import cv2

    new_shape = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    shape = img.shape[:2]
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    new_unpad = max(round(shape[1] * r), 1), max(round(shape[0] * r), 1)
    dw = (new_shape[1] - new_unpad[0]) / 2
    dh = (new_shape[0] - new_unpad[1]) / 2
    if shape[::-1] != new_unpad:
        img = cv2.resize(img, new_unpad, interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return img, LetterboxMeta((int(shape[0]), int(shape[1])), float(r), int(left), int(top),
                              (int(new_shape[0]), int(new_shape[1])))


def to_chw_float(img_bgr: np.ndarray) -> np.ndarray:
    """BGR uint8 HWC -> RGB float32 CHW in [0, 1]."""
    return np.ascontiguousarray(img_bgr[..., ::-1].transpose(2, 0, 1), dtype=np.float32) / 255.0


def preprocess(path: str | os.PathLike[str], imgsz: int) -> tuple[np.ndarray, LetterboxMeta]:
    """Load, letterbox and normalize one image: ``(3, imgsz, imgsz)`` float32 and its meta."""
    img, meta = letterbox(load_image(path), imgsz)
    return to_chw_float(img), meta


def unletterbox_boxes(boxes_xyxy: np.ndarray, meta: LetterboxMeta, clip: bool = True) -> np.ndarray:
    """Map xyxy boxes from the letterboxed input back to original image pixels.

    Each axis is divided by its own gain (resized size / original size: the letterbox
    rounds each side), as Ultralytics' ``scale_boxes`` does.
    """
    out = np.array(boxes_xyxy, dtype=np.float32, copy=True)
    h, w = meta.orig_shape
    gain_x = max(round(w * meta.ratio), 1) / w
    gain_y = max(round(h * meta.ratio), 1) / h
    out[..., [0, 2]] -= meta.pad_left
    out[..., [1, 3]] -= meta.pad_top
    out[..., [0, 2]] /= gain_x
    out[..., [1, 3]] /= gain_y
    if clip:
        out[..., [0, 2]] = out[..., [0, 2]].clip(0, w)
        out[..., [1, 3]] = out[..., [1, 3]].clip(0, h)
    return out


def preprocess_many(paths: Sequence[Path], imgsz: int, *, cache: Path | None = None,
                    progress: bool = True, description: str = "preprocess") -> tuple[np.ndarray, list[LetterboxMeta]]:
    """Preprocess images into one ``(N, 3, imgsz, imgsz)`` float32 array.

    With ``cache`` (an ``.npz`` path), the array and metas are stored once and reused when
    the same paths and size are asked for again.
    """
    from mpq.keys import preprocess_key

    key = preprocess_key(paths, imgsz)
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if str(data["key"]) == key:
                    cached = [LetterboxMeta((int(m[0]), int(m[1])), float(m[2]), int(m[3]), int(m[4]),
                                            (imgsz, imgsz)) for m in data["metas"]]
                    return data["images"], cached
        except (OSError, KeyError, ValueError):
            pass
    arr = np.empty((len(paths), 3, imgsz, imgsz), dtype=np.float32)
    metas: list[LetterboxMeta] = []
    iterator: Iterable[tuple[int, Path]] = enumerate(paths)
    if progress and len(paths) > 8:
        from rich.progress import track

        iterator = track(list(iterator), description=description, transient=True)
    for i, p in iterator:
        arr[i], meta = preprocess(p, imgsz)
        metas.append(meta)
    if cache is not None:
        from mpq.files import atomic_path

        meta_arr = np.array([[m.orig_shape[0], m.orig_shape[1], m.ratio, m.pad_left, m.pad_top] for m in metas],
                            dtype=np.float64).reshape(-1, 5)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=arr, metas=meta_arr, key=np.array(key))
    return arr, metas


# --------------------------------------------------------------------------------------
# COCO subsets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    """One image of a COCO subset: its id, file and size."""

    id: int
    path: Path
    width: int
    height: int


@dataclass
class CocoSubset:
    """A deterministic subset of a COCO-format dataset."""

    annotations_path: Path
    images_dir: Path
    records: list[ImageRecord]
    categories: list[dict[str, Any]]
    num_annotations: int
    _coco: Any = field(default=None, repr=False)

    @property
    def image_ids(self) -> list[int]:
        """The subset's image ids, in order."""
        return [r.id for r in self.records]

    @property
    def paths(self) -> list[Path]:
        """The subset's image files, in order."""
        return [r.path for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def coco(self) -> Any:
        """A pycocotools ``COCO`` of the whole annotation file (loaded once, quietly)."""
        if self._coco is None:
            import contextlib
            import io

            from pycocotools.coco import COCO

            with contextlib.redirect_stdout(io.StringIO()):
                self._coco = COCO(str(self.annotations_path))
        return self._coco

    def head(self, n: int) -> CocoSubset:
        """The first ``n`` images of the subset."""
        return CocoSubset(self.annotations_path, self.images_dir, self.records[:n], self.categories,
                          self.num_annotations, self._coco)


def read_image_ids(path: str | os.PathLike[str]) -> list[int]:
    """Image ids, one per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image id list not found: {path}")
    ids = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise DataError(f"{path}:{lineno}: {text!r} is not an integer image id") from None
    if not ids:
        raise DataError(f"image id list is empty: {path}")
    return ids


def load_coco_subset(images_dir: str | os.PathLike[str], annotations: str | os.PathLike[str], *,
                     max_images: int | None = None, image_ids: str | os.PathLike[str] | None = None,
                     check_files: bool = True) -> CocoSubset:
    """Read the annotations and select the subset (sorted ids, first ``max_images``)."""
    images_dir = Path(images_dir)
    annotations = Path(annotations)
    if not annotations.is_file():
        raise DataError(f"annotations file not found: {annotations}")
    if not images_dir.is_dir():
        raise DataError(f"images folder not found: {images_dir}")
    try:
        data = json.loads(annotations.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{annotations}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{annotations}: not a COCO instances file (missing the '{key}' list)")
    by_id: dict[int, dict[str, Any]] = {}
    for im in data["images"]:
        try:
            by_id[int(im["id"])] = im
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{annotations}: an image entry lacks an integer 'id': {im!r}"[:300]) from None
    if image_ids is not None:
        ids = read_image_ids(image_ids)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{image_ids}: image ids not in {annotations.name}: {missing[:10]}"
                            + (" ..." if len(missing) > 10 else ""))
    else:
        ids = sorted(by_id)
        if max_images is not None:
            ids = ids[:max_images]
    if not ids:
        raise DataError(f"{annotations}: the subset is empty (no images)")
    records = []
    for i in ids:
        im = by_id[i]
        fname = im.get("file_name")
        if not fname:
            raise DataError(f"{annotations}: image {i} has no 'file_name'")
        path = images_dir / fname
        if check_files and not path.is_file():
            raise DataError(f"{annotations}: image {i} points at a missing file: {path}")
        records.append(ImageRecord(i, path, int(im.get("width", 0)), int(im.get("height", 0))))
    return CocoSubset(annotations, images_dir, records, list(data["categories"]), len(data["annotations"]))


# --------------------------------------------------------------------------------------
# Calibration lists
# --------------------------------------------------------------------------------------
def read_calibration_list(source: str | os.PathLike[str], max_images: int | None = None,
                          check_files: bool = True) -> list[Path]:
    """Image paths from a text list (relative to the list's folder) or a folder (sorted)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"calibration folder has no images ({', '.join(IMAGE_SUFFIXES)}): {source}")
    elif source.is_file():
        paths = []
        for lineno, line in enumerate(source.read_text().splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            p = Path(os.path.expanduser(text))
            if not p.is_absolute():
                p = source.parent / p
            if check_files and not p.is_file():
                raise DataError(f"{source}:{lineno}: calibration image not found: {p}")
            paths.append(p)
        if not paths:
            raise DataError(f"calibration list is empty: {source}")
    else:
        raise DataError(f"calibration source not found: {source} (a text list of image paths, or a folder)")
    if max_images is not None:
        paths = paths[:max_images]
    return paths


@dataclass
class CalibrationSet:
    """Calibration images, preprocessed exactly as the evaluator does: ``(N, 3, S, S)`` float32 RGB in [0, 1]."""

    images: np.ndarray
    paths: list[Path]
    batch_size: int = 16

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int | None = None) -> Iterable[np.ndarray]:
        """The images in batches of ``batch_size`` (default: the set's)."""
        bs = batch_size or self.batch_size
        for i in range(0, len(self), bs):
            yield self.images[i:i + bs]



# --------------------------------------------------------------------------------------
# Class -> category id
# --------------------------------------------------------------------------------------
COCO80_TO_91 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                85, 86, 87, 88, 89, 90)


def class_to_category(names: dict[int, str], categories: list[dict[str, Any]]) -> list[int]:
    """Category id for each model class index.

    By name when every class name is a category name (case-insensitive); otherwise by
    position in the sorted category ids when the counts match (COCO's 80 -> 91 mapping is
    this case; a dataset with contiguous ids maps as identity).
    """
    nc = len(names)
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
    mapped = [by_name.get(str(names[i]).lower()) for i in range(nc)]
    if all(m is not None for m in mapped):
        return [int(m) for m in mapped if m is not None]
    ids = sorted(int(c["id"]) for c in categories)
    if len(ids) == nc:
        return ids
    if nc == 80 and set(COCO80_TO_91) <= set(ids):
        return list(COCO80_TO_91)
    raise DataError(f"cannot map the model's {nc} classes to the dataset's {len(ids)} categories: class names "
                    f"{[names[i] for i in range(min(nc, 5))]}... do not match category names and the counts differ")
