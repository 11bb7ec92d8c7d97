"""Provider resolution, I/O checks, ONNX graph helpers and TensorRT availability (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest

from evaluators.errors import EvaluatorUnavailable, ModelFormatError, ProviderError
from evaluators.session import (
    CPU,
    CUDA,
    TENSORRT,
    ModelIO,
    anchors_for,
    check_image_input,
    detect_layout,
    open_session,
    resolve_providers,
)


def test_gpu_providers_fall_back_to_cpu_and_say_so():
    chosen, notes = resolve_providers([TENSORRT, CUDA, CPU], available=[CPU])
    assert chosen == [CPU]
    assert any(TENSORRT in n for n in notes) and any(CUDA in n for n in notes)
    chosen, notes = resolve_providers([CUDA], available=[CPU])
    assert chosen == [CPU] and "falling back" in notes[-1]
    assert resolve_providers([CUDA, CPU], available=[CUDA, CPU])[0] == [CUDA, CPU]


def test_disable_cpu_fallback_without_gpu_is_a_clear_error():
    with pytest.raises(ProviderError, match=r"disable_cpu_fallback.*(GPU|onnxruntime-gpu)"):
        resolve_providers([TENSORRT, CUDA, CPU], disable_cpu_fallback=True, available=[CPU])
    assert resolve_providers([CUDA, CPU], disable_cpu_fallback=True, available=[CUDA, CPU])[0] == [CUDA]


def test_unknown_provider_suggests_the_nearest():
    with pytest.raises(ProviderError, match="did you mean 'CUDAExecutionProvider'"):
        resolve_providers(["CUDAExecutionProvidr"])


def test_layouts_and_wrong_outputs():
    assert anchors_for(640) == 8400 and anchors_for(192) == 756
    assert detect_layout((1, 300, 6), num_classes=80, imgsz=640, source="m") == "end2end"
    assert detect_layout(("batch", 84, 8400), num_classes=80, imgsz=640, source="m") == "raw"
    assert detect_layout((2, 6, 756), num_classes=2, imgsz=192, source="m") == "raw"
    with pytest.raises(ModelFormatError, match=r"m\.onnx: output has shape \[1, 84, 756\].*4 \+ 6 = 10"):
        detect_layout((1, 84, 756), num_classes=6, imgsz=192, source="m.onnx")
    with pytest.raises(ModelFormatError, match="expected YOLOv10 end-to-end"):
        detect_layout((1, 1000), num_classes=6, imgsz=192, source="m.onnx")


def test_input_checks_name_the_expected_shape():
    io = ModelIO("images", ("batch", 3, 640, 640), "tensor(float)", ("output0",), ((1, 300, 6),))
    with pytest.raises(ModelFormatError, match=r"height 640 \(expected 192\).*\(N, 3, 192, 192\)"):
        check_image_input(io, 192, "m.onnx")
    assert check_image_input(io, 640, "m.onnx") is None
    fixed = ModelIO("images", (4, 3, 192, 192), "tensor(float)", ("output0",), ((4, 300, 6),))
    assert check_image_input(fixed, 192, "m.onnx") == 4
    ints = ModelIO("images", (1, 3, 192, 192), "tensor(uint8)", ("output0",), ((1, 300, 6),))
    with pytest.raises(ModelFormatError, match="tensor\\(uint8\\)"):
        check_image_input(ints, 192, "m.onnx")


def _tiny_head_graph(path, nc: int = 2, anchors: int = 12):
    """input (N,3,8,8) -> ... -> Concat (N, 4+nc, anchors) -> Transpose -> output (N, anchors, 4+nc)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)
    shape_b = helper.make_tensor("shape_b", TensorProto.INT64, [3], [-1, 4, anchors])
    shape_s = helper.make_tensor("shape_s", TensorProto.INT64, [3], [-1, nc, anchors])
    nodes = [
        helper.make_node("Flatten", ["images"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "s0", "e0", "a1"], ["fb"]),
        helper.make_node("Reshape", ["fb", "shape_b"], ["boxes"]),
        helper.make_node("Slice", ["flat", "e0", "e1", "a1"], ["fs"]),
        helper.make_node("Reshape", ["fs", "shape_s"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["head_raw"], axis=1),
        helper.make_node("Transpose", ["head_raw"], ["output0"], perm=[0, 2, 1]),
    ]
    inits = [shape_b, shape_s, helper.make_tensor("s0", TensorProto.INT64, [1], [0]),
             helper.make_tensor("e0", TensorProto.INT64, [1], [4 * anchors]),
             helper.make_tensor("e1", TensorProto.INT64, [1], [(4 + nc) * anchors]),
             helper.make_tensor("a1", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_raw_head_tensor_is_found_and_exposed(tmp_path):
    from evaluators.onnx_graph import find_raw_head_tensor, load
    from mpq.onnx_nodes import with_outputs

    path = _tiny_head_graph(tmp_path / "tiny.onnx")
    model = load(path)
    assert find_raw_head_tensor(model, 2) == "head_raw"
    assert find_raw_head_tensor(model, None) == "head_raw"
    assert find_raw_head_tensor(model, 5) is None  # 4 + 5 channels: not this graph
    sess, report, io = open_session(with_outputs(model, ["head_raw"]).SerializeToString(), source=str(path))
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    out, raw = sess.run(["output0", "head_raw"], {"images": x})
    assert raw.shape == (2, 6, 12) and np.array_equal(out, raw.transpose(0, 2, 1))
    assert report.provider == CPU and report.device.startswith("cpu") and io.fixed_batch is None


def test_metadata_round_trip(tmp_path):
    from evaluators.onnx_graph import names_from_metadata, read_metadata, ultralytics_metadata, write_metadata

    path = _tiny_head_graph(tmp_path / "tiny.onnx")
    meta = ultralytics_metadata(names={0: "a", 1: "b"}, imgsz=8, end2end=False, dynamic_batch=True)
    out = write_metadata(path, meta, tmp_path / "meta.onnx")
    read = read_metadata(out)
    assert read["imgsz"] == "[8, 8]" and read["end2end"] == "False"
    assert names_from_metadata(read) == {0: "a", 1: "b"}
    assert read_metadata(path) == {}  # the source is untouched


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ModelFormatError, match=r"bad\.onnx: not a loadable ONNX model.*re-export"):
        open_session(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        open_session(empty)
    with pytest.raises(ModelFormatError, match="not found"):
        open_session(tmp_path / "missing.onnx")


def test_tensorrt_absent_is_reported_with_a_reason(tmp_path):
    from evaluators.tensorrt import (
        TensorRTLatencyEvaluator,
        tensorrt_available,
        tensorrt_unavailable_reason,
    )

    reason = tensorrt_unavailable_reason()
    assert tensorrt_available() == (reason is None)
    if reason is None:
        pytest.skip("TensorRT is usable here; the absent path is not testable")
    assert "TensorRT" in reason or "CUDA" in reason
    ev = TensorRTLatencyEvaluator(cache_dir=tmp_path, imgsz=192)
    with pytest.raises(EvaluatorUnavailable, match="TensorRT latency cannot be measured here") as info:
        ev.evaluate(tmp_path / "x.onnx")
    assert info.value.reason


def test_engine_cache_name_depends_on_everything():
    from evaluators.tensorrt import engine_cache_name

    base = {"batch": 1, "imgsz": 640, "fp16": True, "int8": True, "trt_version": "10.13.0", "gpu": "NVIDIA H100 80GB"}
    name = engine_cache_name("abc", **base)
    assert name == "abc-b1-s640-fp16int8-trt10.13.0-nvidia-h100-80gb.engine"
    for key, value in (("batch", 8), ("imgsz", 320), ("fp16", False), ("int8", False), ("trt_version", "10.3"),
                       ("gpu", "RTX 5090")):
        assert engine_cache_name("abc", **{**base, key: value}) != name


def test_make_latency_evaluator_dispatch(demo_spec, tmp_path):
    from evaluators import make_latency_evaluator
    from evaluators.latency import OrtLatencyEvaluator
    from evaluators.tensorrt import TensorRTLatencyEvaluator

    ev = make_latency_evaluator(demo_spec.latency, imgsz=demo_spec.imgsz, evaluation=demo_spec.evaluation,
                                cache_dir=tmp_path)
    assert isinstance(ev, OrtLatencyEvaluator)
    assert ev.imgsz == demo_spec.imgsz and ev.runs == demo_spec.latency.runs
    assert list(ev.providers) == demo_spec.latency_providers
    trt = demo_spec.latency.model_copy(update={"engine": "tensorrt"})
    assert isinstance(make_latency_evaluator(trt, imgsz=demo_spec.imgsz, cache_dir=tmp_path), TensorRTLatencyEvaluator)
    alone = make_latency_evaluator(demo_spec.latency, imgsz=64)
    assert list(alone.providers) == ["CPUExecutionProvider"] and alone.imgsz == 64
