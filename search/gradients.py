"""Gradient-based sensitivity: a diagonal-Fisher (second-order Taylor) score.

The loss is the YOLO detection loss of the deployed head (the study's ``head``), computed
by Ultralytics' own ``v8DetectionLoss`` with the settings its end-to-end loss uses for
that branch (one-to-one: ``tal_topk=7, tal_topk2=1``; one-to-many: ``tal_topk=10``),
against the float model's confident detections as pseudo-labels (the one-to-many head's
after NMS), so no labels are needed. For each layer and candidate precision, the expected loss increase is estimated
as in ModelOpt's AutoQuantize and HAWQ-style methods::

    score = 1/2 * E_x[ sum_i (g_i * d_i)^2 ]

over the weight elements (``g`` the per-sample gradient of the loss w.r.t. the weight,
``d`` the weight's quantization error at that bit width: the backend's cached rounded
weights when it has them (GPTQ by default, what the trials build), else per-channel
symmetric round-to-nearest with scales chosen by MSE search) plus, when the layer's input
goes to INT8, the same over the input activation elements (per-tensor scale from the 99.99th
percentile of ``|x|`` on the calibration images). Per-sample gradients use batches of one image.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from mpq.assignment import LayerGroup, Precision
from mpq.errors import UserError

if TYPE_CHECKING:
    import torch

    from search.resources import StudyResources


def quantize_weight(w: torch.Tensor, bits: int, *, mse_grid: int = 40) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization (narrow range), scale by MSE search."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1)
    amax = flat.abs().amax(1, keepdim=True).clamp_min(1e-12)
    if bits >= 8:
        scale = amax / qmax
        return (torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale).reshape_as(w)
    best = flat
    best_err = torch.full_like(amax, float("inf"))
    for frac in torch.linspace(0.3, 1.0, mse_grid, dtype=w.dtype, device=w.device):
        scale = amax * frac / qmax
        q = torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale
        err = (q - flat).pow(2).sum(1, keepdim=True)
        better = err < best_err
        best = torch.where(better, q, best)
        best_err = torch.where(better, err, best_err)
    return best.reshape_as(w)


def quantize_activation(x: torch.Tensor, amax: float, bits: int = 8) -> torch.Tensor:
    """Per-tensor symmetric fake quantization of an activation with range ``amax``."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    scale = max(amax, 1e-12) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def _nms_rows(out: torch.Tensor, iou: float, conf: float = 0.25) -> torch.Tensor:
    """Raw one-to-many outputs (N, 4 + nc, anchors) -> NMS detections as (N, K, 6) rows (zero-padded)."""
    import torch

    from evaluators.decode import decode_raw

    dets = decode_raw(out.detach().cpu().numpy(), conf=conf, iou=iou, max_det=300, multi_label=False)
    rows = torch.zeros(len(dets), max(max((len(d) for d in dets), default=0), 1), 6)
    for i, d in enumerate(dets):
        rows[i, :len(d), :4] = torch.from_numpy(d.boxes)
        rows[i, :len(d), 4] = torch.from_numpy(d.scores)
        rows[i, :len(d), 5] = torch.from_numpy(d.classes.astype("float32"))
    return rows


def _pseudo_labels(out: torch.Tensor, imgsz: int, conf: float = 0.25) -> dict[str, torch.Tensor]:
    """End-to-end detections (N, K, 6) -> an Ultralytics training batch (normalized xywh)."""
    import torch

    idx, cls, boxes = [], [], []
    for i, det in enumerate(out):
        det = det[det[:, 4] > conf]
        if not len(det):
            continue
        xyxy = det[:, :4].clamp(0, imgsz)
        xywh = torch.stack(((xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                            xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]), 1) / imgsz
        idx.append(torch.full((len(det),), float(i)))
        cls.append(det[:, 5])
        boxes.append(xywh)
    if not idx:
        return {"batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1), "bboxes": torch.zeros(0, 4)}
    return {"batch_idx": torch.cat(idx), "cls": torch.cat(cls).view(-1, 1), "bboxes": torch.cat(boxes)}


def fisher_sensitivity(res: StudyResources, candidates: list[Precision], *, progress: bool = True,
                       ) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, Any]]:
    """Fisher scores per (group, candidate) for the study's groups (see the module doc)."""
    import torch

    one2one = res.model.layout == "end2end"
    model: Any = res.model.fresh().module
    device = torch.device(res.device)
    model.to(device)
    images = res.calibration.images[: res.spec.sensitivity.images]
    modules = dict(model.named_modules())
    layers: dict[str, Any] = {n: modules[n] for g in res.groups for n in g.layers}
    model.eval()  # stays in eval mode: BatchNorm is folded, the head is rerouted for the gradients
    outs, act_range = _input_ranges(model, layers, images, device)
    if not one2one:
        outs = [_nms_rows(o, res.spec.evaluation.iou) for o in outs]
    weight_sq, act_score, used = _squared_gradients(model, layers, images, outs, act_range, res.spec.imgsz, device,
                                                    one2one=one2one, progress=progress)
    if used == 0:
        raise UserError("fisher sensitivity: the float model detects nothing on the calibration images "
                        "(no pseudo-labels); use metric: fidelity")
    rounded = backend_weights(res)
    scores = _group_scores(res, layers, {n: w / used for n, w in weight_sq.items()},
                           {n: a / used for n, a in act_score.items()}, candidates, rounded)
    loss_name = ("v8DetectionLoss one2one (tal_topk=7, tal_topk2=1)" if one2one
                 else "v8DetectionLoss one2many (tal_topk=10)")
    return scores, {"images": used, "loss": f"{loss_name}, pseudo-labels", "head": res.model.head,
                    "weights": "the backend's cached rounded weights" if rounded is not None
                    else "round to nearest, per-channel MSE scales"}


def backend_weights(res: StudyResources) -> Any:
    """The backend's cached rounded weights (a ``WeightStore``), so the weight error scored is
    the one the trials build; ``None`` when the backend rounds to nearest (then :func:`quantize_weight`)."""
    backend: Any = res.backend
    if getattr(backend, "rounding", "nearest") == "nearest" or not hasattr(backend, "rounded_weights"):
        return None
    store, _ = backend.rounded_weights(res.model, res.calibration)
    return store


def _input_ranges(model: Any, layers: dict[str, Any], images: Any, device: Any) -> tuple[list[Any], dict[str, float]]:
    """Pass 1, float model, no grad: the outputs (pseudo-labels) and every layer's input range
    (the largest over images of the 99.99th percentile of ``|x|``)."""
    import numpy as np
    import torch

    amax: dict[str, list[float]] = {n: [] for n in layers}
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, n=n: amax[n].append(float(torch.quantile(
            inp[0].detach().abs().flatten().float()[:2_000_000], 0.9999))))
        for n, m in layers.items()]
    with torch.no_grad():
        outs = [model(torch.from_numpy(images[i:i + 1]).to(device)) for i in range(len(images))]
    for h in hooks:
        h.remove()
    return outs, {n: float(np.max(v)) for n, v in amax.items()}


def _squared_gradients(model: Any, layers: dict[str, Any], images: Any, outs: list[Any], act_range: dict[str, float],
                       imgsz: int, device: Any, *, one2one: bool, progress: bool,
                       ) -> tuple[dict[str, Any], dict[str, float], int]:
    """Pass 2, one image at a time: the summed squared weight gradients of the deployed head's detection
    loss (as Ultralytics' end-to-end loss sets it for that branch), the summed activation terms, and the
    number of images with pseudo-labels."""
    import torch
    from rich.progress import track
    from ultralytics.cfg import get_cfg
    from ultralytics.utils.loss import v8DetectionLoss

    shim = types.SimpleNamespace(args=get_cfg(), model=model.model, parameters=model.parameters)
    crit = (v8DetectionLoss(shim, tal_topk=7, tal_topk2=1) if one2one  # type: ignore[arg-type]
            else v8DetectionLoss(shim, tal_topk=10))  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    weight_sq = {n: torch.zeros_like(m.weight) for n, m in layers.items()}
    act_score = {n: 0.0 for n in layers}
    captured: dict[str, torch.Tensor] = {}

    def capture(mod: Any, inp: tuple[torch.Tensor, ...], n: str) -> None:
        x = inp[0]
        if x.requires_grad:
            x.retain_grad()
            captured[n] = x

    # the deployed head's raw outputs, without the detach that training mode applies
    head = model.model[-1]
    branch = head.one2one if one2one else head.one2many
    head.forward = lambda feats: head.forward_head(feats, **branch)
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: capture(mod, inp, n)) for n, m in layers.items()]
    used = 0
    iterator = range(len(images))
    if progress:
        iterator = track(iterator, description="fisher: gradients", transient=True)  # type: ignore[assignment]
    try:
        for i in iterator:
            batch = _pseudo_labels(outs[i].detach().cpu(), imgsz)
            if not len(batch["cls"]):
                continue
            x = torch.from_numpy(images[i:i + 1]).to(device).requires_grad_(True)
            captured.clear()
            loss, _ = crit.loss(model(x), {k: v.to(device) for k, v in batch.items()})
            model.zero_grad(set_to_none=True)
            loss.sum().backward()
            for n, m in layers.items():
                if m.weight.grad is not None:
                    weight_sq[n] += m.weight.grad.detach() ** 2
                xin = captured.get(n)
                if xin is not None and xin.grad is not None:
                    dx = quantize_activation(xin.detach(), act_range[n]) - xin.detach()
                    act_score[n] += 0.5 * float(((xin.grad.detach() * dx) ** 2).sum())
            used += 1
    finally:
        for h in hooks:
            h.remove()
    return weight_sq, act_score, used


def _group_scores(res: StudyResources, layers: dict[str, Any], fisher: dict[str, Any], act_term: dict[str, float],
                  candidates: list[Precision], rounded: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per group and candidate: the weight term (Fisher x squared quantization error, with the
    ``rounded`` store's weights where it has them) plus the activation term."""
    import torch

    weight_term: dict[tuple[str, int], float] = {}
    with torch.no_grad():
        for n, mod in layers.items():
            for bits in sorted({p.w_bits for p in candidates if p.w_bits < 16}):
                w = mod.weight.detach()
                given = rounded.get(n, bits) if rounded is not None else None
                dw = (given.dequantized().to(w) if given is not None else quantize_weight(w, bits)) - w
                weight_term[(n, bits)] = 0.5 * float((fisher[n] * dw ** 2).sum())
    scores: dict[str, dict[str, dict[str, float]]] = {}
    group: LayerGroup
    for group in res.groups:
        allowed = res.candidates_for(group)
        per: dict[str, dict[str, float]] = {}
        for prec in candidates:
            if prec not in allowed:
                continue
            w = sum(weight_term.get((n, prec.w_bits), 0.0) for n in group.layers) if prec.w_bits < 16 else 0.0
            a = sum(act_term[n] for n in group.layers) if prec.a_bits < 16 else 0.0
            per[str(prec)] = {"damage": w + a, "weight_term": w, "act_term": a}
        scores[group.name] = per
    return scores
