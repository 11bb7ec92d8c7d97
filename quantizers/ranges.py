"""Activation range statistics shared by the backends and the lowering: asymmetric (uint8
with a zero point) ranges from the calibration images.

:class:`RangeObserver` streams tensors (one per calibration batch) and keeps the exact
minimum and maximum plus a bounded strided sample of the values; :func:`mse_range` then
picks, on that sample, the ``[lo, hi]`` whose uint8 grid has the smallest mean squared
quantization error among clipped versions of ``[min, max]`` (a grid search over clipping
factors, as ONNX Runtime's and ModelOpt's calibrators search over histogram bins).

Why these two (measured on the demo, docs/benchmarks.md "Deployment", averaged over three
calibration subsets): for the ``ort-cpu`` target, where every A8 convolution quantizes its
input *and* its output, the least mAP is lost with MSE-clipped ranges on the inputs (SiLU
outputs: long sparse positive tails) and unclipped min..max ranges on the outputs (clipping
a convolution's large outputs, the strong responses, costs accuracy: percentile or MSE
clipping there lost 0.3 to 1 point more).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: clipping factors of the observed max (and min) searched by :func:`mse_range`
HI_FACTORS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
LO_FACTORS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.6)


@dataclass
class RangeObserver:
    """Exact min / max and a uniform random sample (seeded: deterministic; at most about
    ``budget`` values overall, none when ``budget`` is 0) of a stream of ``batches`` tensors
    (torch or numpy). Random, not strided: a stride through an ``(N, C, H, W)`` tensor can
    alias with its rows and sample the same few columns (e.g. the letterbox border) only."""

    budget: int = 1 << 18
    batches: int = 1
    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[Any] = field(default_factory=list)
    seed: int = 0

    def update(self, x: Any) -> None:
        import numpy as np

        if hasattr(x, "detach"):
            flat = x.detach().reshape(-1)
            self.lo = min(self.lo, float(flat.min()))
            self.hi = max(self.hi, float(flat.max()))
            if self.budget <= 0:
                return
            quota = max(1024, self.budget // max(self.batches, 1))
            self.samples.append(self._pick(flat.float().cpu().numpy(), quota))
        else:
            flat = np.asarray(x, dtype=np.float32).reshape(-1)
            self.lo = min(self.lo, float(flat.min()))
            self.hi = max(self.hi, float(flat.max()))
            if self.budget <= 0:
                return
            quota = max(1024, self.budget // max(self.batches, 1))
            self.samples.append(self._pick(flat, quota))

    def _pick(self, flat: Any, quota: int) -> Any:
        import numpy as np

        if flat.size <= quota:
            return flat.copy()
        rng = np.random.default_rng(self.seed + len(self.samples))
        return flat[rng.integers(0, flat.size, quota)]

    def minmax(self) -> tuple[float, float]:
        """``[min(min, 0), max(max, 0)]``: the range holds 0 (exactly representable)."""
        return min(self.lo, 0.0), max(self.hi, 0.0)

    def mse(self) -> tuple[float, float]:
        import numpy as np

        lo, hi = self.minmax()
        return mse_range(np.concatenate(self.samples) if self.samples else np.zeros(1, np.float32), lo, hi)


def asym_grid(lo: float, hi: float) -> tuple[float, int]:
    """uint8 ``(scale, zero_point)`` of the range ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    import numpy as np

    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(np.clip(np.rint(-lo / scale), 0, 255))


def mse_range(samples: Any, lo: float, hi: float) -> tuple[float, float]:
    """The clipped ``[lo', hi']`` (factors :data:`HI_FACTORS` x :data:`LO_FACTORS` of ``[lo, hi]``)
    with the smallest mean squared uint8 quantization error on ``samples``."""
    import numpy as np

    v = np.asarray(samples, dtype=np.float32).reshape(-1)
    best: tuple[float, float, float] | None = None
    for fh in HI_FACTORS:
        for fl in LO_FACTORS if lo < 0 else (1.0,):
            lo_c, hi_c = lo * fl, hi * fh
            scale, zp = asym_grid(lo_c, hi_c)
            q = np.clip(np.rint(v / scale) + zp, 0, 255)
            err = float(np.mean(((q - zp) * scale - v) ** 2))
            if best is None or err < best[0]:
                best = (err, lo_c, hi_c)
    assert best is not None
    return best[1], best[2]


def silu(x: float) -> float:
    """``x * sigmoid(x)``."""
    import math

    return x / (1.0 + math.exp(-x)) if x > -60 else 0.0


def silu_lower_bound(lo: float, hi: float, levels: int = 255) -> float:
    """The lower end of a range feeding SiLU, raised as far as SiLU lets it for free.

    SiLU flattens large negative inputs to ~0 (``SiLU(-8) = -0.003``), so a quantizer whose
    output only feeds SiLU may clip its range at the ``lo'`` where ``|SiLU(lo')|`` is within
    half a step of the resulting grid: what SiLU computes changes by less than the grid's own
    rounding, and the step over the rest of the range shrinks (the unclipped minimum of a
    convolution's output is often far more negative than its maximum is positive). Never
    below ``lo``, never above SiLU's minimum (``x = -1.278``).
    """
    if lo >= -1.278:
        return lo
    a, b = lo, -1.278  # |silu| decreases towards -inf: find the largest-magnitude lo' still worth keeping
    for _ in range(60):
        mid = 0.5 * (a + b)
        half_step = 0.5 * (hi - mid) / levels
        if abs(silu(mid)) <= half_step:
            a = mid  # clipping at mid is free: try to raise it further
        else:
            b = mid
    return max(lo, a)
