"""Rounded weights computed once per model and calibration set, kept in memory and on disk.

A backend with a ``weight_rounding`` option (``gptq``/``gpfq``) calls :func:`build_store` once
per (float model, calibration images, weight options): one float pass collects every layer's
input moment ``H`` (:mod:`quantizers.rounding`), then each layer is rounded at every weight
width with the backend's own scales, under a rich progress bar. The result, a
:class:`WeightStore` (integers, scale and the backend quantizer's state per layer and width),
is what every ``materialize`` and every sweep probe then loads.

:class:`WeightCache` keeps the current store in memory and every store on disk as
``<cache_dir>/<backend>-<digest>.pt`` (``torch.save``, loaded with ``weights_only``) with a
``.json`` sidecar saying what it is, what it cost and the file's sha256. The digest is
:func:`mpq.keys.weights_digest` of :func:`mpq.keys.weights_key` (model tensors, layer table,
calibration images and their file digests, method, options) and :data:`FORMAT_VERSION`, so
any change to those computes a new store; a file whose bytes no longer match the sidecar's
sha256 (truncated, damaged) is recomputed with a one-line warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.errors import UserError
from mpq.files import file_digest
from mpq.keys import weights_digest, weights_key

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mpq.data import CalibrationSet
    from mpq.model import LoadedModel

#: Bumped whenever the algorithms or the file layout change (invalidates every cache file).
FORMAT_VERSION = 2

#: ``scale_of(name, layer, bits) -> (scale, quantizer state, lowest integer, highest integer)``
ScaleFn = Callable[[str, Any, int], "tuple[torch.Tensor, dict[str, torch.Tensor], int, int]"]


def store_key(parts: dict[str, Any]) -> str:
    """The digest naming the store described by ``parts`` (a :func:`mpq.keys.weights_key`)."""
    return weights_digest(parts, FORMAT_VERSION)


@dataclass
class RoundedWeight:
    """One layer's weights at one bit width: integers, scale (broadcastable to the weight), and
    the backend quantizer's state that reproduces that scale (``state_dict`` of its weight quantizer)."""

    ints: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # float32
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantized(self) -> torch.Tensor:
        """``integers * scale``: the float weight the quantizer maps back to exactly these integers."""
        return self.ints.float() * self.scale


class DamagedStore(Exception):
    """A cache file that exists but cannot be used as it is (truncated, edited, unreadable)."""


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
        """The weights of layer ``name`` at ``bits``, ``None`` when not stored."""
        return self.weights.get(name, {}).get(int(bits))

    @staticmethod
    def path(cache_dir: Path, prefix: str, key: str) -> Path:
        """The cache file of ``key`` for backend ``prefix``."""
        return Path(cache_dir) / f"{prefix}-{key}.pt"

    def save(self, path: Path) -> None:
        """Write atomically: ``path`` (tensors) then ``<path>.json`` (what it is, with the file's sha256)."""
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
        meta = {"key": self.key, "format": FORMAT_VERSION, "sha256": file_digest(path, 64), "parts": self.parts,
                "seconds": round(self.seconds, 3), "layers": len(self.weights), "stats": self.stats,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        side = sidecar(path)
        tmp_side = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp_side.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(tmp_side, side)

    @classmethod
    def load(cls, path: Path, key: str, device: Any = "cpu") -> WeightStore | None:
        """The store saved at ``path``; ``None`` if there is none. Raises :class:`DamagedStore`
        when the file is there but its sidecar is missing, its bytes do not match the sidecar's
        sha256, or it does not hold ``key``."""
        import torch

        path = Path(path)
        if not path.is_file():
            return None
        try:
            meta = json.loads(sidecar(path).read_text())
        except (OSError, ValueError) as exc:
            raise DamagedStore(f"its sidecar {sidecar(path).name} is missing or unreadable ({exc})") from None
        if meta.get("sha256") != file_digest(path, 64):
            raise DamagedStore("its sha256 does not match the sidecar (truncated or modified)")
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
            weights = {n: {int(b): RoundedWeight(e["ints"], e["scale"], dict(e["state"])) for b, e in per.items()}
                       for n, per in payload["layers"].items()}
        except Exception as exc:  # noqa: BLE001 - any unreadable content is a damaged cache file
            raise DamagedStore(f"it cannot be read ({type(exc).__name__})") from None
        if payload.get("key") != key or payload.get("format") != FORMAT_VERSION:
            raise DamagedStore("it holds another key or format than its name says")
        return cls(key=key, parts=dict(meta.get("parts", {})), weights=weights,
                   seconds=float(meta.get("seconds", 0.0)), source="disk", stats=dict(meta.get("stats", {})))

    def info(self) -> dict[str, Any]:
        """What trials record about the weights they used."""
        return {"key": self.key, "method": self.parts.get("method"), "source": self.source,
                "one_time_seconds": round(self.seconds, 3), "layers": len(self.weights)}


def sidecar(path: Path) -> Path:
    """The JSON file beside a store's ``.pt`` file."""
    return path.with_name(path.name + ".json")


def warn(message: str, console: Any = None) -> None:
    """One warning line on ``console`` (a rich console) or stderr."""
    if console is not None:
        console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True, highlight=False)
    else:
        print(f"warning: {message}", file=sys.stderr)


class WeightCache:
    """A backend's weight stores: the current one in memory (per float module object and
    key), every one on disk in ``cache_dir`` (if given) as ``<prefix>-<key>.pt``."""

    def __init__(self, cache_dir: Path | str | None, prefix: str, device: Any = "cpu", console: Any = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.prefix = prefix
        self.device = device
        self.console = console
        self._current: tuple[Any, WeightStore] | None = None

    def get(self, module: nn.Module, parts: dict[str, Any], compute: Callable[[str], WeightStore]
            ) -> tuple[WeightStore, str]:
        """The store for ``parts`` and where it came from: ``memory``, ``disk``, or ``computed``
        by ``compute(key)`` (then saved to the cache folder). A damaged cache file is
        recomputed and replaced, with a one-line warning."""
        key = store_key(parts)
        if self._current is not None and self._current[0]() is module and self._current[1].key == key:
            return self._current[1], "memory"
        path = WeightStore.path(self.cache_dir, self.prefix, key) if self.cache_dir is not None else None
        store = None
        if path is not None:
            try:
                store = WeightStore.load(path, key)
            except DamagedStore as exc:
                warn(f"weights cache {path} is damaged: {exc}; recomputing it", self.console)
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


class RoundedWeights:
    """A backend's cached rounded weights (subclassed per backend: :meth:`scale_options` and
    :meth:`scale_fn` say how that backend sets its weight scales).

    Args:
        backend: the backend's name (prefix of the cache files).
        method: ``gptq``, ``gpfq`` or ``nearest`` (the backend's ``weight_rounding``).
        device: torch device for the one-time float pass and rounding.
        cache_dir: where stores are saved and looked up; ``None``: memory only.
        progress: show the one-time progress bar.
        console: the rich console for it and for the damaged-file warning.
        error: the backend's :class:`~mpq.errors.UserError` subclass.
    """

    #: The weight widths whose integers are computed once and cached.
    widths: tuple[int, ...] = (4, 8)

    def __init__(self, backend: str, method: str, *, device: Any = "cpu", cache_dir: Path | str | None = None,
                 progress: bool = False, console: Any = None, error: type[UserError] = UserError) -> None:
        self.backend = backend
        self.method = method
        self.device = device
        self.progress = progress
        self.console = console
        self.error = error
        self.cache = WeightCache(cache_dir, backend, console=console)

    @property
    def enabled(self) -> bool:
        """Whether builds load cached weights (``nearest`` keeps the backend's own rounding)."""
        return self.method != "nearest"

    def scale_options(self) -> dict[str, Any]:
        """The backend options that decide the weight scales (part of the key)."""
        raise NotImplementedError

    def scale_fn(self, model: LoadedModel) -> ScaleFn:
        """``scale_of(name, layer, bits)`` for ``model``'s layers, as the backend sets them."""
        raise NotImplementedError

    def key(self, model: LoadedModel, calib: CalibrationSet) -> dict[str, Any]:
        """What decides the stored weights (:func:`mpq.keys.weights_key`)."""
        from quantizers.rounding import GPTQ_BLOCKS, GPTQ_DAMP

        return weights_key(backend=self.backend, module=model.module, imgsz=model.imgsz, layers=model.layers,
                           calibration_images=calib.images, calibration_paths=list(calib.paths),
                           batch_size=calib.batch_size, widths=self.widths, method=self.method,
                           settings={"act_order": True, "damp": GPTQ_DAMP, "blocks": GPTQ_BLOCKS},
                           scales=self.scale_options())

    def get(self, model: LoadedModel, calib: CalibrationSet) -> tuple[WeightStore, str]:
        """Every quantizable layer's integers and scales at :attr:`widths` (memory, else the
        cache folder, else computed once and saved); the store and where it came from."""
        parts = self.key(model, calib)

        def compute(key: str) -> WeightStore:
            if len(calib) == 0:
                raise self.error(f"weight_rounding '{self.method}' needs calibration images, but the "
                                 "calibration set is empty")
            return build_store(model.module, [lay.name for lay in model.quantizable_layers], list(calib.batches()),
                               parts, key, self.widths, self.scale_fn(model), device=self.device,
                               progress=self.progress, console=self.console)

        return self.cache.get(model.module, parts, compute)

    def for_assignment(self, model: LoadedModel, calib: CalibrationSet, needed: bool
                       ) -> tuple[WeightStore | None, dict[str, Any], float]:
        """The store a build uses (``None`` when disabled or nothing is weight-quantized), what
        the build records about it (``info['weights']``) and the seconds it took to get it."""
        info: dict[str, Any] = {"rounding": self.method}
        if not (self.enabled and needed):
            return None, info, 0.0
        t = time.perf_counter()
        store, how = self.get(model, calib)
        info.update(store.info(), served_from=how)
        return store, info, time.perf_counter() - t

    def layer(self, store: WeightStore, name: str, bits: int) -> RoundedWeight:
        """The stored weights of ``name`` at ``bits`` (an error naming the layer if missing)."""
        rw = store.get(name, bits)
        if rw is None:
            raise self.error(f"layer '{name}': no cached {bits}-bit weights (weight store {store.key})")
        return rw


# --------------------------------------------------------------------------------------
# Building a store
# --------------------------------------------------------------------------------------
def build_store(module: nn.Module, names: Sequence[str], batches: Sequence[Any], parts: dict[str, Any], key: str,
                widths: Sequence[int], scale_of: ScaleFn, *, device: Any = "cpu", progress: bool = False,
                console: Any = None) -> WeightStore:
    """Round every layer in ``names`` (modules of the float ``module``) at every width of
    ``widths`` by ``parts['method']``, with the scales ``scale_of(name, layer, bits)`` gives
    and each layer's ``H`` from float forwards over ``batches`` (numpy arrays), in as few
    passes as :data:`quantizers.rounding.HESSIAN_BUDGET_BYTES` allows; a rich progress bar
    when ``progress`` (on ``console``)."""
    import copy

    import torch

    from quantizers.rounding import collect_hessians, plan_passes

    method = str(parts["method"])
    start, cpu = time.perf_counter(), time.process_time()
    float_module = copy.deepcopy(module).to(device).eval()
    mods = {n: float_module.get_submodule(n) for n in names}
    passes = plan_passes(mods) if method != "nearest" else [list(names)]
    tensors = [torch.from_numpy(b).to(device) for b in batches]
    store = WeightStore(key=key, parts=dict(parts))
    times = {"hessian": 0.0, "scales": 0.0, "rounding": 0.0}
    with progress_bar(progress, console) as bar:
        label = "/".join(f"W{b}" for b in widths)
        task = bar.add_task(f"one-time {method.upper()} weights ({len(names)} layers x {label})",
                            total=len(names) * len(widths))
        for chunk in passes:
            t = time.perf_counter()
            hessians = (collect_hessians(float_module, mods, lambda: tensors, chunk, device)
                        if method != "nearest" else {})
            times["hessian"] += time.perf_counter() - t
            for n in chunk:
                store.weights[n] = _round_layer(method, n, mods[n], hessians.pop(n, None), widths, scale_of, times,
                                                lambda: bar.advance(task))
    store.seconds = time.perf_counter() - start
    store.stats = {"hessian_passes": len(passes), "hessian_seconds": round(times["hessian"], 3),
                   "scale_seconds": round(times["scales"], 3),
                   "rounding_seconds": round(times["rounding"] - times["scales"], 3),
                   "cpu_seconds": round(time.process_time() - cpu, 3), "calibration_batches": len(tensors),
                   "calibration_images": int(sum(len(b) for b in batches)), "device": str(device)}
    return store


def _round_layer(method: str, name: str, layer: Any, H: Any, widths: Sequence[int], scale_of: ScaleFn,
                 times: dict[str, float], advance: Callable[[], Any]) -> dict[int, RoundedWeight]:
    """One layer at every width (the ``H`` preparation is shared by the widths)."""
    import torch

    from quantizers.rounding import prepare, round_weights

    t = time.perf_counter()
    prep = prepare(H, inverse=method == "gptq") if H is not None else None
    per: dict[int, RoundedWeight] = {}
    for bits in widths:
        t_s = time.perf_counter()
        scale, state, lo, hi = scale_of(name, layer, bits)
        times["scales"] += time.perf_counter() - t_s
        with torch.no_grad():
            ints = round_weights(method, layer.weight, prep, scale, lo, hi)
        per[int(bits)] = RoundedWeight(ints.to(torch.int8).cpu(), scale.float().cpu(),
                                       {k: v.cpu() for k, v in state.items()})
        advance()
    times["rounding"] += time.perf_counter() - t
    return per


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
