"""Per-image COCO records and the paired bootstrap (evaluators/bootstrap.py) on constructed data.

- the records reproduce pycocotools' mAP50-95 and mAP50 exactly, on the full set, on a
  subset of images, and on a resample (images repeated) built as a real dataset;
- the paired interval has zero width when the trial is the float model;
- on a constructed population whose mAP change is known, the 95 % intervals computed on
  samples of 100 images cover that change about 95 % of the time, and are narrower than
  unpaired intervals.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from evaluators.bootstrap import (
    BootstrapInterval,
    PairedBootstrap,
    PerImageEval,
    resample_weights,
    weighted_map,
    within_each_other,
)

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]


def _population(n_images: int, seed: int = 0):
    """Ground truth and two correlated models: ``float`` and a worse ``trial`` derived from it."""
    rng = np.random.default_rng(seed)
    images, anns, float_dets, trial_dets = [], [], [], []
    for i in range(n_images):
        img_id = 1000 + 3 * i  # ids not contiguous, sorted as created
        w, h = 640, 480
        images.append({"id": img_id, "width": w, "height": h, "file_name": f"{img_id}.jpg"})
        hard = rng.random() < 0.3  # the trial is much worse on "hard" images
        for _ in range(rng.integers(0, 6)):
            cat = int(rng.choice([1, 2, 5]))
            bw, bh = rng.uniform(15, 200), rng.uniform(15, 200)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            crowd = int(rng.random() < 0.03)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": crowd})
            if rng.random() < 0.9:  # the float model finds it, roughly
                jitter = rng.normal(0, 0.06, 4) * [bw, bh, bw, bh]
                box = [x + jitter[0], y + jitter[1], bw + jitter[2], bh + jitter[3]]
                score = float(np.clip(rng.normal(0.75, 0.15), 0.01, 1.0))
                float_dets.append({"image_id": img_id, "category_id": cat, "bbox": box, "score": score})
                if rng.random() < (0.85 if hard else 0.98):  # the trial keeps it, a bit worse
                    more = rng.normal(0, 0.006 if not hard else 0.02, 4) * [bw, bh, bw, bh]
                    tbox = [box[0] + more[0], box[1] + more[1], box[2] + more[2], box[3] + more[3]]
                    tscore = float(np.clip(score + rng.normal(0, 0.02), 0.01, 1.0))
                    trial_dets.append({"image_id": img_id, "category_id": cat, "bbox": tbox, "score": tscore})
        for _ in range(rng.integers(0, 4)):  # false positives, low scores, shared by both
            bw, bh = rng.uniform(15, 150), rng.uniform(15, 150)
            box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]
            det = {"image_id": img_id, "category_id": int(rng.choice([1, 2, 5])), "bbox": box,
                   "score": float(rng.uniform(0.01, 0.5))}
            float_dets.append(det)
            trial_dets.append({**det, "score": float(np.clip(det["score"] + rng.normal(0, 0.01), 0.01, 1.0))})
    for d in float_dets + trial_dets:
        d["bbox"] = [float(v) for v in d["bbox"][:2]] + [max(float(v), 1.0) for v in d["bbox"][2:]]
    gt = {"images": images, "annotations": anns, "categories": CATS}
    return gt, float_dets, trial_dets


def _coco(dataset):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def _cocoeval(gt, dets, img_ids=None):
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), iouType="bbox")
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope="module")
def small():
    gt_data, fdets, tdets = _population(60, seed=1)
    gt = _coco(gt_data)
    return gt_data, gt, fdets, tdets


def test_records_reproduce_pycocotools_on_the_full_set(small):
    _, gt, fdets, tdets = small
    for dets in (fdets, tdets):
        ev = _cocoeval(gt, dets)
        pe = PerImageEval.from_cocoeval(ev)
        m = pe.map()
        assert m["map50_95"] == pytest.approx(ev.stats[0], abs=1e-12)
        assert m["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
        assert pe.num_images == 60 and list(pe.cat_ids) == [1, 2, 5]


def test_a_subset_of_images_reproduces_pycocotools_on_that_subset(small):
    _, gt, fdets, _ = small
    pe = PerImageEval.from_cocoeval(_cocoeval(gt, fdets))
    pick = np.random.default_rng(3).choice(60, size=25, replace=False)
    sub = pe.select(pick)
    ev = _cocoeval(gt, fdets, img_ids=pe.image_ids[np.sort(pick)])
    assert sub.map()["map50_95"] == pytest.approx(ev.stats[0], abs=1e-12)
    assert sub.map()["map50"] == pytest.approx(ev.stats[1], abs=1e-12)
    # the same through weights: 0/1 multiplicities
    w = np.zeros(60, np.int64)
    w[pick] = 1
    assert pe.map(w)["map50_95"] == pytest.approx(ev.stats[0], abs=1e-12)


def test_a_resample_reproduces_pycocotools_on_the_repeated_images(small):
    """Images drawn several times are real copies (new ids) in the pycocotools dataset."""
    gt_data, gt, fdets, _ = small
    pe = PerImageEval.from_cocoeval(_cocoeval(gt, fdets))
    weights = resample_weights(60, 3, seed=7)
    ours = weighted_map(pe, weights)
    for b, w in enumerate(weights):
        images, anns, dets = [], [], []
        for i, img in enumerate(gt_data["images"]):
            for c in range(int(w[i])):
                new_id = img["id"] * 10 + c
                images.append({**img, "id": new_id})
                anns += [{**a, "id": len(anns) + j + 1, "image_id": new_id}
                         for j, a in enumerate(x for x in gt_data["annotations"] if x["image_id"] == img["id"])]
                dets += [{**d, "image_id": new_id} for d in fdets if d["image_id"] == img["id"]]
        rep = _coco({"images": images, "annotations": anns, "categories": CATS})
        ev = _cocoeval(rep, dets)
        assert ours["map50_95"][b] == pytest.approx(ev.stats[0], abs=1e-9), b
        assert ours["map50"][b] == pytest.approx(ev.stats[1], abs=1e-9), b


def test_records_survive_a_file_round_trip(small, tmp_path):
    _, gt, fdets, _ = small
    pe = PerImageEval.from_cocoeval(_cocoeval(gt, fdets))
    back = PerImageEval.load(pe.save(tmp_path / "r.npz"))
    assert back.same_images(pe) and back.map() == pe.map()
    assert np.array_equal(back.det_tp, pe.det_tp) and back.max_det == 100


def test_the_interval_is_paired_zero_width_when_the_trial_is_float(small):
    _, gt, fdets, tdets = small
    ref = PerImageEval.from_cocoeval(_cocoeval(gt, fdets))
    boot = PairedBootstrap(ref, n_boot=200, seed=0)
    same = boot.interval(PerImageEval.from_cocoeval(_cocoeval(gt, fdets)))
    assert same.delta == same.low == same.high == same.std == 0.0
    worse = boot.interval(PerImageEval.from_cocoeval(_cocoeval(gt, tdets)))
    assert worse.low <= worse.delta <= worse.high and worse.width > 0
    assert worse.delta < 0 and isinstance(worse, BootstrapInterval)
    assert within_each_other(worse, worse) and not within_each_other(same, worse)
    # the same seed gives the same interval; another seed a slightly different one
    assert PairedBootstrap(ref, n_boot=200, seed=0).interval(
        PerImageEval.from_cocoeval(_cocoeval(gt, tdets))) == worse


def test_a_different_image_set_is_refused(small):
    _, gt, fdets, _ = small
    pe = PerImageEval.from_cocoeval(_cocoeval(gt, fdets))
    with pytest.raises(ValueError, match="same images"):
        PairedBootstrap(pe, n_boot=10).interval(pe.select(range(30)))


def test_intervals_cover_the_known_change_of_a_population():
    """Population of 1000 images with a known mAP change; 25 samples of 100 images each."""
    gt_data, fdets, tdets = _population(1000, seed=11)
    gt = _coco(gt_data)
    ev_f, ev_t = _cocoeval(gt, fdets), _cocoeval(gt, tdets)
    true_delta = ev_t.stats[0] - ev_f.stats[0]
    pop_f, pop_t = PerImageEval.from_cocoeval(ev_f), PerImageEval.from_cocoeval(ev_t)
    assert pop_t.map()["map50_95"] - pop_f.map()["map50_95"] == pytest.approx(true_delta, abs=1e-12)
    rng = np.random.default_rng(5)
    covered, widths, unpaired = 0, [], []
    n_samples = 25
    for s in range(n_samples):
        pick = rng.choice(1000, size=100, replace=False)
        f, t = pop_f.select(pick), pop_t.select(pick)
        iv = PairedBootstrap(f, n_boot=200, seed=s).interval(t)
        covered += iv.contains(true_delta)
        widths.append(iv.width)
        # unpaired: independent resamples for the two models
        wf, wt = resample_weights(100, 200, seed=1000 + s), resample_weights(100, 200, seed=2000 + s)
        d = weighted_map(t, wt)["map50_95"] - weighted_map(f, wf)["map50_95"]
        lo, hi = np.quantile(d, [0.025, 0.975])
        unpaired.append(hi - lo)
    print(f"\ntrue change {true_delta:+.4f}; covered {covered}/{n_samples}; median width paired "
          f"{np.median(widths):.4f}, unpaired {np.median(unpaired):.4f}")
    assert true_delta < -0.005  # the constructed trial is clearly worse
    assert covered >= 0.8 * n_samples  # nominal 95 %; a 100-image percentile bootstrap covers a bit less
    assert np.median(widths) < 0.5 * np.median(unpaired)  # pairing cancels the shared image variation
