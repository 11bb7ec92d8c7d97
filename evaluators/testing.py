"""Testing helpers for evaluators: the checks every evaluator's result must pass, and damaged models.

The contract of every evaluator result (:func:`check_result`): a frozen dataclass whose
``to_dict()`` is strict JSON (no NaN or infinity where a number is expected).
:func:`check_latency_result` and :func:`check_accuracy_result` add what a latency engine and
a COCO evaluator must report; a new engine's tests call them on its results.

:func:`degrade` makes deliberately degraded copies of a detector, to check that evaluators
rank damage correctly (a fidelity proxy is only useful if it orders damaged models the way
COCO mAP does); used by the contract tests and ``benchmarks/bench_evaluators.py``:

- ``noise``: each quantizable Conv2d weight gets Gaussian noise of ``strength`` times the
  tensor's standard deviation (fixed seed).
- ``pertensor``: naive symmetric per-tensor rounding to ``strength`` bits (one scale per
  layer from its max |w|), the scheme that made the seeds' W4 PTQ collapse.

The DFL conv (fixed arange weights) is never touched, as in every backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEGRADATIONS = ("noise", "pertensor")


def degrade(module: Any, kind: str, strength: float, *, seed: int = 0) -> Any:
    """A degraded deep copy of ``module`` (a float ``YoloDetector``); ``module`` is not modified."""
    import copy

    import torch
    from torch import nn

    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")
    out = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in out.named_modules():
            if not isinstance(m, nn.Conv2d) or ".dfl." in f".{name}.":
                continue
            w = m.weight
            if kind == "noise":
                w.add_(torch.randn(w.shape, generator=gen) * w.std() * float(strength))
            else:
                bits = int(strength)
                qmax = 2 ** (bits - 1) - 1
                scale = w.abs().max().clamp_min(1e-12) / qmax
                w.copy_(torch.clamp(torch.round(w / scale), -qmax, qmax) * scale)
    return out.eval()


def strict_json(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` through a JSON round trip that refuses NaN and infinity."""
    return json.loads(json.dumps(data, allow_nan=False))


def check_result(result: Any, *, strict: bool = True) -> None:
    """An evaluator result is a frozen dataclass whose ``to_dict()`` is JSON (strict: no NaN/inf)."""
    assert dataclasses.is_dataclass(result) and not isinstance(result, type), \
        f"{type(result).__name__} is not a dataclass instance"
    first = dataclasses.fields(result)[0].name
    try:
        setattr(result, first, 0)
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError(f"{type(result).__name__} is not frozen")
    data = getattr(result, "to_dict")()  # noqa: B009 - every result has it; the dataclass type does not say so
    if strict:
        strict_json(data)
    else:
        json.dumps(data)


def check_latency_result(result: Any, *, engine: str, batch_size: int, runs: int, warmup: int) -> None:
    """What every latency engine reports: its engine, settings, ordered statistics and where it ran."""
    from evaluators.base import LatencyResult

    assert isinstance(result, LatencyResult)
    check_result(result)
    assert result.engine == engine and result.batch_size == batch_size
    assert result.runs == runs and result.warmup == warmup
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms and result.mean_ms > 0
    assert abs(result.fps - 1000.0 * batch_size / result.median_ms) <= 1e-6 * result.fps
    assert result.provider and result.device


def check_accuracy_result(result: Any, *, names: Iterable[str], num_images: int) -> None:
    """What a COCO accuracy result holds: mAPs in range, per-class APs of known classes, counts and timings."""
    from evaluators.base import AccuracyResult

    assert isinstance(result, AccuracyResult)
    check_result(result)
    assert 0.0 < result.map50_95 <= result.map50 <= 1.0 and 0.0 <= result.map75 <= 1.0
    for v in (result.map_small, result.map_medium, result.map_large):
        assert v == -1.0 or 0.0 <= v <= 1.0  # -1: no ground truth in that size range (pycocotools)
    assert set(result.per_class) <= set(names) and result.per_class
    assert all(0.0 <= ap <= 1.0 for ap in result.per_class.values())
    assert result.num_images == num_images and result.num_detections > result.num_images
    assert result.images_per_s > 0 and result.seconds > 0


def tiny_onnx(path: str | os.PathLike[str], imgsz: int) -> Path:
    """A model with a detector's image input and almost no compute (a global mean), e.g. a latency reference."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["out"], keepdims=1)], "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return Path(path)
