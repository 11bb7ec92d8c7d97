"""The Brevitas backend's cached output-aware weights (``weight_rounding``: gptq, gpfq, nearest).

Each layer's integers at 4 and 8 bits are rounded once per float model, calibration set and
weight options by :func:`quantizers.weight_store.build_store`, with the scale the backend's
own weight quantizer picks from the float weights (MSE search, max or percentile), and
cached; a build then loads the quantizer's scale (no search) and sets the weight to
``integers * scale``, which the quantizer maps back to exactly those integers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mpq.assignment import Precision
from quantizers.weight_store import RoundedWeight, RoundedWeights, ScaleFn

if TYPE_CHECKING:
    import torch

    from mpq.model import LoadedModel
    from quantizers.brevitas_options import BrevitasOptions


def rounding_method(options: BrevitasOptions) -> str:
    """How weights become integers: ``weight_rounding``, or ``nearest`` when sequential
    GPTQ/GPFQ (``gptq``/``gpfq``) rework the float weights in every build."""
    return "nearest" if (options.gptq or options.gpfq) else str(options.weight_rounding)


def layer_scale(layer: Any, bits: int, options: BrevitasOptions, quant_layer: Callable[..., Any]
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
    """The scale the backend gives ``layer`` at ``bits`` (``quant_layer``, the backend's layer
    builder, initializes its weight quantizer on the float weights), that quantizer's state
    and the integer range (narrow: ``[-hi, hi]``)."""
    import torch

    q: Any = quant_layer(layer, Precision(bits, 16), options)
    with torch.no_grad():
        scale = q.quant_weight().scale.detach().clone()
    state = {k: v.detach().clone() for k, v in q.weight_quant.state_dict().items()}
    hi = 2 ** (bits - 1) - 1
    return scale, state, -hi, hi


def load_rounded(q: Any, rw: RoundedWeight) -> None:
    """Give a Brevitas layer ``q`` its cached scale (marks its weight quantizer initialized)
    and the weight ``integers * scale``."""
    import torch

    weight = q.weight
    q.weight_quant.load_state_dict(rw.state)
    with torch.no_grad():
        weight.copy_(rw.dequantized().to(device=weight.device, dtype=weight.dtype))


class BrevitasWeights(RoundedWeights):
    """Cached rounded weights with the Brevitas backend's scales (``quant_layer``: the
    backend's layer builder, whose weight quantizer picks them)."""

    def __init__(self, options: BrevitasOptions, quant_layer: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__("brevitas", rounding_method(options), **kwargs)
        self.options = options
        self.quant_layer = quant_layer

    def scale_options(self) -> dict[str, Any]:
        """The options that decide the Brevitas weight scales."""
        o = self.options
        return {"weight_scale": o.weight_scale, "weight_scale_8bit": o.weight_scale_8bit,
                "weight_granularity": o.weight_granularity, "weight_percentile": o.weight_percentile}

    def scale_fn(self, model: LoadedModel) -> ScaleFn:
        """The backend's scale of each layer (from its float weights)."""
        return lambda name, layer, bits: layer_scale(layer, bits, self.options, self.quant_layer)
