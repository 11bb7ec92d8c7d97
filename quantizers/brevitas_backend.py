"""Brevitas backend: per-layer mixed-precision PTQ exported to QCDQ ONNX.

:meth:`BrevitasBackend.materialize` replaces each layer an
:class:`~search.assignment.Assignment` names with a Brevitas ``QuantConv2d`` (or
``QuantLinear``) carrying that layer's precision, on a copy of the fused float model:

- weights: symmetric narrow-range integers (4 bits: [-7, 7], 8 bits: [-127, 127]) with one
  scale per output channel, chosen by MSE search (default for 4 bits), a per-channel
  percentile of ``|w|``, or the maximum (default for 8 bits, near-lossless there);
- which integers (``weight_rounding``): by default GPTQ with those scales kept fixed, from
  each layer's input second moment on the calibration images *in the float model*
  (:mod:`quantizers.rounding`), so layers are independent and the integers of every layer
  at 4 and 8 bits are computed once per (float model, calibration images, weight options)
  and reused by every ``materialize`` (in memory, and on disk in ``cache_dir`` for later
  runs): a build only loads them. ``gpfq`` is the same with GPFQ's rule, ``nearest``
  rounds to nearest (the weight-MSE optimum, what this backend did before). A layer's
  cached integers equal what Brevitas' ``gptq_mode`` gives it when it is the only layer
  quantized; with many layers quantized, sequential GPTQ (``gptq: true``) would re-measure
  each layer's input after the layers before it, which the cache does not (on the demo
  model the cache loses no accuracy against it: docs/benchmarks.md);
- A8 layers: a per-tensor INT8 quantizer on the layer's *input* (Brevitas
  ``input_quant``), so each layer's A8 is independent of its neighbours; int8 with zero
  point 0 by default (the only form TensorRT accepts), uint8 with a zero point on request;
  ranges calibrated on the calibration images (percentile, MSE or max);
- bias correction (on by default): each quantized layer's mean output error on the
  calibration images, measured with float inputs as Brevitas' ``bias_correction_mode``
  does, is folded into its bias;
- sequential GPTQ or GPFQ (Brevitas' ``gptq_mode`` / ``gpfq_mode``, in every build, from
  the float weights; the cached rounding is then not used) when the options ask for them.

Layers the assignment does not name are left untouched (the same float modules).

**Per-call cost.** The sensitivity sweep materializes hundreds of single-layer
assignments, so the data-dependent parts that do not depend on the assignment are computed
once per (float model, calibration set) and cached in the backend instance: every layer's
calibrated input quantizer and the mean of its (float and input-quantized) unfolded
input. Activation calibration and bias correction then cost no forward pass: a layer's
output mean is linear in the mean of its unfolded input, so the bias correction of a
layer is ``W_f . E[unfold(x)] - W_q . E[unfold(Q(x))]``, exactly what Brevitas measures
by running the model (``tests/integration/test_brevitas_backend.py`` checks the two
agree; with the cached GPTQ weights too). Reuse one backend instance for many
``materialize`` calls to benefit from it. The rounded weights are the other per-model
cost: one float pass collecting every layer's ``H``, then GPTQ per layer and width (demo:
about half a minute of CPU, paid once; a build then loads each layer's integers and
scale instead of MSE-searching the scale, so it is cheaper than before). Sequential
GPTQ/GPFQ (``gptq``/``gpfq``) need real forward passes (one per quantized layer) in every
build and run only when enabled.

:meth:`BrevitasBackend.export` writes QCDQ ONNX through Brevitas' exporter (legacy
TorchScript exporter, ``dynamo=False``, opset 17): input ``images`` with a dynamic batch,
output ``output0`` with the float model's layout, weights as int8 initializers followed by
``Clip`` (the integer range of the bit width) and ``DequantizeLinear`` with per-channel
scales; A8 inputs as ``QuantizeLinear -> DequantizeLinear``. An optional onnxoptimizer
pass runs only if it keeps every Q/DQ/Clip node. What is in the file (node counts,
containers, options, versions, timings) is written beside it as ``<file>.json``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantizers.base import CalibrationSet, Capabilities, ExportResult, QuantizedModel, count_qdq_nodes, export_metadata
from quantizers.rounding import RoundedWeight, WeightCache, WeightStore, build_store
from search.assignment import Assignment, Precision
from search.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from search.model import LoadedModel
    from search.spec import BrevitasOptions

NAME = "brevitas"
OPSET = 17

#: What this backend builds for every Conv2d and Linear (float W16A16 is always allowed).
SUPPORTED_PRECISIONS: frozenset[Precision] = frozenset(
    Precision(w, a) for w in (4, 8, 16) for a in (8, 16) if (w, a) != (16, 16))

CAPABILITIES = Capabilities(
    backend=NAME,
    precisions={"Conv2d": SUPPORTED_PRECISIONS, "Linear": SUPPORTED_PRECISIONS},
    notes="per-channel symmetric weights (4 or 8 bits, narrow range; integers by cached float-input GPTQ by "
          "default, weight_rounding); per-tensor INT8 input quantizer for A8; W16A8 quantizes the input only. "
          "Layers marked not quantizable (the DFL conv) stay float.",
)

#: onnxoptimizer passes that only remove no-ops and dead or duplicate nodes: none of them
#: touches QuantizeLinear/DequantizeLinear/Clip (checked after the pass: node counts must not change).
ONNX_PASSES: tuple[str, ...] = (
    "eliminate_deadend",
    "eliminate_identity",
    "eliminate_nop_dropout",
    "eliminate_nop_cast",
    "eliminate_nop_pad",
    "eliminate_nop_transpose",
    "eliminate_nop_flatten",
    "eliminate_unused_initializer",
    "eliminate_duplicate_initializer",
    "fuse_consecutive_transposes",
)


class BrevitasError(UserError):
    """A model the Brevitas backend cannot quantize or export as asked."""


# --------------------------------------------------------------------------------------
# Quantizer choice
# --------------------------------------------------------------------------------------
def weight_quantizer(bits: int, options: BrevitasOptions) -> Any:
    """The Brevitas weight quantizer (an injector class) for ``bits``-bit weights.

    Symmetric, narrow range, zero point 0, float scales frozen after the first forward
    (``ParameterFromStatsFromParameterScaling``, as Brevitas' PTQ examples do, so GPTQ and
    GPFQ keep the scale chosen from the float weights).
    """
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.inject.enum import StatsOp
    from brevitas.quant.scaled_int import (
        Int8WeightPerChannelFloat,
        Int8WeightPerChannelFloatMSE,
        Int8WeightPerTensorFloat,
        Int8WeightPerTensorFloatMSE,
    )

    method = options.weight_scale if bits < 8 else options.weight_scale_8bit
    per_channel = options.weight_granularity == "per_channel"
    if method == "mse":
        quant = Int8WeightPerChannelFloatMSE if per_channel else Int8WeightPerTensorFloatMSE
        return quant.let(bit_width=bits)
    quant = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    quant = quant.let(bit_width=bits, scaling_impl=ParameterFromStatsFromParameterScaling)
    if method == "percentile":
        quant = quant.let(scaling_stats_op=StatsOp.PERCENTILE, high_percentile_q=options.weight_percentile)
    return quant


def input_quantizer(options: BrevitasOptions) -> Any:
    """The Brevitas per-tensor 8-bit quantizer for the input of an A8 layer."""
    from brevitas.core.stats import NegativeMinOrZero
    from brevitas.inject.enum import StatsOp
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8ActPerTensorFloatMSE
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat, ShiftedUint8ActPerTensorFloatMSE

    method = options.act_calibration
    p = options.act_percentile
    if options.act_quant_type == "sym":
        if method == "mse":
            return Int8ActPerTensorFloatMSE
        if method == "max":
            return Int8ActPerTensorFloat.let(scaling_stats_op=StatsOp.MAX)
        return Int8ActPerTensorFloat.let(high_percentile_q=p)
    if method == "mse":
        return ShiftedUint8ActPerTensorFloatMSE
    if method == "max":
        return ShiftedUint8ActPerTensorFloat.let(scaling_stats_op=StatsOp.MIN_MAX,
                                                 zero_point_stats_impl=NegativeMinOrZero)
    return ShiftedUint8ActPerTensorFloat.let(high_percentile_q=p, low_percentile_q=100.0 - p)


def quant_layer(layer: Any, precision: Precision, options: BrevitasOptions,
                input_quant_state: dict[str, Any] | None = None, weights: RoundedWeight | None = None) -> nn.Module:
    """A Brevitas ``QuantConv2d``/``QuantLinear`` with ``layer``'s weights at ``precision``.

    ``input_quant_state`` is the state of a calibrated input quantizer (A8 layers). The
    weight scales are initialized here, from the float weights, unless ``weights`` (cached
    integers, scale and weight-quantizer state, see :mod:`quantizers.rounding`) are given:
    then the quantizer's scale is loaded (no search) and the weight is set to
    ``integers * scale``, which the quantizer maps back to exactly those integers.
    """
    import brevitas.nn as qnn
    import torch
    from torch import nn

    wq = weight_quantizer(precision.w_bits, options) if precision.quantizes_weights else None
    iq = input_quantizer(options) if precision.quantizes_inputs else None
    weight = layer.weight
    common = dict(bias=layer.bias is not None, weight_quant=wq, input_quant=iq, bias_quant=None,
                  output_quant=None, return_quant_tensor=False, device=weight.device, dtype=weight.dtype)
    q: Any
    if isinstance(layer, nn.Conv2d):
        if not isinstance(layer.padding, tuple):
            raise BrevitasError(f"{type(layer).__name__} with padding={layer.padding!r} is not supported "
                                "(integer padding only)")
        q = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                            padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                            padding_mode=layer.padding_mode, **common)
    elif isinstance(layer, nn.Linear):
        q = qnn.QuantLinear(layer.in_features, layer.out_features, **common)
    else:
        raise BrevitasError(f"cannot quantize a {type(layer).__name__}; only Conv2d and Linear")
    with torch.no_grad():
        q.weight.copy_(weight)
        if layer.bias is not None:
            q.bias.copy_(layer.bias)
    q.weight.requires_grad_(False)
    if q.bias is not None:
        q.bias.requires_grad_(False)
    if input_quant_state is not None:
        q.input_quant.load_state_dict(input_quant_state)
    q.eval()
    if wq is not None and weights is not None:
        q.weight_quant.load_state_dict(weights.state)  # the cached scale; marks the quantizer initialized
        with torch.no_grad():
            q.weight.copy_(weights.dequantized().to(device=weight.device, dtype=weight.dtype))
    elif wq is not None:
        with torch.no_grad():
            q.quant_weight()  # initializes (MSE-searches) and freezes the weight scales
    return q


def _quiet_imports() -> None:
    """Import brevitas once without its import-time noise (no fast_hadamard_transform
    package; torch's cpp_extension note about CUDA_HOME on machines without CUDA)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fast_hadamard_transform.*")
        import brevitas.graph.calibrate  # noqa: F401
        import brevitas.graph.gpfq  # noqa: F401
        import brevitas.nn  # noqa: F401


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# --------------------------------------------------------------------------------------
# Input statistics (assignment-independent, cached per float model and calibration set)
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
class _LayerStats:
    float_mean: torch.Tensor | None = None
    quant_mean: torch.Tensor | None = None
    input_quant_state: dict[str, Any] | None = None


@dataclass
class _StatsCache:
    """Per-layer input statistics for one (float model, calibration set, options)."""

    module_ref: Any
    calib_key: str
    act_key: str
    layers: dict[str, _LayerStats] = field(default_factory=dict)
    has_float_means: bool = False
    has_act: bool = False
    has_quant_means: bool = False
    probes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def matches(self, module: nn.Module, calib_key: str, act_key: str) -> bool:
        return self.module_ref() is module and self.calib_key == calib_key and self.act_key == act_key


def calibration_key(calib: CalibrationSet) -> str:
    """A cheap fingerprint of a calibration set (shape, paths, a strided sample of pixels)."""
    import numpy as np

    h = hashlib.sha256()
    h.update(str(calib.images.shape).encode())
    h.update(str(int(calib.batch_size)).encode())
    h.update("\n".join(str(p) for p in calib.paths).encode())
    h.update(np.ascontiguousarray(calib.images[:, :, ::7, ::7]).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Output-aware rounding, once per model and calibration set
# --------------------------------------------------------------------------------------
#: The weight widths whose integers are computed once and cached.
WEIGHT_WIDTHS: tuple[int, ...] = (4, 8)


def layer_scale(layer: Any, bits: int, options: BrevitasOptions) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The scale the backend gives ``layer`` at ``bits`` (its weight quantizer initialized on the
    float weights), that quantizer's state and the largest integer (narrow range: ``[-hi, hi]``)."""
    import torch

    q: Any = quant_layer(layer, Precision(bits, 16), options)
    with torch.no_grad():
        scale = q.quant_weight().scale.detach().clone()
    state = {k: v.detach().clone() for k, v in q.weight_quant.state_dict().items()}
    return scale, state, 2 ** (bits - 1) - 1


def compute_weight_store(model: LoadedModel, calib: CalibrationSet, options: BrevitasOptions, parts: dict[str, Any],
                         key: str, *, device: str = "cpu", progress: bool = False, console: Any = None
                         ) -> WeightStore:
    """Integers and scales of every quantizable layer at :data:`WEIGHT_WIDTHS`, rounded by
    ``parts['method']`` with each layer's input moment from the float model and this
    backend's scales (:func:`layer_scale`); see :func:`quantizers.rounding.build_store`."""

    def scale_of(name: str, layer: Any, bits: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
        scale, state, hi = layer_scale(layer, bits, options)
        return scale, state, -hi, hi

    return build_store(model.module, [lay.name for lay in model.quantizable_layers], list(calib.batches()),
                       parts, key, WEIGHT_WIDTHS, scale_of, device=device, progress=progress, console=console)


# --------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------
class BrevitasBackend:
    """Brevitas PTQ backend (see the module docstring).

    Args:
        options: the study's ``backend`` section (:class:`search.spec.BrevitasOptions`);
            defaults when ``None``.
        device: torch device for calibration and the fake-quant model: ``auto`` (CUDA when
            available), ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show rich progress bars for the calibration passes, GPTQ/GPFQ and the
            one-time weight rounding.
        cache_dir: where the one-time rounded weights are saved and looked up (one
            ``brevitas-<key>.pt`` file per model, calibration set and weight options, with a
            ``.json`` beside it); ``None``: in memory only.
        console: the rich console for the one-time progress bar (the caller's, to nest it in
            the caller's live display); a new stderr console when ``None``.
    """

    name = NAME
    capabilities = CAPABILITIES

    def __init__(self, *, options: BrevitasOptions | None = None, device: str = "cpu",
                 progress: bool = False, cache_dir: Path | str | None = None, console: Any = None) -> None:
        from search.runs import resolve_device
        from search.spec import BrevitasOptions

        _quiet_imports()

        if options is None:
            options = BrevitasOptions()
        if not isinstance(options, BrevitasOptions):
            raise BrevitasError(f"the brevitas backend needs BrevitasOptions, got {type(options).__name__} "
                                f"(backend name '{getattr(options, 'name', '?')}')")
        self.options = options
        try:
            self.device = resolve_device(device)
        except RuntimeError as exc:
            raise BrevitasError(str(exc)) from None
        self.progress = progress
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.console = console
        self._cache: _StatsCache | None = None
        self._weights = WeightCache(self.cache_dir, self.name)

    # -- public API -----------------------------------------------------------------------
    def materialize(self, model: LoadedModel, assignment: Assignment, calib: CalibrationSet) -> QuantizedModel:
        """Build ``assignment`` on a copy of ``model`` (never modifying it), calibrated on ``calib``."""
        import torch

        start = time.perf_counter()
        self.capabilities.check(model.layers, assignment)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        work = model.fresh().module.to(self.device).eval()
        timings["copy"] = time.perf_counter() - t

        needs_act = any(p.quantizes_inputs for _, p in assignment.items())
        needs_means = self.options.bias_correction and len(assignment) > 0
        cache = None
        cached = True
        if needs_act or needs_means:
            t = time.perf_counter()
            cache, cached = self._stats(model, calib, act=needs_act, means=needs_means,
                                        quant_means=needs_act and needs_means)
            timings["calibrate"] = time.perf_counter() - t

        store = None
        weights_info: dict[str, Any] = {"rounding": self.rounding}
        if self.rounding != "nearest" and any(p.quantizes_weights for _, p in assignment.items()):
            t = time.perf_counter()
            store, how = self.rounded_weights(model, calib)
            timings["weights"] = time.perf_counter() - t
            weights_info.update(store.info(), served_from=how)

        t = time.perf_counter()
        layers_info: dict[str, dict[str, Any]] = {}
        for name, precision in assignment.items():
            float_layer = work.get_submodule(name)
            state = cache.layers[name].input_quant_state if (cache and precision.quantizes_inputs) else None
            given = store.get(name, precision.w_bits) if (store is not None and precision.quantizes_weights) else None
            if store is not None and precision.quantizes_weights and given is None:
                raise BrevitasError(f"layer '{name}': no cached {precision.w_bits}-bit weights "
                                    f"(weight store {store.key})")
            q = quant_layer(float_layer, precision, self.options, state, given)
            _set_submodule(work, name, q)
            layers_info[name] = {"precision": str(precision), "type": type(q).__name__}
        timings["quantize"] = time.perf_counter() - t

        if self.options.gptq or self.options.gpfq:
            algo = "gptq" if self.options.gptq else "gpfq"
            t = time.perf_counter()
            self._gpxq(work, calib, algo)
            timings[algo] = time.perf_counter() - t

        if self.options.bias_correction and len(assignment):
            t = time.perf_counter()
            assert cache is not None
            base_layers = dict(model.module.named_modules())
            with torch.no_grad():
                for name, precision in assignment.items():
                    qlayer: Any = work.get_submodule(name)
                    correction = self._correction(name, base_layers[name], qlayer, precision, cache.layers[name])
                    if qlayer.bias is None:
                        qlayer.bias = torch.nn.Parameter(correction, requires_grad=False)
                    else:
                        qlayer.bias.add_(correction)
            timings["bias_correction"] = time.perf_counter() - t
        work.eval()
        timings["total"] = time.perf_counter() - start
        info = {
            "device": self.device,
            "options": self.options.model_dump(mode="json"),
            "layers": layers_info,
            "stats_cached": cached,
            "act_quant": self.options.act_quant_type,
            "weights": weights_info,
        }
        return QuantizedModel(backend=self.name, assignment=assignment, base=model, module=work,
                              timings=timings, info=info)

    def export(self, qmodel: QuantizedModel, path: Path | str) -> ExportResult:
        """Write ``qmodel`` as QCDQ ONNX at ``path`` (atomically) and its metadata at ``<path>.json``."""
        import onnx
        import torch
        from brevitas.export import export_onnx_qcdq

        from search.runs import atomic_path, write_json

        if qmodel.module is None:
            raise BrevitasError("this QuantizedModel has no torch module to export")
        path = Path(path)
        start = time.perf_counter()
        module = qmodel.module.eval()
        device = next(module.parameters()).device
        imgsz = qmodel.base.imgsz
        dummy = torch.zeros(1, 3, imgsz, imgsz, device=device)
        dynamic_axes = {"images": {0: "batch"}, "output0": {0: "batch"}}
        optimizer_info: dict[str, Any] = {"requested": self.options.optimize_onnx}
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx_qcdq(module, args=dummy, export_path=str(tmp), dynamo=False, opset_version=OPSET,
                             keep_initializers_as_inputs=False, input_names=["images"],
                             output_names=["output0"], dynamic_axes=dynamic_axes)
            t_export = time.perf_counter() - start
            counts_raw = count_qdq_nodes(tmp)
            graph = onnx.load(str(tmp))
            if self.options.optimize_onnx:
                graph, optimizer_info = _optimize(graph, counts_raw)
            _stamp(graph, qmodel)
            onnx.save(graph, str(tmp))
        seconds = time.perf_counter() - start
        graph_meta, provenance = export_metadata(
            graph, path, qmodel, backend=self.name, fmt="QCDQ", options=self.options,
            exporter="brevitas.export.export_onnx_qcdq (torch legacy TorchScript exporter, dynamo=False)")
        counts = graph_meta["node_counts"]
        metadata = {
            **graph_meta,
            "node_counts_before_optimizer": counts_raw,
            "onnxoptimizer": optimizer_info,
            "weight_containers": {
                "4": "int8 initializer -> Clip[-7, 7] -> DequantizeLinear (per-channel float scale, zero point 0)",
                "8": "int8 initializer -> Clip[-127, 127] -> DequantizeLinear (per-channel float scale, zero point 0)",
                "16": "float32 initializer",
            },
            "activations": ("A8 layer inputs: QuantizeLinear -> DequantizeLinear per tensor, "
                            + ("int8, zero point 0" if self.options.act_quant_type == "sym"
                               else "uint8 with zero point")),
            **provenance,
            "device": str(device),
            "export_seconds": {"torch_export": round(t_export, 4), "total": round(seconds, 4)},
        }
        write_json(metadata_path(path), metadata)
        return ExportResult(path=path, seconds=seconds, node_counts=counts, metadata=metadata)

    @property
    def rounding(self) -> str:
        """How weights become integers: the ``weight_rounding`` option, or ``nearest`` when
        sequential GPTQ/GPFQ (``gptq``/``gpfq``) rework the float weights in every build."""
        if self.options.gptq or self.options.gpfq:
            return "nearest"
        return str(self.options.weight_rounding)

    def weights_key_parts(self, model: LoadedModel, calib: CalibrationSet) -> dict[str, Any]:
        """What decides the cached weights: the float model, the calibration images, the
        scale options, the rounding method and its settings."""
        from quantizers.rounding import GPTQ_BLOCKS, GPTQ_DAMP, module_digest

        o = self.options
        return {"backend": self.name, "model": module_digest(model.module), "imgsz": model.imgsz,
                "layers": [lay.name for lay in model.quantizable_layers], "calibration": calibration_key(calib),
                "bits": list(WEIGHT_WIDTHS), "method": self.rounding,
                "method_settings": {"act_order": True, "damp": GPTQ_DAMP, "blocks": GPTQ_BLOCKS},
                "scales": {"weight_scale": o.weight_scale, "weight_scale_8bit": o.weight_scale_8bit,
                           "weight_granularity": o.weight_granularity, "weight_percentile": o.weight_percentile}}

    def rounded_weights(self, model: LoadedModel, calib: CalibrationSet) -> tuple[WeightStore, str]:
        """Every quantizable layer's integers and scales at 4 and 8 bits for ``model`` and
        ``calib``: from this instance's memory, else from ``cache_dir``, else computed (once;
        then saved to ``cache_dir``). Returns the store and where it came from
        (``memory``, ``disk`` or ``computed``)."""
        parts = self.weights_key_parts(model, calib)

        def compute(key: str) -> WeightStore:
            if len(calib) == 0:
                raise BrevitasError(f"weight_rounding '{self.rounding}' needs calibration images, but the "
                                    "calibration set is empty")
            return compute_weight_store(model, calib, self.options, parts, key, device=self.device,
                                        progress=self.progress, console=self.console)

        return self._weights.get(model.module, parts, compute)

    # -- internals ------------------------------------------------------------------------
    def _act_key(self) -> str:
        o = self.options
        return json.dumps([o.act_calibration, o.act_percentile, o.act_quant_type])

    def _stats(self, model: LoadedModel, calib: CalibrationSet, *, act: bool, means: bool, quant_means: bool
               ) -> tuple[_StatsCache, bool]:
        """The statistics cache for ``model`` and ``calib``, computing what is missing."""
        if len(calib) == 0:
            raise BrevitasError("the calibration set is empty; A8 layers and bias correction need images")
        key = calibration_key(calib)
        cache = self._cache
        if cache is None or not cache.matches(model.module, key, self._act_key()):
            cache = _StatsCache(module_ref=weakref.ref(model.module), calib_key=key, act_key=self._act_key())
            self._cache = cache
        need_means = means and not cache.has_float_means
        need_act = act and not cache.has_act
        need_qmeans = quant_means and not cache.has_quant_means
        if not (need_means or need_act or need_qmeans):
            return cache, True
        start = time.perf_counter()
        self._compute_stats(model, calib, cache, means=need_means, act=need_act, quant_means=need_qmeans)
        cache.seconds += time.perf_counter() - start
        return cache, False

    def _batches(self, calib: CalibrationSet, description: str) -> Iterator[torch.Tensor]:
        import torch

        batches: Iterable[Any] = list(calib.batches())
        if self.progress:
            from rich.progress import track

            batches = track(batches, description=description, transient=True)
        for b in batches:
            yield torch.from_numpy(b).to(self.device)

    def _compute_stats(self, model: LoadedModel, calib: CalibrationSet, cache: _StatsCache, *,
                       means: bool, act: bool, quant_means: bool) -> None:
        """One or two float passes over ``calib`` with hooks on every quantizable layer.

        Pass 1 averages each layer's unfolded input and calibrates one input quantizer per
        layer (Brevitas ``calibration_mode``); pass 2 (A8 with bias correction) averages
        the unfolded input after that quantizer.
        """
        import brevitas.nn as qnn
        import torch
        from brevitas.graph.calibrate import calibration_mode
        from torch import nn

        float_module = copy.deepcopy(model.module).to(self.device).eval()
        names = [lay.name for lay in model.quantizable_layers]
        mods = {n: float_module.get_submodule(n) for n in names}
        for n in names:
            cache.layers.setdefault(n, _LayerStats())
        probes: dict[str, Any] = cache.probes
        if act:
            iq = input_quantizer(self.options)
            probes.update({n: qnn.QuantIdentity(act_quant=iq, return_quant_tensor=False).to(self.device)
                           for n in names})
        sums: dict[str, torch.Tensor] = {}
        count = 0

        def pass1_hook(name: str):  # noqa: ANN202
            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                x = inputs[0]
                if means and _supports_analytic(mod):
                    m = unfolded_input_mean(mod, x)
                    sums[name] = sums[name] + m if name in sums else m
                if act:
                    probes[name](x)
            return hook

        if means or act:
            hooks = [mods[n].register_forward_pre_hook(pass1_hook(n)) for n in names]
            container = nn.ModuleDict({n.replace(".", "__"): m for n, m in probes.items()})
            try:
                with torch.no_grad(), calibration_mode(container) if act else contextlib.nullcontext():
                    for x in self._batches(calib, "calibration: float statistics"):
                        float_module(x)
                        count += 1
            finally:
                for h in hooks:
                    h.remove()
        if means:
            for n in names:
                if n in sums:
                    cache.layers[n].float_mean = sums[n] / count
            cache.has_float_means = True
        if act:
            for n in names:
                probes[n].eval()
                cache.layers[n].input_quant_state = {k: v.detach().clone()
                                                     for k, v in probes[n].act_quant.state_dict().items()}
            cache.has_act = True
        if not quant_means:
            return
        # pass 2: mean of the quantized input (only needed for bias correction of A8 layers)
        qsums: dict[str, torch.Tensor] = {}
        count = 0

        def pass2_hook(name: str):  # noqa: ANN202
            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
                if _supports_analytic(mod):
                    m = unfolded_input_mean(mod, probes[name](inputs[0]))
                    qsums[name] = qsums[name] + m if name in qsums else m
            return hook

        hooks = [mods[n].register_forward_pre_hook(pass2_hook(n)) for n in names]
        try:
            with torch.no_grad():
                for x in self._batches(calib, "calibration: quantized-input statistics"):
                    float_module(x)
                    count += 1
        finally:
            for h in hooks:
                h.remove()
        for n in names:
            if n in qsums:
                cache.layers[n].quant_mean = qsums[n] / count
        cache.has_quant_means = True

    def _correction(self, name: str, float_layer: Any, q: Any, precision: Precision,
                    st: _LayerStats) -> torch.Tensor:
        """``E[float output] - E[quantized output]`` per channel, from the cached input means."""
        if st.float_mean is None or (precision.quantizes_inputs and st.quant_mean is None):
            raise BrevitasError(f"layer '{name}': no input statistics for bias correction (only zero padding "
                                "is supported; set backend.bias_correction: false)")
        w_f = float_layer.weight.to(q.weight.device)
        w_q = q.quant_weight().value if precision.quantizes_weights else q.weight
        m_q = st.quant_mean if precision.quantizes_inputs else st.float_mean
        assert m_q is not None
        return output_mean(float_layer, w_f, st.float_mean) - output_mean(float_layer, w_q, m_q)

    def _gpxq(self, module: nn.Module, calib: CalibrationSet, algo: str) -> None:
        """GPTQ or GPFQ over every weight-quantized layer (Brevitas' gptq_mode / gpfq_mode)."""
        import torch
        from brevitas.graph.gpfq import gpfq_mode
        from brevitas.graph.gptq import gptq_mode

        batches = [torch.from_numpy(b).to(self.device) for b in calib.batches()]
        mode: Any
        if algo == "gptq":
            mode = gptq_mode(module, act_order=True, use_quant_activations=False, create_weight_orig=False,
                             device=self.device)
        else:  # GPFQ needs the float weights beside the ones it updates (removed afterwards)
            mode = gpfq_mode(module, act_order=True, use_quant_activations=True, create_weight_orig=True,
                             device=self.device)
        with torch.no_grad(), warnings.catch_warnings(), mode as gpxq:
            warnings.simplefilter("ignore")
            steps: Iterable[int] = range(gpxq.num_layers)
            if self.progress:
                from rich.progress import track

                steps = track(list(steps), description=algo.upper(), transient=True)
            for _ in steps:
                for x in batches:
                    gpxq.model(x)
                gpxq.update()
        for m in module.modules():
            if "weight_orig" in m._buffers:
                del m._buffers["weight_orig"]


# --------------------------------------------------------------------------------------
# ONNX helpers
# --------------------------------------------------------------------------------------
def metadata_path(onnx_path: Path | str) -> Path:
    """Where :meth:`BrevitasBackend.export` writes the metadata of ``onnx_path``: ``<file>.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def _optimize(graph: Any, counts_before: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    """Run :data:`ONNX_PASSES`; keep the result only if every Q/DQ/Clip node survived."""
    import onnx

    info: dict[str, Any] = {"requested": True, "passes": list(ONNX_PASSES)}
    try:
        import onnxoptimizer
    except ImportError:  # pragma: no cover - a declared dependency
        info.update(applied=False, reason="onnxoptimizer is not installed")
        return graph, info
    nodes_before = len(graph.graph.node)
    try:
        optimized = onnxoptimizer.optimize(graph, list(ONNX_PASSES))
    except Exception as exc:  # noqa: BLE001 - a failed optional pass must not lose the export
        info.update(applied=False, reason=f"onnxoptimizer failed: {exc}")
        return graph, info
    after: dict[str, int] = {}
    for node in optimized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
            after[node.op_type] = after.get(node.op_type, 0) + 1
    kept = all(after.get(k, 0) == v for k, v in counts_before.items()
               if k in ("QuantizeLinear", "DequantizeLinear", "Clip"))
    info.update(nodes_before=nodes_before, nodes_after=len(optimized.graph.node))
    if not kept:
        info.update(applied=False, reason=f"the passes changed Q/DQ/Clip counts {counts_before} -> {after}; "
                                          "kept the unoptimized graph")
        return graph, info
    onnx.checker.check_model(optimized)
    info["applied"] = True
    return optimized, info


def _stamp(graph: Any, qmodel: QuantizedModel) -> None:
    """Record the backend and the assignment digest in the ONNX file's metadata_props."""
    props = {p.key: p for p in graph.metadata_props}
    for key, value in (("yolo_mpq.backend", qmodel.backend),
                       ("yolo_mpq.assignment_digest", qmodel.assignment.digest()),
                       ("yolo_mpq.assignment", json.dumps(qmodel.assignment.to_dict(), sort_keys=True))):
        if key in props:
            props[key].value = value
        else:
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
