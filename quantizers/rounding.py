"""Output-aware rounding of fixed-scale integer weights, computed once per layer from float inputs.

The backends choose each layer's weight scales from the float weights alone (MSE search,
max or percentile, one scale per output channel). What then decides a 4-bit layer's
damage is *which* integers each weight rounds to: round-to-nearest minimizes the weight
error, GPTQ minimizes the layer's output error on the calibration images,
``||W X - Q X||^2``, which is a quadratic form in the weight error with the layer's input
second moment ``H = 2/n * X X^T`` (one per group of a grouped convolution, over the
unfolded input patches). Everything here works from ``H`` alone:

- :func:`collect_hessians`: one float forward over the calibration images with a hook on
  each layer accumulates ``H``, exactly as Brevitas' ``gptq_mode`` does (same unfolding,
  same running normalization per batch); layers are independent because every layer sees
  the *float* model's input (no quantized layer upstream), so one pass serves every layer
  and every weight width, and the result can be cached;
- :func:`gptq_integers`: GPTQ (act order, 1 % dampening, the Cholesky of the inverse, lazy
  block updates), a transcription of Brevitas' ``GPTQ.single_layer_update`` with the scales
  kept fixed, returning the integers (so a single-layer ``gptq_mode`` run on the same
  float inputs gives the same integers; ``tests/integration/test_weight_rounding.py``);
- :func:`gpfq_integers`: GPFQ's greedy path following with float inputs on both sides,
  written in terms of ``H`` (``q_t = Q(w_t + sum_{j<t} H_tj (w_j - q_j) / H_tt)``), the
  candidate it was measured against;
- :func:`nearest_integers`: round-to-nearest, what the backends did before.

Which integers a whole model gets when every layer's inputs are float but some upstream
layers are quantized at trial time is an approximation (sequential GPTQ re-measures each
layer's input after quantizing the layers before it); its cost on the demo is measured in
docs/benchmarks.md ("Cached output-aware weights").

Storing the result once per model and calibration set (and building it with a progress
bar) is :mod:`quantizers.weight_store`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

#: GPTQ settings: Brevitas' defaults for ``gptq_mode`` as the backend calls it (act order on).
GPTQ_DAMP = 0.01
GPTQ_BLOCKS = 100

#: Rounding methods (the ``weight_rounding`` option of the backends that use this module).
METHODS = ("gptq", "gpfq", "nearest")

#: Largest total size of the Hessians held at once during collection; beyond it the layers
#: are split into several passes over the calibration images.
HESSIAN_BUDGET_BYTES = 1 << 30


# --------------------------------------------------------------------------------------
# Input second moments
# --------------------------------------------------------------------------------------
def layer_groups(layer: nn.Module) -> int:
    from torch import nn

    return int(layer.groups) if isinstance(layer, nn.Conv2d) else 1


def hessian_columns(layer: nn.Module) -> int:
    """Columns of a layer's weight matrix per group (``C_in/groups * kh * kw`` or ``in_features``)."""
    weight: Any = layer.weight
    return int(math.prod(weight.shape[1:]))


def hessian_bytes(layer: nn.Module) -> int:
    return 4 * layer_groups(layer) * hessian_columns(layer) ** 2


def unfold_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(groups, columns, samples)``: the input patches each output position of ``layer`` sees,
    as Brevitas' ``GPxQ.process_input`` builds them (``unfoldNd`` is a one-hot convolution,
    which copies values exactly as :func:`torch.nn.functional.unfold` does)."""
    import torch.nn.functional as F
    from torch import nn

    if isinstance(layer, nn.Linear):
        if x.dim() > 2:
            x = x.reshape(-1, x.shape[-1])
        return x.t().unsqueeze(0)
    assert isinstance(layer, nn.Conv2d) and isinstance(layer.padding, tuple)
    groups = int(layer.groups)
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)  # (B, C*kh*kw, L), channel-major: group g is one contiguous block of rows
    b, rows, length = cols.shape
    # (groups, Cg*kh*kw, B*L), as Brevitas builds it group by group (chunk, unfold, transpose, flatten)
    return cols.view(b, groups, rows // groups, length).permute(1, 2, 0, 3).reshape(groups, rows // groups, -1)


class _Accumulator:
    """Running ``H = 2/n * sum x x^T`` with Brevitas' per-batch normalization."""

    def __init__(self, layer: nn.Module, device: Any) -> None:
        import torch

        self.layer = layer
        cols = hessian_columns(layer)
        self.H = torch.zeros((layer_groups(layer), cols, cols), device=device, dtype=torch.float32)
        self.nsamples = 0

    def add(self, x: torch.Tensor) -> None:
        inp = unfold_input(self.layer, x)
        batch = int(inp.shape[-1])
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        inp = math.sqrt(2 / self.nsamples) * inp.to(self.H.dtype).to(self.H.device)
        self.H += inp.bmm(inp.transpose(2, 1))


def plan_passes(layers: Mapping[str, nn.Module], budget: int = HESSIAN_BUDGET_BYTES) -> list[list[str]]:
    """Split layers (in order) into passes whose Hessians fit ``budget`` bytes together."""
    passes: list[list[str]] = [[]]
    used = 0
    for name, layer in layers.items():
        size = hessian_bytes(layer)
        if passes[-1] and used + size > budget:
            passes.append([])
            used = 0
        passes[-1].append(name)
        used += size
    return [p for p in passes if p]


def collect_hessians(module: nn.Module, layers: Mapping[str, nn.Module], batches: Callable[[], Iterable[Any]],
                     names: Sequence[str], device: Any) -> dict[str, torch.Tensor]:
    """``H`` of each layer in ``names`` (modules of ``module``, in ``layers``) from one float
    forward of ``module`` over ``batches()``, stopping after the last hooked layer's input."""
    import torch

    acc = {n: _Accumulator(layers[n], device) for n in names}
    remaining = set(names)

    class _Done(Exception):
        pass

    seen: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            acc[name].add(inputs[0].detach())
            seen.add(name)
            if seen >= remaining:
                raise _Done
        return fn

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x in batches():
                seen.clear()
                try:
                    module(x)
                except _Done:
                    pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if acc[n].nsamples == 0]
    if missing:
        raise RuntimeError(f"layers never ran in the forward pass: {', '.join(missing[:5])}")
    return {n: a.H for n, a in acc.items()}


# --------------------------------------------------------------------------------------
# Rounding with fixed scales
# --------------------------------------------------------------------------------------
def _quantize(w: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The integers of ``w`` at scale ``s``, as Brevitas' IntQuant computes them."""
    import torch

    return torch.clamp(torch.round(w / s + 0.0), lo, hi)


def _flat(weight: torch.Tensor, scale: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight as ``(groups, rows/groups, columns)`` float32 and the scale broadcast to ``(groups, rows/groups)``."""
    rows = weight.shape[0]
    w = weight.detach().flatten(1).float().clone().view(groups, rows // groups, -1)
    s = scale.detach().float().reshape(-1)
    s = (s.expand(rows) if s.numel() == 1 else s).reshape(groups, rows // groups)
    return w, s.to(w.device)


def nearest_integers(weight: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Round-to-nearest integers of ``weight`` (shape kept) at ``scale`` (per output channel or scalar)."""
    w, s = _flat(weight, scale, 1)
    return _quantize(w[0], s[0].unsqueeze(1), lo, hi).reshape(weight.shape)


@dataclass
class Prepared:
    """What GPTQ/GPFQ derive from ``H`` alone (shared by every bit width of a layer):
    dead columns, the act-order permutation per group, the permuted ``H`` and, for GPTQ,
    the upper Cholesky factor of its dampened inverse (``None`` if it does not exist)."""

    dead: torch.Tensor  # (groups, columns) bool
    perm: torch.Tensor  # (groups, columns) long
    H: torch.Tensor  # (groups, columns, columns), permuted
    h_inv: torch.Tensor | None = None


def prepare(H: torch.Tensor, *, act_order: bool = True, inverse: bool = True, percdamp: float = GPTQ_DAMP,
            c: float = 1e4) -> Prepared:
    """Brevitas' order of operations: dead columns (zero diagonal) get 1 on the diagonal, the
    columns are sorted by decreasing diagonal (act order), then (``inverse``) the diagonal is
    dampened by ``percdamp`` of its mean, and ``h_inv`` is the upper Cholesky factor of the
    inverse (stabilized by ``c``)."""
    import torch

    H = H.float().clone()
    groups, columns = int(H.shape[0]), int(H.shape[-1])
    idx = torch.arange(columns, device=H.device)
    dead = torch.diagonal(H, dim1=1, dim2=2) == 0  # (groups, columns)
    if bool(dead.any()):
        g_idx, c_idx = dead.nonzero(as_tuple=True)
        H[g_idx, c_idx, c_idx] = 1
    if act_order:
        perm = torch.argsort(torch.diagonal(H, dim1=1, dim2=2), dim=-1, descending=True)
        H = torch.gather(torch.gather(H, 1, perm.unsqueeze(2).expand_as(H)), 2, perm.unsqueeze(1).expand_as(H))
    else:
        perm = idx.expand(groups, columns).clone()
    prepared = Prepared(dead=dead, perm=perm, H=H)
    if not inverse:
        return prepared
    h_inv = H.clone()
    try:
        damp = percdamp * torch.diagonal(h_inv, dim1=1, dim2=2).mean(-1)  # (groups,)
        h_inv[:, idx, idx] += damp.unsqueeze(1)
        h_inv = torch.linalg.cholesky(h_inv)
        h_inv = torch.cholesky_inverse(h_inv)
        h_inv = torch.linalg.cholesky(h_inv * c, upper=True) / math.sqrt(c)
    except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
        return prepared
    prepared.h_inv = h_inv
    return prepared


def _permuted(weight: torch.Tensor, scale: torch.Tensor, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight as ``(groups, rows/groups, columns)`` with dead columns zeroed and the columns
    in processing order, and the scale as ``(groups, rows/groups, 1)``."""
    import torch

    groups = int(prep.perm.shape[0])
    w, s = _flat(weight, scale, groups)
    w = w.to(prep.perm.device)
    w[prep.dead.unsqueeze(1).expand_as(w)] = 0
    wp = torch.gather(w, 2, prep.perm.unsqueeze(1).expand_as(w)).contiguous()
    return wp, s.to(w.device).unsqueeze(2)


def _unpermuted(ints_p: torch.Tensor, prep: Prepared, shape: Any) -> torch.Tensor:
    import torch

    ints = torch.empty_like(ints_p)
    ints.scatter_(2, prep.perm.unsqueeze(1).expand_as(ints_p), ints_p)
    return ints.reshape(shape)


def gptq_integers(weight: torch.Tensor, H: torch.Tensor | Prepared, scale: torch.Tensor, lo: int, hi: int, *,
                  num_blocks: int = GPTQ_BLOCKS) -> torch.Tensor:
    """GPTQ integers of ``weight`` (shape kept) for input moment ``H`` ``(groups, columns,
    columns)`` (or its :func:`prepare`), with the scales fixed: Brevitas'
    ``GPTQ.single_layer_update`` step for step (same dampening, act order, Cholesky of the
    inverse, lazy block updates), with the columns permuted once instead of indexed per step
    and the groups of a grouped convolution processed together. Every float operation on a
    weight element is the one Brevitas performs, so the integers are the same (for grouped
    convolutions with more than ``num_blocks`` columns the per-block update sums in a batched
    product, which may round differently in the last bit).

    If ``H`` cannot be inverted (Brevitas warns and skips GPTQ then), round-to-nearest.
    """
    import torch

    prep = H if isinstance(H, Prepared) else prepare(H)
    if prep.h_inv is None:
        return nearest_integers(weight, scale, lo, hi)
    h_inv = prep.h_inv
    groups, columns = int(h_inv.shape[0]), int(h_inv.shape[-1])
    wp, sg = _permuted(weight, scale, prep)
    ints_p = torch.empty_like(wp)
    blocksize = math.ceil(columns / num_blocks)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        error_block = torch.zeros((groups, wp.shape[1], count), dtype=torch.float32, device=wp.device)
        h_inv_block = h_inv[:, i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            wc = wp[:, :, col:col + 1]  # (groups, rows, 1)
            qi = _quantize(wc, sg, lo, hi)
            ints_p[:, :, col:col + 1] = qi
            q = (qi - 0.0) * sg
            d = h_inv_block[:, i, i].reshape(groups, 1, 1)
            error = (wc - q) / d
            error_block[:, :, i:i + 1] = error
            if groups == 1:  # Brevitas' 2-D products, literally
                wp[0, :, col:i2] -= error[0].matmul(h_inv_block[0, i, i:].unsqueeze(0))
            else:
                wp[:, :, col:i2] -= error * h_inv_block[:, i, i:].unsqueeze(1)
        if i2 < columns:
            if groups == 1:
                wp[0, :, i2:] -= error_block[0].matmul(h_inv[0, i1:i2, i2:])
            else:
                wp[:, :, i2:] -= error_block.bmm(h_inv[:, i1:i2, i2:])
    return _unpermuted(ints_p, prep, weight.shape)


def gpfq_integers(weight: torch.Tensor, H: torch.Tensor | Prepared, scale: torch.Tensor, lo: int, hi: int
                  ) -> torch.Tensor:
    """GPFQ integers with float inputs on both sides, from ``H`` alone: column by column
    (act order), ``q_t = Q(w_t + sum_{j<t} H_tj (w_j - q_j) / H_tt)`` (the running error
    ``U = sum_j (w_j - q_j) X_j`` of GPFQ projected on ``X_t``)."""
    import torch

    prep = H if isinstance(H, Prepared) else prepare(H, inverse=False)
    Hp = prep.H
    columns = int(Hp.shape[-1])
    wp, sg = _permuted(weight, scale, prep)
    err = torch.zeros_like(wp)
    ints_p = torch.empty_like(wp)
    diag = torch.diagonal(Hp, dim1=1, dim2=2)  # (groups, columns)
    for t in range(columns):
        target = wp[:, :, t:t + 1]
        if t:
            target = target + err[:, :, :t].bmm(Hp[:, :t, t:t + 1]) / diag[:, t].reshape(-1, 1, 1)
        qi = _quantize(target, sg, lo, hi)
        ints_p[:, :, t:t + 1] = qi
        err[:, :, t:t + 1] = wp[:, :, t:t + 1] - qi * sg
    return _unpermuted(ints_p, prep, weight.shape)


def round_weights(method: str, weight: torch.Tensor, H: torch.Tensor | Prepared | None, scale: torch.Tensor,
                  lo: int, hi: int) -> torch.Tensor:
    """The integers of ``weight`` by ``method`` (one of :data:`METHODS`)."""
    if method == "nearest":
        return nearest_integers(weight, scale, lo, hi)
    if H is None:
        raise ValueError(f"weight rounding '{method}' needs the layer's input moment H")
    if method == "gptq":
        return gptq_integers(weight, H, scale, lo, hi)
    if method == "gpfq":
        return gpfq_integers(weight, H, scale, lo, hi)
    raise ValueError(f"unknown weight rounding method '{method}'; choose one of {', '.join(METHODS)}")


def output_error(weight: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` summed over groups: the layer's output squared error (times 2/n)."""
    groups = int(H.shape[0])
    dw = (deq.float() - weight.float()).flatten(1).view(groups, weight.shape[0] // groups, -1)
    return float((dw.bmm(H.float()) * dw).sum())


