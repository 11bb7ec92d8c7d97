"""Deliberately degraded copies of a detector, to check that evaluators rank damage correctly.

Used by the evaluator contract tests and ``benchmarks/bench_evaluators.py``: a fidelity
proxy is only useful if it orders damaged models the way COCO mAP does.

- ``noise``: each quantizable Conv2d weight gets Gaussian noise of ``strength`` times the
  tensor's standard deviation (fixed seed).
- ``pertensor``: naive symmetric per-tensor rounding to ``strength`` bits (one scale per
  layer from its max |w|), the scheme that made the seeds' W4 PTQ collapse.

The DFL conv (fixed arange weights) is never touched, as in every backend.
"""

from __future__ import annotations

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
