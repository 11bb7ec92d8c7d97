from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpq.data import (
    COCO80_TO_91,
    DataError,
    class_to_category,
    letterbox,
    load_coco_subset,
    load_image,
    preprocess_many,
    read_calibration_list,
    read_image_ids,
    unletterbox_boxes,
)


def _images(ultralytics_assets: Path) -> list[Path]:
    from search.demo import demo_dataset

    val = sorted((demo_dataset() / "images" / "val").glob("*.jpg"))[:6]
    return [ultralytics_assets / "bus.jpg", ultralytics_assets / "zidane.jpg", *val]


@pytest.mark.parametrize("imgsz", [192, 320, 640])
def test_letterbox_matches_ultralytics(ultralytics_assets: Path, imgsz: int):
    from ultralytics.data.augment import LetterBox

    ref = LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True, center=True)
    for path in _images(ultralytics_assets):
        img = load_image(path)
        ours, meta = letterbox(img, imgsz)
        theirs = ref(image=img)
        assert ours.shape == theirs.shape == (imgsz, imgsz, 3)
        assert np.array_equal(ours, theirs), path


def test_unletterbox_inverts_the_mapping(ultralytics_assets: Path):
    from ultralytics.utils.ops import scale_boxes

    img = load_image(ultralytics_assets / "zidane.jpg")  # 720x1280: padded top and bottom
    _, meta = letterbox(img, 640)
    boxes = np.array([[10.0, 150.0, 300.0, 400.0], [600.0, 200.0, 639.0, 480.0]], np.float32)
    ours = unletterbox_boxes(boxes, meta)
    import torch

    theirs = scale_boxes((640, 640), torch.tensor(boxes), img.shape[:2]).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    # odd sizes: each side is rounded by the letterbox, so each axis has its own gain
    for shape in ((179, 256), (266, 230), (164, 313)):
        _, meta = letterbox(np.zeros((*shape, 3), np.uint8), 192)
        boxes = np.array([[20.0, 30.0, 150.0, 160.0], [0.0, 40.0, 191.0, 150.0]], np.float32)
        theirs = scale_boxes((192, 192), torch.tensor(boxes), shape).numpy()
        np.testing.assert_allclose(unletterbox_boxes(boxes, meta), theirs, atol=1e-3)


def _coco(tmp_path: Path, n: int = 5) -> tuple[Path, Path]:
    import cv2

    imgs = tmp_path / "images"
    imgs.mkdir()
    images = []
    for i in range(n):
        cv2.imwrite(str(imgs / f"{i:03d}.jpg"), np.full((40 + i, 60, 3), 30 * i, np.uint8))
        images.append({"id": 100 - i * 10, "file_name": f"{i:03d}.jpg", "width": 60, "height": 40 + i})
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "a"}],
                               "annotations": [{"id": 1, "image_id": 100, "category_id": 1,
                                                "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}]}))
    return imgs, ann


def test_coco_subset_is_sorted_and_limited(tmp_path: Path):
    imgs, ann = _coco(tmp_path)
    sub = load_coco_subset(imgs, ann, max_images=3)
    assert sub.image_ids == [60, 70, 80]
    assert sub.paths[0].name == "004.jpg"
    ids = tmp_path / "ids.txt"
    ids.write_text("# chosen\n90\n\n70  # comment\n")
    assert read_image_ids(ids) == [90, 70]
    assert load_coco_subset(imgs, ann, image_ids=ids, max_images=1).image_ids == [90, 70]


def test_coco_subset_errors_name_the_file(tmp_path: Path):
    imgs, ann = _coco(tmp_path)
    (imgs / "002.jpg").unlink()
    with pytest.raises(DataError, match=r"image 80 points at a missing file: .*002\.jpg"):
        load_coco_subset(imgs, ann)
    ids = tmp_path / "ids.txt"
    ids.write_text("100\n12345\n")
    with pytest.raises(DataError, match=r"ids.txt: image ids not in instances.json: \[12345\]"):
        load_coco_subset(imgs, ann, image_ids=ids)
    ids.write_text("abc\n")
    with pytest.raises(DataError, match=r"ids.txt:1: 'abc' is not an integer"):
        read_image_ids(ids)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(DataError, match="missing the 'annotations' list"):
        load_coco_subset(imgs, bad)
    with pytest.raises(DataError, match="annotations file not found"):
        load_coco_subset(imgs, tmp_path / "nope.json")


def test_corrupt_and_missing_images(tmp_path: Path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="cannot be decoded.*corrupt.jpg"):
        load_image(bad)
    with pytest.raises(DataError, match="image not found"):
        load_image(tmp_path / "missing.jpg")


def test_calibration_list_relative_paths_folder_and_errors(tmp_path: Path):
    imgs, _ = _coco(tmp_path)
    lst = tmp_path / "lists" / "quant.txt"
    lst.parent.mkdir()
    lst.write_text("# calibration\n../images/001.jpg\n\n../images/000.jpg\n")
    assert [p.name for p in read_calibration_list(lst)] == ["001.jpg", "000.jpg"]
    assert len(read_calibration_list(imgs, max_images=2)) == 2
    lst.write_text("../images/001.jpg\n../images/nope.jpg\n")
    with pytest.raises(DataError, match=r"quant.txt:2: calibration image not found"):
        read_calibration_list(lst)
    lst.write_text("\n# nothing\n")
    with pytest.raises(DataError, match="calibration list is empty"):
        read_calibration_list(lst)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no images"):
        read_calibration_list(empty)


def test_preprocess_cache_round_trip(tmp_path: Path):
    imgs, _ = _coco(tmp_path)
    paths = sorted(imgs.glob("*.jpg"))
    cache = tmp_path / "cache.npz"
    a, metas = preprocess_many(paths, 64, cache=cache, progress=False)
    assert a.shape == (5, 3, 64, 64) and a.dtype == np.float32 and cache.exists()
    b, metas2 = preprocess_many(paths, 64, cache=cache, progress=False)
    assert np.array_equal(a, b) and metas == metas2


def test_class_to_category_mappings():
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["circle", "square"])]
    assert class_to_category({0: "square", 1: "circle"}, cats) == [2, 1]
    assert class_to_category({0: "0", 1: "1"}, cats) == [1, 2]
    coco = [{"id": i, "name": f"c{i}"} for i in COCO80_TO_91]
    assert class_to_category({i: str(i) for i in range(80)}, coco) == list(COCO80_TO_91)
    with pytest.raises(DataError, match="cannot map"):
        class_to_category({0: "x", 1: "y", 2: "z"}, cats)
