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
docs/benchmarks.md ("Brevitas backend").

:class:`WeightStore` holds the result per (layer, bit width): the integers, the scale
and the backend's own quantizer state that reproduces it, and saves/loads it as one
``torch.save`` file (``weights_only`` loading) with a JSON sidecar in a cache folder, keyed
by :func:`store_key` (model digest, calibration fingerprint, the options that decide the
weights, the method and this module's format version).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

#: Bumped whenever the algorithms or the file layout change (invalidates every cache file).
FORMAT_VERSION = 1

#: GPTQ settings: Brevitas' defaults for ``gptq_mode`` as the backend calls it (act order on).
GPTQ_DAMP = 0.01
GPTQ_BLOCKS = 100

#: Rounding methods (the ``weight_rounding`` option of the backends that use this module).
METHODS = ("gptq", "gpfq", "nearest")

#: ``scale_of(name, layer, bits) -> (scale, quantizer state, lowest integer, highest integer)``
ScaleFn = Callable[[str, Any, int], "tuple[torch.Tensor, dict[str, torch.Tensor], int, int]"]

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


def build_store(module: nn.Module, names: Sequence[str], batches: Sequence[Any], parts: dict[str, Any], key: str,
                widths: Sequence[int], scale_of: ScaleFn, *, device: Any = "cpu", progress: bool = False,
                console: Any = None) -> WeightStore:
    """Round every layer in ``names`` (modules of the float ``module``) at every width of
    ``widths`` by ``parts['method']``, with the scales ``scale_of(name, layer, bits)`` gives
    (``(scale, quantizer state, lowest integer, highest integer)``) and each layer's ``H``
    from float forwards over ``batches`` (numpy arrays), as few passes as
    :data:`HESSIAN_BUDGET_BYTES` allows; a rich progress bar when ``progress`` (on ``console``)."""
    import copy

    import torch

    method = str(parts["method"])
    start = time.perf_counter()
    float_module = copy.deepcopy(module).to(device).eval()
    mods = {n: float_module.get_submodule(n) for n in names}
    passes = plan_passes(mods) if method != "nearest" else [list(names)]
    tensors = [torch.from_numpy(b).to(device) for b in batches]
    store = WeightStore(key=key, parts=dict(parts))
    t_h = t_r = t_scales = 0.0
    cpu = time.process_time()
    with progress_bar(progress, console) as bar:
        label = "/".join(f"W{b}" for b in widths)
        task = bar.add_task(f"one-time {method.upper()} weights ({len(names)} layers x {label})",
                            total=len(names) * len(widths))
        for chunk in passes:
            t = time.perf_counter()
            hessians = (collect_hessians(float_module, mods, lambda: tensors, chunk, device)
                        if method != "nearest" else {})
            t_h += time.perf_counter() - t
            t = time.perf_counter()
            for n in chunk:
                layer: Any = mods[n]
                H = hessians.pop(n, None)
                prep = prepare(H, inverse=method == "gptq") if H is not None else None  # shared by the widths
                per: dict[int, RoundedWeight] = {}
                for bits in widths:
                    t_s = time.perf_counter()
                    scale, state, lo, hi = scale_of(n, layer, bits)
                    t_scales += time.perf_counter() - t_s
                    with torch.no_grad():
                        ints = round_weights(method, layer.weight, prep, scale, lo, hi)
                    per[int(bits)] = RoundedWeight(ints.to(torch.int8).cpu(), scale.float().cpu(),
                                                   {k: v.cpu() for k, v in state.items()})
                    bar.advance(task)
                store.weights[n] = per
            t_r += time.perf_counter() - t
    store.seconds = time.perf_counter() - start
    store.stats = {"hessian_passes": len(passes), "hessian_seconds": round(t_h, 3),
                   "scale_seconds": round(t_scales, 3), "rounding_seconds": round(t_r - t_scales, 3),
                   "cpu_seconds": round(time.process_time() - cpu, 3), "calibration_batches": len(tensors),
                   "calibration_images": int(sum(len(b) for b in batches)), "device": str(device)}
    return store


@contextlib.contextmanager
def progress_bar(enabled: bool, console: Any = None) -> Iterator[Any]:
    """A rich progress bar that stays on screen (the one-time cost is worth seeing), on
    ``console`` (pass the caller's console to nest it in the caller's own live display) or a
    new stderr console."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), disable=not enabled, transient=False) as bar:
        yield bar


# --------------------------------------------------------------------------------------
# Keys and the store
# --------------------------------------------------------------------------------------
_MODEL_DIGESTS: dict[int, tuple[Any, str]] = {}


def module_digest(module: nn.Module) -> str:
    """sha256 (16 hex) of a module's parameters and buffers, names included (cached per module object)."""
    entry = _MODEL_DIGESTS.get(id(module))
    if entry is not None and entry[0]() is module:
        return entry[1]
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _MODEL_DIGESTS[id(module)] = (weakref.ref(module), digest)
    return digest


def store_key(parts: Mapping[str, Any]) -> str:
    """The cache key (16 hex) of a JSON-serializable description of what decides the weights."""
    payload = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class RoundedWeight:
    """One layer's weights at one bit width: integers, scale (broadcastable to the weight), and
    the backend quantizer's state that reproduces that scale (``state_dict`` of its weight quantizer)."""

    ints: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # float32
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantized(self) -> torch.Tensor:
        return self.ints.float() * self.scale


@dataclass
class WeightStore:
    """Rounded weights of every quantizable layer and bit width for one key."""

    key: str
    parts: dict[str, Any]
    weights: dict[str, dict[int, RoundedWeight]] = field(default_factory=dict)
    seconds: float = 0.0
    source: str = "computed"  # computed | disk
    stats: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, bits: int) -> RoundedWeight | None:
        return self.weights.get(name, {}).get(int(bits))

    # -- files ------------------------------------------------------------------------------
    @staticmethod
    def path(cache_dir: Path, prefix: str, key: str) -> Path:
        return Path(cache_dir) / f"{prefix}-{key}.pt"

    def save(self, path: Path) -> None:
        """Write atomically: ``path`` (tensors, ``torch.save``) and ``<path>.json`` (what it is)."""
        import torch

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"key": self.key, "format": FORMAT_VERSION,
                   "layers": {n: {str(b): {"ints": rw.ints.cpu(), "scale": rw.scale.cpu(),
                                           "state": {k: v.cpu() for k, v in rw.state.items()}}
                                  for b, rw in per.items()} for n, per in self.weights.items()}}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        meta = {"key": self.key, "format": FORMAT_VERSION, "parts": self.parts, "seconds": round(self.seconds, 3),
                "layers": len(self.weights), "stats": self.stats,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        side = path.with_name(path.name + ".json")
        tmp_side = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp_side.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp_side, side)

    @classmethod
    def load(cls, path: Path, key: str, device: Any = "cpu") -> WeightStore | None:
        """The store saved at ``path`` if it exists, is readable and holds ``key``; else ``None``."""
        import torch

        path = Path(path)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
            meta = json.loads(path.with_name(path.name + ".json").read_text())
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, not fatal
            return None
        if payload.get("key") != key or payload.get("format") != FORMAT_VERSION:
            return None
        weights = {n: {int(b): RoundedWeight(e["ints"], e["scale"], dict(e["state"])) for b, e in per.items()}
                   for n, per in payload["layers"].items()}
        return cls(key=key, parts=dict(meta.get("parts", {})), weights=weights,
                   seconds=float(meta.get("seconds", 0.0)), source="disk", stats=dict(meta.get("stats", {})))

    def info(self) -> dict[str, Any]:
        """What trials record about the weights they used."""
        return {"key": self.key, "method": self.parts.get("method"), "source": self.source,
                "one_time_seconds": round(self.seconds, 3), "layers": len(self.weights)}


class WeightCache:
    """A backend's weight stores: the current one in memory (per float module object and
    key), every one on disk in ``cache_dir`` (if given) as ``<prefix>-<key>.pt``."""

    def __init__(self, cache_dir: Path | str | None, prefix: str, device: Any = "cpu") -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.prefix = prefix
        self.device = device
        self._current: tuple[Any, WeightStore] | None = None

    def get(self, module: nn.Module, parts: dict[str, Any], compute: Callable[[str], WeightStore]
            ) -> tuple[WeightStore, str]:
        """The store for ``parts`` and where it came from: ``memory``, ``disk``, or ``computed``
        by ``compute(key)`` (then saved to the cache folder)."""
        key = store_key(parts)
        if self._current is not None and self._current[0]() is module and self._current[1].key == key:
            return self._current[1], "memory"
        path = WeightStore.path(self.cache_dir, self.prefix, key) if self.cache_dir is not None else None
        store = WeightStore.load(path, key) if path is not None else None
        how = "disk"
        if store is None:
            start = time.perf_counter()
            store = compute(key)
            store.seconds = time.perf_counter() - start  # everything the backend computed once
            how = "computed"
            if path is not None:
                store.save(path)
        self._current = (weakref.ref(module), store)
        return store, how

