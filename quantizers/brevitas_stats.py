"""Input statistics of the Brevitas backend, computed once per float model and calibration set.

The sweep materializes hundreds of single-layer assignments, so the data-dependent parts
that do not depend on the assignment are computed once and reused: every layer's calibrated
input quantizer and the mean of its (float and input-quantized) unfolded input. A layer's
output mean is linear in the mean of its unfolded input, so its bias correction is
``W_f . E[unfold(x)] - W_q . E[unfold(Q(x))]`` (:func:`output_mean`), exactly what Brevitas
measures by running the model.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mpq.data import CalibrationSet
    from mpq.model import LoadedModel


# --------------------------------------------------------------------------------------
def unfolded_input_mean(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """Mean over batch and output positions of the input patch each output sees.

    For a Conv2d: ``(C_in, kh, kw)``, entry ``[c, i, j]`` = mean of the zero-padded input
    at channel ``c``, offset ``(i, j)`` over every output position; the mean output of
    the layer is then ``sum(W[o] * M[group(o)]) + b[o]``. For a Linear: the mean input
    vector.
    """
    import torch.nn.functional as F
    from torch import nn

    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]).mean(dim=0)
    assert isinstance(layer, nn.Conv2d) and isinstance(layer.padding, tuple)
    ph, pw = (int(p) for p in layer.padding)
    sh, sw = layer.stride
    dh, dw = layer.dilation
    kh, kw = layer.kernel_size
    xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    H, W = xp.shape[-2:]
    ho = (H - dh * (kh - 1) - 1) // sh + 1
    wo = (W - dw * (kw - 1) - 1) // sw + 1
    out = x.new_empty((x.shape[1], kh, kw))
    for i in range(kh):
        for j in range(kw):
            sl = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            out[:, i, j] = sl.mean(dim=(0, 2, 3))
    return out


def output_mean(layer: Any, weight: torch.Tensor, mean_in: torch.Tensor) -> torch.Tensor:
    """Mean output per channel (bias excluded) of ``layer`` with ``weight`` given the mean
    unfolded input from :func:`unfolded_input_mean`."""
    import torch
    from torch import nn

    if isinstance(layer, nn.Linear):
        return weight @ mean_in
    g = layer.groups
    o = weight.shape[0]
    w = weight.reshape(g, o // g, weight.shape[1], -1)
    m = mean_in.reshape(g, weight.shape[1], -1)
    return torch.einsum("gock,gck->go", w, m).reshape(o)


def _supports_analytic(layer: nn.Module) -> bool:
    from torch import nn

    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple))


@dataclass
class LayerStats:
    """One layer's cached input statistics."""

    float_mean: torch.Tensor | None = None
    quant_mean: torch.Tensor | None = None
    input_quant_state: dict[str, Any] | None = None


@dataclass
class StatsCache:
    """Per-layer input statistics for one (float model, calibration set, options)."""

    module_ref: Any
    calib_key: str
    act_key: str
    layers: dict[str, LayerStats] = field(default_factory=dict)
    has_float_means: bool = False
    has_act: bool = False
    has_quant_means: bool = False
    probes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def matches(self, module: nn.Module, calib_key: str, act_key: str) -> bool:
        """Whether this cache was made for ``module``, this calibration set and these options."""
        return self.module_ref() is module and self.calib_key == calib_key and self.act_key == act_key




class InputStatistics:
    """Every quantizable layer's input statistics for one float model and calibration set, cached.

    Args:
        act_quant: makes the per-tensor input quantizer (a Brevitas injector) to calibrate.
        act_key: identifies the activation options; a change recomputes the statistics.
        device: torch device of the passes.
    """

    def __init__(self, *, act_quant: Callable[[], Any], act_key: str, device: str) -> None:
        self.act_quant = act_quant
        self.act_key = act_key
        self.device = device
        self._cache: StatsCache | None = None

    def get(self, model: LoadedModel, calib: CalibrationSet, *, act: bool, means: bool, quant_means: bool,
            progress: bool = False) -> tuple[StatsCache, bool]:
        """The statistics for ``model`` and ``calib``, computing what is missing; (cache, all were cached)."""
        from mpq.keys import calibration_key

        key = calibration_key(calib.images, calib.paths, calib.batch_size)
        cache = self._cache
        if cache is None or not cache.matches(model.module, key, self.act_key):
            cache = StatsCache(module_ref=weakref.ref(model.module), calib_key=key, act_key=self.act_key)
            self._cache = cache
        need_means = means and not cache.has_float_means
        need_act = act and not cache.has_act
        need_qmeans = quant_means and not cache.has_quant_means
        if not (need_means or need_act or need_qmeans):
            return cache, True
        start = time.perf_counter()
        float_module = copy.deepcopy(model.module).to(self.device).eval()
        names = [lay.name for lay in model.quantizable_layers]
        for n in names:
            cache.layers.setdefault(n, LayerStats())
        mods = {n: float_module.get_submodule(n) for n in names}
        if need_means or need_act:
            self._float_pass(float_module, mods, cache, calib, means=need_means, act=need_act, progress=progress)
        if need_qmeans:
            self._quantized_input_pass(float_module, mods, cache, calib, progress=progress)
        cache.seconds += time.perf_counter() - start
        return cache, False

    def _batches(self, calib: CalibrationSet, description: str, progress: bool) -> Iterator[torch.Tensor]:
        import torch

        batches: Iterable[Any] = list(calib.batches())
        if progress:
            from rich.progress import track

            batches = track(batches, description=description, transient=True)
        for b in batches:
            yield torch.from_numpy(b).to(self.device)

    def _float_pass(self, float_module: nn.Module, mods: dict[str, nn.Module], cache: StatsCache,
                    calib: CalibrationSet, *, means: bool, act: bool, progress: bool) -> None:
        """Average each layer's unfolded input and calibrate one input quantizer per layer
        (Brevitas ``calibration_mode``), in one float pass with hooks on every quantizable layer."""
        import brevitas.nn as qnn
        import torch
        from brevitas.graph.calibrate import calibration_mode
        from torch import nn

        probes: dict[str, Any] = cache.probes
        if act:
            iq = self.act_quant()
            probes.update({n: qnn.QuantIdentity(act_quant=iq, return_quant_tensor=False).to(self.device)
                           for n in mods})
        sums: dict[str, torch.Tensor] = {}
        count = 0

        def hook_for(name: str):  # noqa: ANN202
            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0]
                if means and _supports_analytic(mod):
                    m = unfolded_input_mean(mod, x)
                    sums[name] = sums[name] + m if name in sums else m
                if act:
                    probes[name](x)
            return hook

        hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in mods.items()]
        container = nn.ModuleDict({n.replace(".", "__"): m for n, m in probes.items()})
        try:
            with torch.no_grad(), calibration_mode(container) if act else contextlib.nullcontext():
                for x in self._batches(calib, "calibration: float statistics", progress):
                    float_module(x)
                    count += 1
        finally:
            for h in hooks:
                h.remove()
        if means:
            for n in mods:
                if n in sums:
                    cache.layers[n].float_mean = sums[n] / count
            cache.has_float_means = True
        if act:
            for n in mods:
                probes[n].eval()
                cache.layers[n].input_quant_state = {k: v.detach().clone()
                                                     for k, v in probes[n].act_quant.state_dict().items()}
            cache.has_act = True

    def _quantized_input_pass(self, float_module: nn.Module, mods: dict[str, nn.Module], cache: StatsCache,
                              calib: CalibrationSet, *, progress: bool) -> None:
        """Average each layer's unfolded input after its calibrated input quantizer (bias correction of A8)."""
        import torch

        probes = cache.probes
        qsums: dict[str, torch.Tensor] = {}
        count = 0

        def hook_for(name: str):  # noqa: ANN202
            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                if _supports_analytic(mod):
                    m = unfolded_input_mean(mod, probes[name](inputs[0]))
                    qsums[name] = qsums[name] + m if name in qsums else m
            return hook

        hooks = [m.register_forward_pre_hook(hook_for(n)) for n, m in mods.items()]
        try:
            with torch.no_grad():
                for x in self._batches(calib, "calibration: quantized-input statistics", progress):
                    float_module(x)
                    count += 1
        finally:
            for h in hooks:
                h.remove()
        for n in mods:
            if n in qsums:
                cache.layers[n].quant_mean = qsums[n] / count
        cache.has_quant_means = True
