"""One contract suite per evaluator kind, on the demo model's real ONNX exports.

- accuracy: :class:`CocoEvaluator` over model variants (end-to-end with dynamic batch, a
  fixed-batch export, the raw one-to-many head decoded with NMS);
- fidelity: :class:`FidelityEvaluator` over candidate kinds (ONNX, torch module, wrapped
  torch module, plain callable) and its ranking of deliberately damaged models;
- latency: every latency engine (ONNX Runtime; TensorRT where a GPU and TensorRT exist);
- cost: :func:`analytic_cost` on the demo layer table.
Bad inputs (corrupt file, wrong input size, wrong output layout, missing providers) must
fail with an error that says what was expected.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from evaluator_helpers import cached, export, workdir

from evaluators.base import CostResult, FidelityResult
from evaluators.errors import ModelFormatError, ProviderError
from evaluators.session import CPU, CUDA, TENSORRT
from evaluators.testing import check_accuracy_result, check_latency_result, check_result, strict_json, tiny_onnx


@pytest.fixture(scope="module")
def coco(demo_spec, demo_model, demo_subset):
    from evaluators.coco import CocoEvaluator

    return CocoEvaluator(subset=demo_subset, names=demo_model.names, imgsz=demo_spec.imgsz,
                         settings=demo_spec.evaluation, cache_dir=workdir() / "cache", progress=False)


def _small(coco, demo_subset, **settings):
    from evaluators.coco import CocoEvaluator

    return CocoEvaluator(subset=demo_subset.head(8), names=coco.names, imgsz=coco.imgsz,
                         settings=coco.settings.model_copy(update=settings), cache_dir=workdir() / "cache-small",
                         progress=False)


# --------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------
def _variant(name: str, demo_spec, demo_model, demo_model_one2one):
    e2e = demo_model_one2one
    if name == "end2end":
        return export(e2e.module, "float-one2one", e2e.imgsz), "end2end", demo_spec.evaluation.batch_size
    if name == "fixed-batch-3":  # 100 images = 33 full batches + 1 padded
        return export(e2e.module, "float-one2one-b3", e2e.imgsz, batch=3), "end2end", 3
    assert demo_model.layout == "raw"  # the demo study's head: one-to-many, decoded with NMS
    return export(demo_model.module, "float", demo_model.imgsz), "raw", demo_spec.evaluation.batch_size


@pytest.fixture(scope="module")
def coco32(coco, demo_subset):
    from evaluators.coco import CocoEvaluator

    return CocoEvaluator(subset=demo_subset.head(32), names=coco.names, imgsz=coco.imgsz, settings=coco.settings,
                         cache_dir=workdir() / "cache-32", progress=False)


@pytest.fixture(scope="module")
def accuracy_results(coco, coco32, demo_spec, demo_model, demo_model_one2one):
    """The float model on the whole subset; each variant (and the float model again) on 32 images."""
    out = {}
    for name in ("end2end", "fixed-batch-3", "raw"):
        path, layout, batch = _variant(name, demo_spec, demo_model, demo_model_one2one)
        out[name] = (coco32.evaluate(path), layout, batch)
    out["full"] = (coco.evaluate(_variant("raw", demo_spec, demo_model, demo_model_one2one)[0]), "raw",
                   demo_spec.evaluation.batch_size)
    return out


@pytest.mark.parametrize("variant", ["full", "end2end", "fixed-batch-3", "raw"])
def test_accuracy_contract(accuracy_results, demo_model, demo_subset, variant):
    r, layout, batch = accuracy_results[variant]
    check_accuracy_result(r, names=demo_model.names.values(),
                          num_images=len(demo_subset) if variant == "full" else 32)
    assert r.provider == CPU and r.batch_size == batch
    assert r.extra["layout"] == layout and r.extra["session"]["used"][0] == CPU
    assert r.extra["postprocess"]["kind"] == ("topk" if layout == "end2end" else "nms")
    assert set(r.extra["timings"]) >= {"session_s", "inference_s", "decode_s", "cocoeval_s", "trial_s"}
    assert strict_json(r.to_dict())["map50_95"] == r.map50_95


def test_fixed_batch_padding_gives_the_same_result(accuracy_results):
    dyn, fixed = accuracy_results["end2end"][0], accuracy_results["fixed-batch-3"][0]
    assert fixed.map50_95 == pytest.approx(dyn.map50_95, abs=1e-4)
    assert abs(fixed.num_detections - dyn.num_detections) <= 5  # float-order ties at conf 0.001 only


def test_raw_head_with_nms_is_a_working_detector(accuracy_results):
    raw, e2e = accuracy_results["raw"][0], accuracy_results["end2end"][0]
    # the one-to-many head (trained jointly) decoded with NMS scores in the same range
    assert raw.map50_95 > 0.5 * e2e.map50_95


@pytest.mark.parametrize("variant", ["full", "end2end", "raw"])
def test_per_image_records_reproduce_the_map(accuracy_results, coco, coco32, variant):
    """What COCOeval decided per image is kept, keyed by the file's digest, and gives back
    pycocotools' mAP exactly: the bootstrap needs no second inference."""
    from evaluators.bootstrap import PerImageEval

    r = accuracy_results[variant][0]
    ev = coco if variant == "full" else coco32
    path = ev.per_image_file(r.extra["onnx_sha256"])
    assert r.extra["per_image"] == str(path) and path.is_file()
    pe = PerImageEval.load(path)
    assert pe.num_images == r.num_images and pe.num_detections <= r.num_detections
    assert pe.map()["map50_95"] == pytest.approx(r.map50_95, abs=1e-9)
    assert pe.map()["map50"] == pytest.approx(r.map50, abs=1e-9)
    assert ev.per_image(r.extra["onnx"]).same_images(pe)


def test_preprocessing_is_cached_once_per_run_dir(coco, demo_subset):
    from evaluators.coco import CocoEvaluator

    coco.images()
    assert coco.cache_file is not None and coco.cache_file.is_file()
    again = CocoEvaluator(subset=demo_subset, names=coco.names, imgsz=coco.imgsz, settings=coco.settings,
                          cache_dir=coco.cache_dir, progress=False)
    images, metas = again.images()
    assert np.array_equal(images, coco.images()[0]) and metas == coco.images()[1]
    assert again.preprocess_seconds < 2.0  # read from the .npz, not decoded again


def test_gpu_providers_fall_back_to_cpu_and_it_is_recorded(coco, demo_subset, float_onnx):
    ev = _small(coco, demo_subset, providers=[TENSORRT, CUDA, CPU])
    r = ev.evaluate(float_onnx)
    assert r.provider == CPU
    session = r.extra["session"]
    assert session["requested"] == [TENSORRT, CUDA, CPU] and session["fallback"] is True
    assert any("not available" in n for n in session["notes"])


def test_gpu_only_run_without_gpu_fails_clearly(coco, demo_subset, float_onnx):
    ev = _small(coco, demo_subset, providers=[CUDA, CPU], disable_cpu_fallback=True)
    with pytest.raises(ProviderError, match="disable_cpu_fallback"):
        ev.evaluate(float_onnx)


@pytest.mark.gpu
def test_accuracy_on_a_gpu_provider_matches_cpu(coco, demo_subset, float_onnx):
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} here has no {CUDA} (needs onnxruntime-gpu and a CUDA GPU)")
    gpu = _small(coco, demo_subset, providers=[CUDA], disable_cpu_fallback=True).evaluate(float_onnx)
    cpu = _small(coco, demo_subset).evaluate(float_onnx)
    assert gpu.provider == CUDA and gpu.extra["session"]["device"].startswith("cuda")
    assert gpu.map50_95 == pytest.approx(cpu.map50_95, abs=0.01)


def test_corrupt_onnx_is_named(coco, demo_subset, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelFormatError, match=r"broken\.onnx: not a loadable ONNX model.*expected an ONNX"):
        _small(coco, demo_subset).evaluate(bad)


def test_input_size_mismatch_says_what_was_expected(coco, demo_subset, demo_model):
    path = export(demo_model.module, "float-224", 224)
    with pytest.raises(ModelFormatError, match=r"height 224 \(expected 192\).*\(N, 3, 192, 192\)"):
        _small(coco, demo_subset).evaluate(path)


def test_wrong_output_layout_says_what_was_expected(coco, demo_subset):
    from mpq.model import load_model

    coco80 = cached("model:yolov8n", lambda: load_model("yolov8n.yaml", 192))  # 80 classes: (N, 84, 756)
    path = export(coco80.module, "yolov8n-80cls", 192)
    with pytest.raises(ModelFormatError, match=r"\[\d+, 84, 756\].*4 \+ 6 = 10, 756 anchors"):
        _small(coco, demo_subset).evaluate(path)


# --------------------------------------------------------------------------------------
# fidelity
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fidelity(demo_model, demo_calib, float_onnx):
    from evaluators.fidelity import FidelityEvaluator
    from mpq.data import preprocess_many

    images, _ = preprocess_many(demo_calib[:32], demo_model.imgsz, cache=workdir() / "calib32.npz", progress=False)
    return FidelityEvaluator(reference=float_onnx, images=images, names=demo_model.names)


def _candidate(kind: str, demo_model, float_onnx):
    from evaluators.fidelity import torch_callable

    if kind == "onnx":
        return float_onnx
    if kind == "torch-module":
        return demo_model.module
    if kind == "torch-callable":
        return torch_callable(demo_model.module, batch_size=16)
    run = torch_callable(demo_model.module)
    return lambda images: run(images)[0]  # only the final output


@pytest.mark.parametrize("kind", ["onnx", "torch-module", "torch-callable", "plain-callable"])
def test_fidelity_contract(fidelity, demo_model, float_onnx, kind):
    r = fidelity.evaluate(_candidate(kind, demo_model, float_onnx))
    assert isinstance(r, FidelityResult)
    no_sqnr = kind == "plain-callable" and demo_model.layout == "end2end"  # only the (N, 300, 6) rows
    check_result(r, strict=not no_sqnr)  # no raw output: no SQNR (NaN)
    assert r.det_map == pytest.approx(1.0, abs=1e-3) and r.det_map50 == pytest.approx(1.0, abs=1e-3)
    assert r.num_images == 32 and r.seconds > 0 and r.extra["num_pseudo_labels"] > 0
    if no_sqnr:
        assert math.isnan(r.sqnr_db) and "raw" in r.extra["sqnr_unavailable"]
    elif kind == "plain-callable":  # the raw head output is the final output: SQNR measurable
        assert math.isfinite(r.sqnr_db) and r.sqnr_db > 60
    else:
        # identical graph: capped; torch vs ONNX Runtime: float rounding only
        assert r.sqnr_db == (200.0 if kind == "onnx" else pytest.approx(r.sqnr_db)) and r.sqnr_db > 60


@pytest.fixture(scope="module")
def damage_ladder(coco32, fidelity, demo_model):
    from evaluators.testing import degrade

    rows = []
    for strength in (0.0, 0.15, 0.4):
        module = degrade(demo_model.module, "noise", strength) if strength else demo_model.module
        path = export(module, f"noise-{strength}", demo_model.imgsz)
        rows.append((strength, coco32.evaluate(path).map50_95, fidelity.evaluate(path),
                     fidelity.evaluate(module) if strength else None))
    return rows


def test_fidelity_ranks_damaged_models_like_coco_map(damage_ladder):
    maps = [m for _, m, _, _ in damage_ladder]
    det = [f.det_map for _, _, f, _ in damage_ladder]
    sqnr = [f.sqnr_db for _, _, f, _ in damage_ladder]
    assert maps == sorted(maps, reverse=True) and maps[0] - maps[-1] > 0.05, maps
    assert det == sorted(det, reverse=True) and det[0] - det[-1] > 0.3, det
    assert all(math.isfinite(x) for x in sqnr) and sqnr == sorted(sqnr, reverse=True), sqnr


def test_fidelity_of_a_torch_module_agrees_with_its_onnx_export(damage_ladder):
    for _, _, via_onnx, via_torch in damage_ladder[1:]:
        assert via_torch.det_map == pytest.approx(via_onnx.det_map, abs=0.03)
        assert math.isfinite(via_onnx.sqnr_db)
        assert via_torch.sqnr_db == pytest.approx(via_onnx.sqnr_db, abs=0.5)


def test_fidelity_rejects_bad_inputs(fidelity, demo_model, float_onnx):
    from evaluators.errors import EvaluatorError
    from evaluators.fidelity import FidelityEvaluator

    with pytest.raises(EvaluatorError, match=r"expected \(N, 3, S, S\)"):
        FidelityEvaluator(reference=float_onnx, images=np.zeros((4, 192, 192, 3), np.float32), names=demo_model.names)
    with pytest.raises(EvaluatorError, match="no detection"):
        FidelityEvaluator(reference=float_onnx, images=np.zeros((2, 3, 192, 192), np.float32), names=demo_model.names)
    with pytest.raises(ModelFormatError, match="returned 1 outputs for 32 images"):
        fidelity.evaluate(lambda images: np.zeros((1, 300, 6), np.float32))


# --------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------
def _latency_evaluator(engine: str, imgsz: int):
    if engine == "ort":
        from evaluators.latency import OrtLatencyEvaluator

        return OrtLatencyEvaluator(imgsz=imgsz, warmup=2, runs=6, batch_size=2, threads=1)
    from evaluators.tensorrt import TensorRTLatencyEvaluator, tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        pytest.skip(reason)
    return TensorRTLatencyEvaluator(cache_dir=workdir(), imgsz=imgsz, warmup=2, runs=6, batch_size=2)


@pytest.mark.parametrize("engine", ["ort", pytest.param("tensorrt", marks=pytest.mark.gpu)])
def test_latency_contract(engine, float_onnx, demo_model):
    r = _latency_evaluator(engine, demo_model.imgsz).evaluate(float_onnx)
    check_latency_result(r, engine=engine, batch_size=2, runs=6, warmup=2)
    if engine == "ort":
        assert r.provider == CPU and r.device.startswith("cpu") and r.threads == 1


def test_latency_interleaved_with_a_reference_gives_the_ratio(float_onnx, demo_model, tmp_path):
    """Blocks of runs alternate candidate / reference; the ratio is the median over blocks of
    the ratio of block medians, and every block times ``block - 1`` runs."""
    ev = _latency_evaluator("ort", demo_model.imgsz)
    same = ev.evaluate(float_onnx, reference=float_onnx)
    assert same.extra["reference"] == str(float_onnx) and same.extra["reference_median_ms"] > 0
    assert 0.6 < same.extra["ratio"] < 1.6  # the same model in the same window
    assert same.extra["blocks"] == -(-ev.runs // (ev.block - 1)) and "blocks of" in same.extra["interleaved"]
    tiny = tiny_onnx(tmp_path / "tiny.onnx", demo_model.imgsz)
    r = ev.evaluate(float_onnx, reference=tiny)
    assert r.extra["ratio"] > 3.0 and r.extra["reference_median_ms"] < r.median_ms
    assert "ratio" not in ev.evaluate(float_onnx).extra
    strict_json(r.to_dict())


@pytest.mark.parametrize("engine", ["ort", pytest.param("tensorrt", marks=pytest.mark.gpu)])
def test_latency_wrong_input_size_is_named(engine, float_onnx):
    with pytest.raises(ModelFormatError, match="expected"):
        _latency_evaluator(engine, 256).evaluate(float_onnx)


# --------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------
def test_cost_contract(demo_model):
    from evaluators.cost import analytic_cost
    from mpq.assignment import Assignment

    layers = demo_model.layers
    quant = demo_model.quantizable_layers
    base = analytic_cost(layers, Assignment())
    assert isinstance(base, CostResult) and base.size_ratio == 1.0 and base.bops == base.float_bops
    w8a8 = analytic_cost(layers, Assignment.uniform(quant, "W8A8"))
    w4a8 = analytic_cost(layers, Assignment.uniform(quant, "W4A8"))
    w4a16 = analytic_cost(layers, Assignment.uniform(quant, "W4A16"))
    assert base.weight_bytes > w8a8.weight_bytes > w4a8.weight_bytes == w4a16.weight_bytes
    assert 0.2 < w8a8.size_ratio < 0.3 and 0.1 < w4a8.size_ratio < 0.2  # biases and scales stay float32
    assert base.bops > w4a16.bops > w8a8.bops > w4a8.bops
    assert w4a8.w4_weight_share == 1.0 and w4a8.a8_layer_share == 1.0 and w4a16.a8_layer_share == 0.0
    check_result(w4a8)
