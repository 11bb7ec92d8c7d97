"""Label-free fidelity: how closely a (quantized) model agrees with the float model.

On a few calibration images (no labels), :class:`FidelityEvaluator` runs the reference
(float) model once and then scores each candidate by:

- **detection agreement** (``det_map``, ``det_map50``): COCO-style mAP50-95 / mAP50 of the
  candidate's detections (conf 0.001) against the reference's confident detections
  (score >= ``label_conf``, default 0.25) used as pseudo-labels; 1.0 means the same
  boxes. Scored with :func:`evaluators.metrics.detection_map`, a vectorized pycocotools
  equivalent, because building pycocotools objects per probe would cost more than the
  inference.
- **output error** (``sqnr_db``): signal-to-quantization-noise ratio of the raw head
  tensor ``(N, 4 + nc, anchors)`` (decoded boxes, class probabilities) against the
  reference's. For end-to-end (YOLOv10) models the final ``(N, 300, 6)`` rows are
  re-sorted by score, so the raw tensor is taken before the head's top-k:

  - ONNX candidates: the tensor is found by shape in the graph
    (:func:`evaluators.onnx_graph.find_raw_head_tensor`) and exposed as an extra output
    of an in-memory copy of the graph (the file is not touched);
  - torch modules (float or fake-quant, e.g. a Brevitas ``QuantizedModel.module``): the
    head's ``_inference`` result is captured during the forward (:func:`torch_callable`);
  - other callables may return ``(output, raw)`` or ``{"output": ..., "raw": ...}``;
    with only the final output of an end-to-end model, SQNR is ``nan`` (reason in ``extra``).

  ``sqnr_db`` is the mean of the SQNR of the class-probability channels (all anchors) and
  of the box channels over the anchors where the reference is confident (``label_conf``),
  so neither the pixel-valued boxes nor the background anchors dominate; both parts are in
  ``extra``. Identical outputs give 200 dB (the cap).

A candidate is an ONNX path, a ``torch.nn.Module``, or a callable
``np.ndarray (N, 3, S, S) -> output``; callables are called per batch of ``batch_size``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.base import FidelityResult
from evaluators.decode import Detections, decode
from evaluators.errors import EvaluatorError, ModelFormatError
from evaluators.metrics import detection_map
from evaluators.session import CPU, LAYOUT_END2END, LAYOUT_RAW, check_image_input, open_session

SQNR_CAP_DB = 200.0
Candidate = str | os.PathLike[str] | Callable[[np.ndarray], Any]


@dataclass(frozen=True, eq=False)
class ModelOutputs:
    """One model's outputs on the fidelity images: final tensor, raw head tensor, detections."""

    final: np.ndarray
    raw: np.ndarray | None
    layout: str
    detections: list[Detections]
    info: dict[str, Any]


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """``10 log10(sum(ref^2) / sum((ref - test)^2))``, capped at :data:`SQNR_CAP_DB`."""
    ref = np.asarray(reference, dtype=np.float64)
    err = ref - np.asarray(test, dtype=np.float64)
    noise = float(np.square(err).sum())
    signal = float(np.square(ref).sum())
    if not math.isfinite(noise):
        return float("-inf") if signal > 0 else float("nan")
    if noise <= signal * 10 ** (-SQNR_CAP_DB / 10):
        return SQNR_CAP_DB
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _split(out: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(out, Mapping):
        final = out.get("output", out.get("output0"))
        if final is None:
            raise EvaluatorError(f"a fidelity callable returned a dict with keys {sorted(out)}; expected "
                                 "'output' (and optionally 'raw')")
        raw = out.get("raw")
        return _to_numpy(final), None if raw is None else _to_numpy(raw)
    if isinstance(out, (tuple, list)):
        if not out:
            raise EvaluatorError("a fidelity callable returned an empty sequence; expected an output array")
        return _to_numpy(out[0]), None if len(out) < 2 or out[1] is None else _to_numpy(out[1])
    return _to_numpy(out), None


def _find_head(module: Any) -> Any:
    """The YOLO detection head (the last submodule with ``_inference``), or ``None``."""
    head = None
    for m in module.modules():
        if hasattr(m, "_inference") and hasattr(m, "nc"):
            head = m
    return head


RawRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def torch_callable(module: Any, *, batch_size: int = 32) -> RawRunner:
    """Wrap a torch detector (float or fake-quant) as ``images -> (output, raw head tensor)``.

    The raw tensor is the ``(N, 4 + nc, anchors)`` result of the YOLO head's
    ``_inference``, captured by shadowing that method on the head instance during each
    forward (restored afterwards). Inputs go to the module's device; no gradients.
    """
    import torch

    head = _find_head(module)
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        finals: list[np.ndarray] = []
        raws: list[np.ndarray] = []
        captured: list[Any] = []
        shadowed = head is not None and "_inference" in vars(head)
        previous = vars(head).get("_inference") if head is not None else None
        if head is not None:
            original = head._inference

            def capture(x: Any) -> Any:
                y = original(x)
                captured.append(y)
                return y

            head._inference = capture
        try:
            with torch.no_grad():
                for i in range(0, len(images), batch_size):
                    captured.clear()
                    x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
                    out = module(x)
                    finals.append(_to_numpy(out[0] if isinstance(out, (tuple, list)) else out))
                    if captured:
                        raws.append(_to_numpy(captured[-1]))
        finally:
            if head is not None:
                if shadowed:
                    head._inference = previous
                else:
                    del head._inference
        raw = np.concatenate(raws) if len(raws) == len(finals) and raws else None
        return np.concatenate(finals), raw

    return run


class FidelityEvaluator:
    """Label-free agreement of candidate models with a reference (float) model.

    Args:
        reference: the float model: an ONNX path, a torch module or a callable.
        images: calibration images ``(N, 3, S, S)`` float32 RGB in [0, 1], preprocessed like
            the evaluation images.
        names: class names (index -> name); or give ``num_classes``. Needed to find the raw
            head tensor in end-to-end ONNX graphs and to check output layouts.
        num_classes: number of classes when ``names`` is not given.
        label_conf: reference detections at or above this score are the pseudo-labels.
        conf, iou, max_det: decoding of candidate outputs (as the COCO evaluator).
        batch_size: images per ``session.run`` / callable call.
        providers, threads, disable_cpu_fallback: ONNX Runtime settings for ONNX models.
    """

    def __init__(self, *, reference: Candidate, images: np.ndarray, names: Mapping[int, str] | None = None,
                 num_classes: int | None = None, label_conf: float = 0.25, conf: float = 0.001, iou: float = 0.7,
                 max_det: int = 300, batch_size: int = 32, providers: Sequence[str] = (CPU,),
                 threads: int | None = None, disable_cpu_fallback: bool = False):
        arr = np.ascontiguousarray(images, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.shape[2] != arr.shape[3]:
            raise EvaluatorError(f"fidelity images have shape {arr.shape}; expected (N, 3, S, S) float32 "
                                 "(preprocessed calibration images)")
        if not len(arr):
            raise EvaluatorError("fidelity needs at least one image")
        self.images = arr
        self.imgsz = int(arr.shape[-1])
        self.num_classes = len(names) if names is not None else num_classes
        self.label_conf = float(label_conf)
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        self.batch_size = int(batch_size)
        self.providers = tuple(providers)
        self.threads = threads
        self.disable_cpu_fallback = disable_cpu_fallback
        t0 = time.perf_counter()
        self.reference = self.run(reference)
        self.reference_seconds = time.perf_counter() - t0
        if self.num_classes is None:
            self.num_classes = self._infer_classes(self.reference)
        self.labels = [d.above(self.label_conf) for d in self.reference.detections]
        if not sum(len(d) for d in self.labels):
            raise EvaluatorError(f"the reference model finds no detection with score >= {self.label_conf} on the "
                                 f"{len(arr)} fidelity images, so there is nothing to agree on; lower label_conf "
                                 "or use other calibration images")
        self._confident = self._confident_anchors()

    # -- running models -----------------------------------------------------------------------
    def _infer_classes(self, out: ModelOutputs) -> int | None:
        if out.raw is not None:
            return int(out.raw.shape[1] - 4)
        return None

    def _layout(self, final: np.ndarray, source: str) -> str:
        if final.ndim != 3:
            raise ModelFormatError(f"{source}: output has shape {list(final.shape)}; expected end-to-end "
                                   "(N, max_det, 6) or raw (N, 4 + classes, anchors)")
        if self.num_classes is not None:
            from evaluators.session import detect_layout

            return detect_layout(final.shape, num_classes=self.num_classes, imgsz=self.imgsz, source=source)
        return LAYOUT_END2END if final.shape[2] == 6 else LAYOUT_RAW

    def _finish(self, final: np.ndarray, raw: np.ndarray | None, source: str, info: dict[str, Any]) -> ModelOutputs:
        if len(final) != len(self.images):
            raise ModelFormatError(f"{source}: returned {len(final)} outputs for {len(self.images)} images")
        layout = self._layout(final, source)
        if layout == LAYOUT_RAW:
            raw = final
        dets = decode(final, layout, conf=self.conf, iou=self.iou, max_det=self.max_det)
        return ModelOutputs(final, raw, layout, dets, info)

    def _run_onnx(self, path: Path) -> ModelOutputs:
        from evaluators.onnx_graph import find_raw_head_tensor, load
        from mpq.onnx_nodes import with_outputs

        source = str(path)
        model = load(path)
        out_name = model.graph.output[0].name if model.graph.output else None
        raw_name = None
        info: dict[str, Any] = {"candidate": "onnx", "path": source}
        payload: str | bytes = source
        shape = [d.dim_value if d.HasField("dim_value") else None
                 for d in model.graph.output[0].type.tensor_type.shape.dim] if out_name else []
        raw_layout = len(shape) == 3 and self.num_classes is not None and shape[1] == 4 + self.num_classes
        if not raw_layout:  # end-to-end (or not known statically): expose the head's raw tensor
            raw_name = find_raw_head_tensor(model, self.num_classes)
            if raw_name is not None:
                payload = with_outputs(model, [raw_name]).SerializeToString()
            else:
                info["sqnr_unavailable"] = "no (N, 4 + nc, anchors) Concat found before the top-k in the graph"
        sess, report, io = open_session(payload, providers=self.providers, threads=self.threads,
                                        disable_cpu_fallback=self.disable_cpu_fallback, source=source)
        fixed = check_image_input(io, self.imgsz, source)
        from evaluators.coco import run_batches

        names = [io.output_names[0]] + ([raw_name] if raw_name else [])
        outs = run_batches(sess, io, self.images, self.batch_size, fixed, outputs=names)
        final = np.concatenate(outs[0])
        raw = np.concatenate(outs[1]) if raw_name else None
        nc = self.num_classes
        if raw is not None and (raw.ndim != 3 or (nc is not None and raw.shape[1] != 4 + nc)):
            info["sqnr_unavailable"] = f"graph tensor {raw_name} has shape {list(raw.shape)}, not (N, 4 + nc, anchors)"
            raw, raw_name = None, None
        info.update({"provider": report.provider, "raw_tensor": raw_name})
        return self._finish(final, raw, source, info)

    def _run_callable(self, fn: Callable[[np.ndarray], Any], kind: str) -> ModelOutputs:
        finals, raws = [], []
        for i in range(0, len(self.images), self.batch_size):
            final, raw = _split(fn(self.images[i:i + self.batch_size]))
            finals.append(final)
            if raw is not None:
                raws.append(raw)
        final = np.concatenate(finals)
        raw = np.concatenate(raws) if raws and len(raws) == len(finals) else None
        info: dict[str, Any] = {"candidate": kind}
        if raw is None and final.ndim == 3 and final.shape[2] == 6:
            info["sqnr_unavailable"] = ("the callable returned only the end-to-end output; return (output, raw) or "
                                        "wrap torch modules with evaluators.fidelity.torch_callable")
        return self._finish(final, raw, kind, info)

    def run(self, model: Candidate) -> ModelOutputs:
        """Run a model (ONNX path, torch module or callable) on the fidelity images."""
        if isinstance(model, (str, os.PathLike)):
            return self._run_onnx(Path(model))
        if hasattr(model, "named_modules") and hasattr(model, "parameters"):  # a torch nn.Module
            return self._run_callable(torch_callable(model, batch_size=self.batch_size), "torch")
        if callable(model):
            return self._run_callable(model, "callable")
        raise EvaluatorError(f"fidelity candidate of type {type(model).__name__}; expected an ONNX path, a torch "
                             "module or a callable images -> output")

    # -- scoring ---------------------------------------------------------------------------------
    def _confident_anchors(self) -> np.ndarray | None:
        raw = self.reference.raw
        if raw is None:
            return None
        return raw[:, 4:, :].max(1) >= self.label_conf  # (N, anchors)

    def _sqnr(self, raw: np.ndarray | None) -> tuple[float, float, float]:
        ref = self.reference.raw
        if raw is None or ref is None:
            return float("nan"), float("nan"), float("nan")
        if raw.shape != ref.shape:
            raise ModelFormatError(f"raw head tensor of shape {list(raw.shape)} does not match the reference's "
                                   f"{list(ref.shape)}")
        cls_db = sqnr_db(ref[:, 4:], raw[:, 4:])
        mask = self._confident
        if mask is None or not mask.any():
            box_db = sqnr_db(ref[:, :4], raw[:, :4])
        else:
            rb = np.transpose(ref[:, :4], (0, 2, 1))[mask]
            cb = np.transpose(raw[:, :4], (0, 2, 1))[mask]
            box_db = sqnr_db(rb, cb)
        return (box_db + cls_db) / 2, box_db, cls_db

    def evaluate(self, candidate: Candidate) -> FidelityResult:
        """Agreement of ``candidate`` with the reference on the fidelity images."""
        t0 = time.perf_counter()
        out = self.run(candidate)
        t1 = time.perf_counter()
        m = detection_map(out.detections, self.labels)
        sq, box_db, cls_db = self._sqnr(out.raw)
        t2 = time.perf_counter()
        extra = {**out.info, "layout": out.layout, "sqnr_box_db": box_db, "sqnr_cls_db": cls_db,
                 "num_pseudo_labels": m.num_ref, "num_detections": m.num_det, "label_conf": self.label_conf,
                 "per_class_det_map": m.per_class, "inference_s": round(t1 - t0, 4), "score_s": round(t2 - t1, 4)}
        return FidelityResult(det_map=m.map50_95, det_map50=m.map50, sqnr_db=sq, num_images=len(self.images),
                              seconds=t2 - t0, extra=extra)
