"""The ModelOpt (torch) backend's cached output-aware weights (``weight_rounding``).

ModelOpt sets each weight quantizer's per-channel ``amax`` (its ``max`` or ``mse`` weight
calibration, from the float weights alone) and rounds to nearest. With ``weight_rounding:
gptq`` (default) or ``gpfq`` the integers are instead rounded once per float model,
calibration set and weight calibration by :func:`quantizers.weight_store.build_store`, with
that ``amax`` kept fixed; a build loads ``integers * amax / max_bound`` as the layer's weight
and sets the quantizer's ``amax``, so ModelOpt's fake quantization
(``round(w * max_bound / amax)``) and the backend's ONNX rewrite give back exactly those
integers. (``modelopt-onnx`` computes its integers inside ModelOpt's ONNX PTQ and takes no
given weights: it keeps ModelOpt's rounding, as its capabilities say.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mpq.assignment import Assignment
from quantizers.weight_store import RoundedWeights, ScaleFn, WeightStore

if TYPE_CHECKING:
    from torch import nn

    from mpq.model import LoadedModel
    from quantizers.modelopt_options import ModelOptOptions


def modelopt_scale(amax: Any, bits: int) -> tuple[Any, dict[str, Any], int, int]:
    """The step (``amax / (2^(bits-1) - 1)``, per output channel), quantizer state (``amax``)
    and integer range ([-8, 7] at 4 bits: ModelOpt's weight quantizers are not narrow-range)
    that ModelOpt's fake quantization uses for a weight with ``amax``. Channels whose amax is
    below ModelOpt's zero threshold get a unit step (ModelOpt quantizes them to 0; so does the
    rounding, since their weights are 0 too)."""
    import torch

    max_bound = 2.0 ** (bits - 1) - 1.0
    amax = amax.float()
    step = amax / max_bound
    step = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(step), step)
    return step, {"amax": amax.clone()}, -int(max_bound) - 1, int(max_bound)


class ModelOptWeights(RoundedWeights):
    """Cached rounded weights with ModelOpt's per-channel ``amax`` (``weight_amax(model, bits,
    options)``: the backend's weight calibration of every quantizable layer)."""

    def __init__(self, options: ModelOptOptions, weight_amax: Callable[..., dict[str, Any]], **kwargs: Any) -> None:
        super().__init__("modelopt", str(options.weight_rounding), **kwargs)
        self.options = options
        self.weight_amax = weight_amax

    def scale_options(self) -> dict[str, Any]:
        """The option that decides ModelOpt's weight ranges."""
        return {"weight_calibration": self.options.weight_calibration}

    def scale_fn(self, model: LoadedModel) -> ScaleFn:
        """ModelOpt's step of each layer (its ``amax`` per width, computed once here)."""
        amax = {bits: self.weight_amax(model, bits, self.options) for bits in self.widths}
        return lambda name, layer, bits: modelopt_scale(amax[bits][name], bits)

    def load(self, work: nn.Module, assignment: Assignment, store: WeightStore) -> None:
        """Give every weight-quantized layer of ``work`` (after ``mtq.quantize``) its cached
        integers: the weight becomes ``integers * step`` and the quantizer's ``amax`` the cached one."""
        import torch

        for name, precision in assignment.items():
            if not precision.quantizes_weights:
                continue
            rw = self.layer(store, name, precision.w_bits)
            layer: Any = work.get_submodule(name)
            device = layer.weight.device
            with torch.no_grad():
                layer.weight.copy_(rw.dequantized().to(device=device, dtype=layer.weight.dtype))
            layer.weight_quantizer.amax = rw.state["amax"].to(device)
