"""Output quantizers calibrated by the lowering, for backends that cannot model one.

``ort-cpu`` needs a quantizer on the output of every A8 convolution. The torch backends
(Brevitas, ModelOpt) model it themselves, calibrated like their input quantizers, so that
their fake-quant model computes what the lowered file computes. A backend that works on
ONNX only (``modelopt-onnx``) cannot; for those layers the lowering runs the backend's own
quantized graph in ONNX Runtime on the calibration images, with every such convolution's
output exposed, and sets a symmetric int8 range per tensor (zero point 0, which the
ort-cpu lowering writes as uint8 with zero point 128), or an asymmetric uint8 one:

- ``minmax`` (default): uint8 with a zero point, over the smallest..largest value seen
  (ONNX Runtime's ``quantize_static`` default; measured best on the demo, where clipping
  the convolutions' large outputs costs accuracy);
- ``percentile``: symmetric, the ``p``-th percentile of ``|y|`` per batch, averaged over
  the batches (Brevitas' and ModelOpt's percentile calibrators do the same per batch);
- ``max``: symmetric, the largest ``|y|`` seen.

Ranges are cached per (graph digest, images digest, method) in ``cache_dir``, so lowering
the same file again (``search export`` re-verifying a trial) costs nothing.

:func:`tensor_ranges` measures any tensors of a graph the same way (``minmax``, uint8): the
``ort-cpu`` pass that keeps Add outputs and lone SiLU outputs on uint8
(:mod:`quantizers.lowering.ort_cpu_ops`) calibrates the ranges no quantizer of the graph gives.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import LayerQuant, LoweringError, QParams

if TYPE_CHECKING:
    import numpy as np
    import onnx


def _digest(proto: onnx.ModelProto, images: np.ndarray, method: str, percentile: float) -> str:
    h = hashlib.sha256()
    h.update(proto.SerializeToString())
    h.update(str(images.shape).encode())
    flat = images.reshape(-1)
    h.update(flat[:: max(1, flat.size // 65536)].tobytes())
    h.update(f"{method}:{percentile}".encode())
    return h.hexdigest()[:16]


def output_ranges(model: onnx.ModelProto, layers: Sequence[LayerQuant], images: np.ndarray, *,
                  method: str = "minmax", percentile: float = 99.999, batch_size: int = 8,
                  cache_dir: Path | None = None) -> tuple[dict[str, QParams], dict[str, Any]]:
    """Output quantizers for ``layers`` (by layer name), and what it cost.

    Args:
        model: the source graph (the backend's export), unchanged.
        layers: the layers that need one (their ``node.output[0]`` is measured).
        images: calibration images ``(N, 3, S, S)`` float32, as the evaluator preprocesses them.
        method: ``minmax``, ``percentile`` or ``max``.
        percentile: for ``percentile``.
        batch_size: images per ONNX Runtime run (one when the graph has a fixed batch of 1).
        cache_dir: where computed ranges are kept (none: not cached).
    """
    import numpy as np

    from mpq.onnx_nodes import with_outputs as expose_outputs

    if len(layers) == 0:
        return {}, {"layers": 0}
    if images is None or len(images) == 0:
        raise LoweringError("the lowering needs calibration images to calibrate output quantizers for "
                            f"{len(layers)} A8 layers (e.g. '{layers[0].name}')")
    key = _digest(model, images, method, percentile)
    cache = Path(cache_dir) / f"output-ranges-{key}.json" if cache_dir is not None else None
    names = {lq.node.output[0]: lq.name for lq in layers}
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if set(data["ranges"]) >= set(names.values()):
            return ({n: _qparams(v) for n, v in data["ranges"].items() if n in names.values()},
                    {"layers": len(layers), "cached": True, "cache": str(cache), "method": method})
    import onnxruntime as ort

    t0 = time.perf_counter()
    probe = expose_outputs(model, list(names))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    bs = fixed or batch_size
    tensors = list(names)
    stats: dict[str, list[float]] = {t: [] for t in tensors}
    lows: dict[str, list[float]] = {t: [] for t in tensors}
    asym = method == "minmax"
    for i in range(0, len(images), bs):
        batch = np.ascontiguousarray(images[i:i + bs], dtype=np.float32)
        if fixed and len(batch) != fixed:
            break
        outs = sess.run(tensors, {inp.name: batch})
        for t, y in zip(tensors, outs, strict=True):
            if asym:
                v = np.asarray(y, dtype=np.float32)
                stats[t].append(float(v.max()))
                lows[t].append(float(v.min()))
                continue
            a = np.abs(np.asarray(y, dtype=np.float32)).reshape(-1)
            if method == "max":
                stats[t].append(float(a.max()))
            else:
                k = min(a.size - 1, max(0, int(np.ceil(percentile / 100.0 * a.size)) - 1))
                stats[t].append(float(np.partition(a, k)[k]))
    ranges: dict[str, dict[str, Any]] = {}
    for t, values in stats.items():
        if not values:
            raise LoweringError(f"calibration of the output of layer '{names[t]}' saw no batch")
        if asym:
            hi_a = max(float(max(values)), 0.0)
            lo_a = min(float(min(lows[t])), 0.0)
            sc = max(hi_a - lo_a, 1e-8) / 255.0
            zp = int(np.clip(np.rint(-lo_a / sc), 0, 255))
            ranges[names[t]] = {"scale": sc, "zero_point": zp, "qtype": "uint8", "low": lo_a, "high": hi_a}
            continue
        amax = float(max(values)) if method == "max" else float(np.mean(values))
        amax = amax if amax > 0 else 1e-8
        ranges[names[t]] = {"scale": amax / 127.0, "zero_point": 0, "qtype": "int8", "amax": amax}
    info = {"layers": len(layers), "cached": False, "method": method, "images": int(len(images)),
            "seconds": round(time.perf_counter() - t0, 3)}
    if cache is not None:
        from mpq.files import write_json

        write_json(cache, {"ranges": ranges, "info": info})
        info["cache"] = str(cache)
    return {n: _qparams(v) for n, v in ranges.items()}, info


def _qparams(v: dict[str, Any]) -> QParams:
    import numpy as np

    return QParams(np.asarray(v["scale"], dtype=np.float32), np.asarray(v["zero_point"], dtype=np.dtype(v["qtype"])),
                   v["qtype"])


def tensor_ranges(model: onnx.ModelProto, tensors: Sequence[str], images: np.ndarray, *, batch_size: int = 8,
                  cache_dir: Path | None = None) -> tuple[dict[str, QParams], dict[str, Any]]:
    """uint8 quantizers (zero point over the smallest..largest value seen, 0 included) for
    ``tensors`` of ``model``, measured by running ``model`` on ``images``; and what it cost.

    Cached like :func:`output_ranges` (graph digest, images digest) in ``cache_dir``."""
    import numpy as np

    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        return {}, {"tensors": 0}
    if images is None or len(images) == 0:
        raise LoweringError(f"the lowering needs calibration images to calibrate {len(tensors)} tensors "
                            f"(e.g. '{tensors[0]}')")
    key = _digest(model, images, "tensors-minmax", 0.0)
    cache = Path(cache_dir) / f"tensor-ranges-{key}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if set(data["ranges"]) >= set(tensors):
            return ({t: _qparams(data["ranges"][t]) for t in tensors},
                    {"tensors": len(tensors), "cached": True, "cache": str(cache)})
    import onnxruntime as ort

    from mpq.onnx_nodes import with_outputs as expose_outputs

    t0 = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(expose_outputs(model, tensors).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    bs = fixed or batch_size
    lo = dict.fromkeys(tensors, 0.0)
    hi = dict.fromkeys(tensors, 0.0)
    seen = 0
    for i in range(0, len(images), bs):
        batch = np.ascontiguousarray(images[i:i + bs], dtype=np.float32)
        if fixed and len(batch) != fixed:
            break
        for t, y in zip(tensors, sess.run(tensors, {inp.name: batch}), strict=True):
            lo[t], hi[t] = min(lo[t], float(np.min(y))), max(hi[t], float(np.max(y)))
        seen += 1
    if not seen:
        raise LoweringError(f"calibration of {len(tensors)} tensors saw no batch")
    ranges: dict[str, dict[str, Any]] = {}
    for t in tensors:
        sc = max(hi[t] - lo[t], 1e-8) / 255.0
        zp = int(np.clip(np.rint(-lo[t] / sc), 0, 255))
        ranges[t] = {"scale": sc, "zero_point": zp, "qtype": "uint8", "low": lo[t], "high": hi[t]}
    info: dict[str, Any] = {"tensors": len(tensors), "cached": False, "images": int(len(images)),
            "seconds": round(time.perf_counter() - t0, 3)}
    if cache is not None:
        from mpq.files import write_json

        write_json(cache, {"ranges": ranges, "info": info})
        info["cache"] = str(cache)
    return {t: _qparams(v) for t, v in ranges.items()}, info
