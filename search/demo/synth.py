"""Deterministic synthetic detection dataset in COCO format (the offline demo fixture).

Each image is a textured background with a few filled shapes of six classes, varied in
size, colour, rotation and overlap. Images have varied sizes and aspect ratios so that
letterboxing is exercised. The generator is a pure function of its seed: the same seed
gives the same annotations (and, with the same OpenCV build, the same pixels).

The output folder holds, per split, ``images/<split>/*.jpg``, ``labels/<split>/*.txt``
(Ultralytics YOLO format, for training), ``annotations/instances_<split>.json`` (COCO
format, for evaluation), a ``data.yaml`` for Ultralytics and a ``calib.txt`` list.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SplitSpec:
    """How many images a split has and which seed draws them."""

    name: str
    num_images: int
    seed: int
    labelled: bool = True


DEFAULT_SPLITS: tuple[SplitSpec, ...] = (
    SplitSpec("train", 1600, 1001),
    SplitSpec("val", 200, 2002),
    SplitSpec("calib", 64, 3003, labelled=False),
)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    import cv2

    kind = rng.integers(0, 5)
    base = rng.integers(0, 256, size=3).astype(np.float32)
    other = rng.integers(0, 256, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # linear gradient
        ang = rng.uniform(0, math.pi)
        t = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    elif kind == 1:  # stripes
        period = rng.uniform(6, 30)
        ang = rng.uniform(0, math.pi)
        t = 0.5 + 0.5 * np.sin((np.cos(ang) * xx + np.sin(ang) * yy) * 2 * math.pi / period)
        img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 40))
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
        img = base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    elif kind == 3:  # blurred colour noise blobs
        small = rng.integers(0, 256, size=(max(h // 24, 2), max(w // 24, 2), 3)).astype(np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    else:  # flat colour
        img = np.broadcast_to(base[None, None], (h, w, 3)).astype(np.float32)
    img = img + rng.normal(0, rng.uniform(2, 14), size=(h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, cls: int, h: int, w: int, cx: float, cy: float,
                r: float) -> np.ndarray:
    import cv2

    mask = np.zeros((h, w), np.uint8)
    rot = rng.uniform(0, 2 * math.pi)
    center = (int(round(cx)), int(round(cy)))

    def poly(points: list[tuple[float, float]]) -> np.ndarray:
        return np.array([[cx + x * math.cos(rot) - y * math.sin(rot),
                          cy + x * math.sin(rot) + y * math.cos(rot)] for x, y in points],
                        dtype=np.float32).round().astype(np.int32)

    name = CLASS_NAMES[cls]
    if name == "circle":
        cv2.circle(mask, center, int(round(r)), 255, -1, cv2.LINE_8)
    elif name == "ring":
        cv2.circle(mask, center, int(round(r)), 255, -1, cv2.LINE_8)
        cv2.circle(mask, center, max(int(round(r * rng.uniform(0.45, 0.65))), 1), 0, -1, cv2.LINE_8)
    elif name == "square":
        s = r * 0.85
        cv2.fillPoly(mask, [poly([(-s, -s), (s, -s), (s, s), (-s, s)])], 255)
    elif name == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        cv2.fillPoly(mask, [poly(pts)], 255)
    elif name == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rr * math.cos(a), rr * math.sin(a)))
        cv2.fillPoly(mask, [poly(pts)], 255)
    elif name == "cross":
        t = r * 0.32
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t),
               (-r, t), (-r, -t), (-t, -t)]
        cv2.fillPoly(mask, [poly(pts)], 255)
    return mask


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ax1, ay1, aw, ah = a
    bx1, by1, bw, bh = b
    ix = max(0.0, min(ax1 + aw, bx1 + bw) - max(ax1, bx1))
    iy = max(0.0, min(ay1 + ah, by1 + bh) - max(ay1, by1))
    inter = ix * iy
    return inter / max(aw * ah + bw * bh - inter, 1e-9)


def render_image(seed: int) -> tuple[np.ndarray, list[dict]]:
    """Draw one image; returns the BGR image and its annotations (COCO xywh boxes)."""
    import cv2

    rng = np.random.default_rng(seed)
    w = int(rng.integers(192, 321))
    h = int(rng.integers(160, 289))
    img = _background(rng, h, w)
    anns: list[dict] = []
    owner = np.full((h, w), -1, np.int32)
    n_obj = int(rng.integers(1, 8))
    attempts = 0
    while len(anns) < n_obj and attempts < 40:
        attempts += 1
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        r = float(rng.uniform(6, min(h, w) * 0.28))
        cx = float(rng.uniform(r * 0.6, w - r * 0.6))
        cy = float(rng.uniform(r * 0.6, h - r * 0.6))
        mask = _shape_mask(rng, cls, h, w, cx, cy, r)
        ys, xs = np.nonzero(mask)
        if len(xs) < 30:
            continue
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        box = (float(x1), float(y1), float(x2 - x1), float(y2 - y1))
        if any(_iou(box, a["bbox"]) > 0.25 for a in anns):
            continue
        m = mask.astype(bool)
        # objects drawn later occlude earlier ones: keep every earlier object mostly visible
        if any(((owner == k) & ~m).sum() < 0.6 * a["area"] for k, a in enumerate(anns)):
            continue
        # colour far enough from the local background so every object is visible
        local = img[y1:y2, x1:x2].reshape(-1, 3).mean(0)
        for _ in range(20):
            colour = rng.integers(0, 256, size=3)
            if np.abs(colour - local).sum() > 150:
                break
        layer = np.zeros_like(img)
        layer[:] = colour
        # a little shading inside the shape
        shade = rng.uniform(0.75, 1.0)
        img[m] = (layer[m] * shade + rng.normal(0, 4, size=(int(m.sum()), 3))).clip(0, 255)
        owner[m] = len(anns)
        anns.append({"category_index": cls, "bbox": box, "area": float(m.sum())})
    if rng.random() < 0.3:
        k = int(rng.choice([3, 5]))
        img = cv2.GaussianBlur(img, (k, k), 0)
    return img, anns


def generate(root: str | os.PathLike[str], splits: tuple[SplitSpec, ...] = DEFAULT_SPLITS,
             progress: bool = True) -> Path:
    """Write the dataset under ``root`` and return it. Idempotent: a complete dataset is kept."""
    import cv2

    root = Path(root)
    stamp = root / "COMPLETE"
    meta = {"generator_version": GENERATOR_VERSION,
            "splits": [s.__dict__ for s in splits], "classes": list(CLASS_NAMES)}
    if stamp.exists() and json.loads(stamp.read_text()) == meta:
        return root
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)]
    for split in splits:
        img_dir = root / "images" / split.name
        lab_dir = root / "labels" / split.name
        img_dir.mkdir(parents=True, exist_ok=True)
        if split.labelled:
            lab_dir.mkdir(parents=True, exist_ok=True)
        images: list[dict] = []
        annotations: list[dict] = []
        iterator: Iterable[int] = range(split.num_images)
        if progress:
            from rich.progress import track

            iterator = track(iterator, description=f"synth {split.name}")
        for i in iterator:
            img, anns = render_image(split.seed * 100_000 + i)
            h, w = img.shape[:2]
            fname = f"{split.name}_{i:05d}.jpg"
            cv2.imwrite(str(img_dir / fname), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            image_id = i + 1
            images.append({"id": image_id, "file_name": fname, "width": w, "height": h})
            lines = []
            for a in anns:
                x, y, bw, bh = a["bbox"]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": a["category_index"] + 1, "bbox": [x, y, bw, bh],
                                    "area": a["area"], "iscrowd": 0})
                lines.append(f"{a['category_index']} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                             f"{bw / w:.6f} {bh / h:.6f}")
            if split.labelled:
                (lab_dir / f"{split.name}_{i:05d}.txt").write_text("\n".join(lines) + "\n")
        if split.labelled:
            ann_dir = root / "annotations"
            ann_dir.mkdir(exist_ok=True)
            coco = {"info": {"description": "yolo-mpq synthetic shapes", "version": GENERATOR_VERSION},
                    "images": images, "annotations": annotations, "categories": categories}
            (ann_dir / f"instances_{split.name}.json").write_text(json.dumps(coco))
        else:
            (root / f"{split.name}.txt").write_text(
                "".join(f"images/{split.name}/{im['file_name']}\n" for im in images))
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
    (root / "data.yaml").write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    stamp.write_text(json.dumps(meta))
    return root
