"""Asymmetric activation ranges: exact min/max, deterministic samples, the MSE search."""

from __future__ import annotations

import numpy as np

from quantizers.ranges import RangeObserver, asym_grid, mse_range


def test_minmax_holds_zero_and_is_exact():
    ob = RangeObserver(batches=2)
    ob.update(np.linspace(0.5, 3.0, 100, dtype=np.float32))
    ob.update(np.linspace(1.0, 2.0, 100, dtype=np.float32))
    assert ob.minmax() == (0.0, 3.0)
    scale, zp = asym_grid(-0.25, 3.0)
    assert zp == round(0.25 / scale) and abs(scale - 3.25 / 255) < 1e-9


def test_samples_are_random_and_deterministic():
    x = np.tile(np.arange(96, dtype=np.float32), 96 * 64)  # rows of 0..95: a stride would alias
    a, b = RangeObserver(budget=4096), RangeObserver(budget=4096)
    a.update(x)
    b.update(x)
    np.testing.assert_array_equal(a.samples[0], b.samples[0])
    assert len(np.unique(a.samples[0])) > 90


def test_mse_clips_a_sparse_tail_but_not_a_dense_range():
    rng = np.random.default_rng(0)
    dense = rng.uniform(-0.2, 6.0, 200_000).astype(np.float32)
    assert mse_range(dense, float(dense.min()), float(dense.max()))[1] == float(dense.max())
    tail = np.concatenate([rng.exponential(0.5, 200_000), [40.0]]).astype(np.float32)
    lo, hi = mse_range(tail, 0.0, float(tail.max()))
    assert lo == 0.0 and hi < 0.9 * 40.0


def test_torch_tensors_are_observed():
    import torch

    ob = RangeObserver(batches=1, budget=1000)
    ob.update(torch.linspace(-1.0, 2.0, 5000))
    assert ob.minmax() == (-1.0, 2.0) and sum(s.size for s in ob.samples) == 1024


def test_silu_lower_bound_clips_only_what_silu_flattens():
    from quantizers.ranges import silu, silu_lower_bound

    lo = silu_lower_bound(-20.0, 10.0)
    assert -20.0 < lo < -1.278
    # at the new bound SiLU is within half a step of the new grid: clipping there is free
    assert abs(silu(lo)) <= 0.5 * (10.0 - lo) / 255 + 1e-9
    assert silu_lower_bound(-1.0, 4.0) == -1.0      # nothing to clip above SiLU's minimum
    assert silu_lower_bound(-3.0, 0.5) >= -3.0     # never below the observed minimum
