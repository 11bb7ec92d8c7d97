"""Brevitas backend: per-layer mixed-precision PTQ exported to QCDQ ONNX.

:meth:`BrevitasBackend.materialize` replaces each layer an assignment names with a
Brevitas ``QuantConv2d`` (or ``QuantLinear``) at that layer's precision, on a copy of the
fused float model; layers it does not name stay the same float modules:

- weights: symmetric narrow-range integers (4 bits: [-7, 7], 8 bits: [-127, 127]) with one
  scale per output channel, chosen by MSE search (default for 4 bits), a per-channel
  percentile of ``|w|``, or the maximum (default for 8 bits); which integers
  (``weight_rounding``): by default GPTQ with those scales fixed, from each layer's input in
  the float model, computed once per model, calibration set and weight options and cached
  (:mod:`quantizers.brevitas_rounding`), so a build only loads them;
- A8 layers: a per-tensor INT8 quantizer on the layer's *input* (Brevitas ``input_quant``),
  int8 with zero point 0 by default (what TensorRT accepts), uint8 with a zero point on
  request, ranges calibrated on the calibration images (percentile, MSE or max);
- bias correction (on by default): each quantized layer's mean output error on the
  calibration images is folded into its bias;
- sequential GPTQ or GPFQ (Brevitas' ``gptq_mode`` / ``gpfq_mode``, in every build, from the
  float weights; the cached rounding is then not used) when the options ask for them.

The calibration statistics do not depend on the assignment and are computed once per float
model and calibration set (:mod:`quantizers.brevitas_stats`): reuse one backend instance
for many ``materialize`` calls.

:meth:`BrevitasBackend.export` writes QCDQ ONNX through Brevitas' exporter (legacy
TorchScript exporter, ``dynamo=False``, opset 17): input ``images`` with a dynamic batch,
output ``output0``, weights as int8 initializers -> ``Clip`` -> ``DequantizeLinear``, A8
inputs as ``QuantizeLinear -> DequantizeLinear``. An optional onnxoptimizer pass is kept
only if it keeps every Q/DQ/Clip node. What is in the file is written beside it as
``<file>.json``.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.assignment import Assignment, Precision
from mpq.errors import UserError
from quantizers.base import (
    CalibrationSet,
    ExportResult,
    QuantizedModel,
    count_qdq_nodes,
    export_metadata,
    metadata_path,
    stamp_metadata,
)
from quantizers.brevitas_options import CAPABILITIES, NAME, BrevitasOptions
from quantizers.brevitas_rounding import BrevitasWeights, load_rounded
from quantizers.brevitas_stats import InputStatistics, LayerStats, asym_minmax_quant, output_mean

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mpq.model import LoadedModel
    from quantizers.weight_store import RoundedWeight, WeightStore

OPSET = 17

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


def activation_choice(options: BrevitasOptions, target: str = "qcdq") -> tuple[str, str, str]:
    """``(act_quant_type, input calibration, output calibration)`` with ``auto`` resolved for
    the deploy target.

    ``ort-cpu``: ``asym`` (uint8 with a zero point: ONNX Runtime's u8 kernels take any zero
    point, and YOLO's post-SiLU inputs (>= -0.28) and all-negative class logits would waste
    half of a symmetric grid), inputs ``mse`` (the clipped range with the least
    quantization error, :func:`quantizers.ranges.mse_range`), outputs ``max`` (the
    unclipped min..max): measured best of the variants tried on the demo
    (docs/benchmarks.md, "Deployment"). Elsewhere (``tensorrt``, ``qcdq``): ``sym`` +
    ``percentile`` (TensorRT takes zero point 0 only). An explicit ``act_calibration``
    applies to inputs and outputs.
    """
    qtype = options.act_quant_type
    method = options.act_calibration
    if qtype == "auto":
        qtype = "asym" if target == "ort-cpu" else "sym"
    if method == "auto":
        return (qtype, "mse", "max") if target == "ort-cpu" else (qtype, "percentile", "percentile")
    return qtype, method, method


def own_range(qtype: str, method: str) -> bool:
    """Whether this backend computes the range itself (asymmetric ``max``/``mse``:
    :class:`quantizers.ranges.RangeObserver`, global min/max and an MSE search) and loads it
    into a min/max Brevitas quantizer, instead of Brevitas' per-batch statistics."""
    return qtype == "asym" and method in ("max", "mse")


def input_quantizer(options: BrevitasOptions, target: str = "qcdq", role: str = "input") -> Any:
    """The Brevitas per-tensor 8-bit quantizer for the input of an A8 layer (``role``
    ``output``: the quantizer on its output, for targets that need one)."""
    from brevitas.inject.enum import StatsOp
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8ActPerTensorFloatMSE
    from brevitas.quant.shifted_scaled_int import ShiftedUint8ActPerTensorFloat

    qtype, in_method, out_method = activation_choice(options, target)
    method = out_method if role == "output" else in_method
    if own_range(qtype, method):
        return asym_minmax_quant()  # range computed by the backend (RangeObserver), loaded as state
    p = options.act_percentile
    if qtype == "sym":
        if method == "mse":
            return Int8ActPerTensorFloatMSE
        if method == "max":
            return Int8ActPerTensorFloat.let(scaling_stats_op=StatsOp.MAX)
        return Int8ActPerTensorFloat.let(high_percentile_q=p)
    return ShiftedUint8ActPerTensorFloat.let(high_percentile_q=p, low_percentile_q=100.0 - p)


def output_quantizer(options: BrevitasOptions, target: str = "qcdq") -> Any:
    """The Brevitas per-tensor 8-bit quantizer on the output of an A8 layer, for deployment
    targets whose integer kernels requantize their output (``ort-cpu``: ``DQ -> Conv -> Q``
    becomes ``QLinearConv``): the same kind as the input quantizers (calibration: see
    :func:`activation_choice`)."""
    return input_quantizer(options, target, role="output")


def quant_layer(layer: Any, precision: Precision, options: BrevitasOptions,
                input_quant_state: dict[str, Any] | None = None,
                output_quant_state: dict[str, Any] | None = None, target: str = "qcdq",
                weights: RoundedWeight | None = None) -> nn.Module:
    """A Brevitas ``QuantConv2d``/``QuantLinear`` with ``layer``'s weights at ``precision``.

    ``input_quant_state`` is the state of a calibrated input quantizer (A8 layers); the
    weight scales are initialized here, from the float weights, unless cached ``weights``
    (integers and scale) are given. ``output_quant_state`` (A8 layers, for targets that
    quantize outputs) adds a calibrated output quantizer and an int32 bias at scale
    ``input scale x weight scale``, which is what an integer kernel adds to its accumulator:
    the fake-quant module then computes what the deployed ``QLinearConv`` computes.
    """
    import brevitas.nn as qnn
    import torch
    from brevitas.quant.scaled_int import Int32Bias
    from torch import nn

    wq = weight_quantizer(precision.w_bits, options) if precision.quantizes_weights else None
    iq = input_quantizer(options, target) if precision.quantizes_inputs else None
    with_output = output_quant_state is not None and precision.quantizes_inputs and precision.quantizes_weights
    oq = output_quantizer(options, target) if with_output else None
    bq = Int32Bias if (with_output and layer.bias is not None) else None
    weight = layer.weight
    common = dict(bias=layer.bias is not None, weight_quant=wq, input_quant=iq, bias_quant=bq,
                  output_quant=oq, return_quant_tensor=False, device=weight.device, dtype=weight.dtype)
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
    if oq is not None and output_quant_state is not None:
        q.output_quant.load_state_dict(output_quant_state)
    q.eval()
    if wq is not None and weights is not None:
        load_rounded(q, weights)
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
# The backend
# --------------------------------------------------------------------------------------
class BrevitasBackend:
    """Brevitas PTQ backend (see the module docstring).

    Args:
        options: the study's ``backend`` section (:class:`~quantizers.brevitas_options.BrevitasOptions`);
            defaults when ``None``.
        device: torch device for calibration and the fake-quant model: ``auto`` (CUDA when
            available), ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show rich progress bars for the calibration passes, GPTQ/GPFQ and the
            one-time weight rounding.
        cache_dir: where the one-time rounded weights are saved and looked up
            (``brevitas-<digest>.pt``); ``None``: in memory only.
        console: the rich console for the one-time progress bar and cache warnings.
    """

    name = NAME
    capabilities = CAPABILITIES

    def __init__(self, *, options: BrevitasOptions | None = None, device: str = "cpu",
                 progress: bool = False, target: str = "qcdq", cache_dir: Path | str | None = None,
                 console: Any = None) -> None:
        from mpq.device import resolve_device
        from quantizers.lowering import target_info

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
        #: the deployment target (``deploy.target``); ``ort-cpu`` needs output quantizers on A8 layers
        self.target = target
        self.output_quant = target_info(target).needs_output_quant
        qtype, in_method, out_method = activation_choice(options, target)
        self._stats = InputStatistics(
            act_quant=lambda: input_quantizer(options, target), device=self.device,
            output_quant=(lambda: output_quantizer(options, target)) if self.output_quant else None,
            own_input=in_method if own_range(qtype, in_method) else None,
            own_output=self.output_quant and own_range(qtype, out_method),
            act_key=json.dumps([qtype, in_method, out_method, options.act_percentile, self.output_quant,
                                "ranges-v2"]))
        #: layers built per (name, precision), reused by later builds (see :meth:`_build_layers`)
        self._built: dict[tuple[str, str], Any] = {}
        self._built_key: tuple[int, int, int] | None = None
        self.weights = BrevitasWeights(options, quant_layer, device=self.device, cache_dir=cache_dir, progress=progress,
                                       console=console, error=BrevitasError)

    # -- public API -----------------------------------------------------------------------
    def materialize(self, model: LoadedModel, assignment: Assignment, calib: CalibrationSet) -> QuantizedModel:
        """Build ``assignment`` on a copy of ``model`` (never modifying it), calibrated on ``calib``."""

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
            if len(calib) == 0:
                raise BrevitasError("the calibration set is empty; A8 layers and bias correction need images")
            cache, cached = self._stats.get(model, calib, act=needs_act, means=needs_means,
                                            quant_means=needs_act and needs_means, progress=self.progress)
            timings["calibrate"] = time.perf_counter() - t

        store, weights_info, timings["weights"] = self.weights.for_assignment(
            model, calib, any(p.quantizes_weights for _, p in assignment.items()))
        sequential = self.options.gptq or self.options.gpfq
        layers_info = self._build_layers(work, model, assignment, cache, store, timings, reuse=not sequential)
        if sequential:
            algo = "gptq" if self.options.gptq else "gpfq"
            t = time.perf_counter()
            self._gpxq(work, calib, algo)
            timings[algo] = time.perf_counter() - t
            if self.options.bias_correction and len(assignment):
                t = time.perf_counter()
                assert cache is not None
                for name, precision in assignment.items():
                    self._correct(work.get_submodule(name), name, model, precision, cache)
                timings["bias_correction"] = time.perf_counter() - t
        work.eval()
        timings["total"] = time.perf_counter() - start
        info = {
            "device": self.device,
            "options": self.options.model_dump(mode="json"),
            "layers": layers_info,
            "stats_cached": cached,
            "act_quant": activation_choice(self.options, self.target)[0],
            "act_calibration": dict(zip(("input", "output"), activation_choice(self.options, self.target)[1:],
                                        strict=True)),
            "weights": weights_info,
        }
        return QuantizedModel(backend=self.name, assignment=assignment, base=model, module=work,
                              timings=timings, info=info)

    def _build_layers(self, work: nn.Module, model: LoadedModel, assignment: Assignment, cache: Any, store: Any,
                      timings: dict[str, float], *, reuse: bool) -> dict[str, dict[str, Any]]:
        """Put each assigned layer's Brevitas module into ``work``; bias-corrected here unless
        ``reuse`` is off (sequential GPTQ/GPFQ correct after they run).

        With ``reuse``, a layer built at a precision is kept and put into later builds as it is:
        without sequential GPTQ/GPFQ a quantized layer depends only on its float weights, its
        precision and the statistics and rounded weights of this model and calibration set
        (the key of the kept layers), and nothing modifies it after it is built.
        """
        key = (id(model.module), id(cache), id(store))
        if self._built_key != key:
            self._built, self._built_key = {}, key
        layers_info: dict[str, dict[str, Any]] = {}
        timings.setdefault("quantize", 0.0)
        correct = self.options.bias_correction and reuse
        if correct:
            timings.setdefault("bias_correction", 0.0)
        reused = 0
        for name, precision in assignment.items():
            q = self._built.get((name, str(precision))) if reuse else None
            reused += q is not None
            if q is None:
                t = time.perf_counter()
                state = cache.layers[name].input_quant_state if (cache and precision.quantizes_inputs) else None
                out_state = (cache.layers[name].output_quant_state if (cache and self.output_quant) else None)
                given = self.weights.layer(store, name, precision.w_bits) if (
                    store is not None and precision.quantizes_weights) else None
                q = quant_layer(work.get_submodule(name), precision, self.options, state, out_state, self.target, given)
                timings["quantize"] += time.perf_counter() - t
                if correct:
                    t = time.perf_counter()
                    self._correct(q, name, model, precision, cache)
                    timings["bias_correction"] += time.perf_counter() - t
                if reuse:
                    self._built[(name, str(precision))] = q
            _set_submodule(work, name, q)
            oq: Any = getattr(q, "output_quant", None)
            layers_info[name] = {"precision": str(precision), "type": type(q).__name__,
                                 "output_quant": oq is not None and bool(oq.is_quant_enabled)}
        timings["layers_reused"] = float(reused)
        return layers_info

    def _correct(self, q: Any, name: str, model: LoadedModel, precision: Precision, cache: Any) -> None:
        """Fold the layer's mean output error on the calibration images into its bias."""
        import torch

        assert cache is not None
        with torch.no_grad():
            correction = self._correction(name, model.module.get_submodule(name), q, precision, cache.layers[name])
            if q.bias is None:
                q.bias = torch.nn.Parameter(correction, requires_grad=False)
            else:
                q.bias.add_(correction)

    def export(self, qmodel: QuantizedModel, path: Path | str) -> ExportResult:
        """Write ``qmodel`` as QCDQ ONNX at ``path`` (atomically) and its metadata at ``<path>.json``."""
        import onnx
        import torch
        from brevitas.export import export_onnx_qcdq

        from mpq.files import atomic_path, write_json

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
            stamp_metadata(graph, qmodel)
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
                            + ("int8, zero point 0" if activation_choice(self.options, self.target)[0] == "sym"
                               else "uint8 with zero point")),
            **provenance,
            "device": str(device),
            "export_seconds": {"torch_export": round(t_export, 4), "total": round(seconds, 4)},
        }
        write_json(metadata_path(path), metadata)
        return ExportResult(path=path, seconds=seconds, node_counts=counts, metadata=metadata)

    def emit(self, qmodel: QuantizedModel, path: Path | str, float_onnx: Path | str) -> ExportResult:
        """Write ``qmodel`` as QDQ ONNX at ``path`` by graph emission into ``float_onnx`` (the
        float model's export): the quantizers' integers, scales and ranges, without tracing
        (:mod:`quantizers.emit`). Raises :class:`~quantizers.emit.EmitUnsupported` for a
        quantizer it cannot write (then :meth:`export` traces)."""
        from quantizers.brevitas_emit import layer_params
        from quantizers.emit import write_emitted

        return write_emitted(qmodel, layer_params(qmodel), float_onnx, path, backend=self.name, options=self.options)

    @property
    def rounding(self) -> str:
        """How weights become integers (``weight_rounding``; ``nearest`` under sequential GPTQ/GPFQ)."""
        return self.weights.method

    def rounded_weights(self, model: LoadedModel, calib: CalibrationSet) -> tuple[WeightStore, str]:
        """Every quantizable layer's cached integers and scales at 4 and 8 bits, and where they
        came from (``memory``, ``disk`` or ``computed``)."""
        return self.weights.get(model, calib)

    # -- internals ------------------------------------------------------------------------
    def _correction(self, name: str, float_layer: Any, q: Any, precision: Precision,
                    st: LayerStats) -> torch.Tensor:
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
