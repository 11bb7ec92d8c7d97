from __future__ import annotations

import json

import numpy as np

from search.demo.synth import CLASS_NAMES, SplitSpec, generate, render_image


def test_render_is_deterministic():
    a_img, a_ann = render_image(12345)
    b_img, b_ann = render_image(12345)
    assert a_ann == b_ann and np.array_equal(a_img, b_img)
    assert render_image(12346)[1] != a_ann


def test_generated_dataset_is_coco_and_varied(tmp_path):
    root = generate(tmp_path / "d", splits=(SplitSpec("val", 40, 7), SplitSpec("calib", 4, 8, labelled=False)),
                    progress=False)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert len(coco["images"]) == 40
    assert [c["name"] for c in coco["categories"]] == list(CLASS_NAMES)
    cats = {a["category_id"] for a in coco["annotations"]}
    assert len(cats) == len(CLASS_NAMES)
    areas = [a["area"] for a in coco["annotations"]]
    assert min(areas) < 32 * 32 < max(areas)  # small and large objects
    sizes = {(im["width"], im["height"]) for im in coco["images"]}
    assert len(sizes) > 20  # varied aspect ratios
    for a in coco["annotations"]:
        im = coco["images"][a["image_id"] - 1]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
    assert (root / "calib.txt").read_text().count("\n") == 4
    assert (root / "labels" / "val" / "val_00000.txt").exists()
    # idempotent: a complete dataset is kept
    stamp = (root / "COMPLETE").stat().st_mtime
    generate(root, splits=(SplitSpec("val", 40, 7), SplitSpec("calib", 4, 8, labelled=False)), progress=False)
    assert (root / "COMPLETE").stat().st_mtime == stamp
