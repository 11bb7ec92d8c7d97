"""ModelOpt backend: per-layer mixed-precision PTQ with NVIDIA ModelOpt (torch), QDQ ONNX export.

:meth:`ModelOptBackend.materialize` inserts ModelOpt quantizers into a copy of the fused
float model (``modelopt.torch.quantization.quantize`` with an ordered list of per-layer
``quant_cfg`` rules, later rules overriding earlier ones):

- a deny-all rule, then per assigned layer a ``weight_quantizer`` (4 or 8 bits, one scale
  per output channel, symmetric) and, for A8 layers, an 8-bit per-tensor ``input_quantizer``;
  every other layer (the DFL conv included) is put back as the original float module;
- weights are calibrated by ModelOpt's ``max`` or ``mse`` algorithm; by default
  (``weight_rounding: gptq``) their integers are GPTQ's with that ``amax`` fixed, computed
  once per model, calibration set and weight calibration and cached
  (:mod:`quantizers.modelopt_rounding`); A8 inputs by a forward loop with ModelOpt's
  calibrators (max, or the histogram's entropy / percentile). As in ModelOpt's
  ``max_calibrate``, input statistics come from the float model, so they are computed once
  per backend instance, model and calibration set and reused by later
  ``materialize`` calls (the sensitivity sweep makes hundreds).

:meth:`ModelOptBackend.export` runs the legacy TorchScript exporter (``dynamo=False``) with
ModelOpt's symbolics, then rewrites every quantized weight as an integer initializer feeding
a standard ``DequantizeLinear`` (axis 0): ModelOpt exports 4-bit weights as
``trt::DequantizeLinear`` of the float weight, which ONNX Runtime refuses. The integers are
computed as ModelOpt's fake quantization computes them, ``round(w * (7 / amax))`` (half to
even), not as ``QuantizeLinear`` would (``round(w / (amax / 7))``): the two differ by one
step on exact ``.5`` ties. 4-bit weights are stored as int8 values in [-8, 7]
(``w4_format: int8``, any opset) or as ONNX INT4 (``w4_format: int4``, opset 21). A8 inputs
keep ModelOpt's ``QuantizeLinear -> DequantizeLinear`` (int8, zero point 0). The file's
metadata (``<file>.json`` beside it, and ``metadata_props``) says all of this.

How far torch and ONNX Runtime drift apart with A8 layers, and why: docs/benchmarks.md
(ModelOpt backends).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.assignment import Assignment, Precision
from mpq.errors import UserError
from quantizers.base import (
    CalibrationSet,
    ExportResult,
    QuantizedModel,
    export_metadata,
    metadata_path,
    stamp_metadata,
)
from quantizers.modelopt_options import CAPABILITIES, INSTALL_HINT, NAME, ModelOptOptions
from quantizers.modelopt_rounding import ModelOptWeights

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from torch import nn

    from mpq.model import LoadedModel
    from quantizers.weight_store import WeightStore

WEIGHT_STORAGE = {
    "int8": {
        "4": "int8 initializer, values in [-8, 7] (4-bit grid in an 8-bit container) -> DequantizeLinear "
             "(axis 0, per-channel float scale amax/7, zero point 0)",
        "8": "int8 initializer, values in [-128, 127] -> DequantizeLinear (axis 0, per-channel float scale "
             "amax/127, zero point 0)",
        "16": "float32 initializer",
    },
    "int4": {
        "4": "INT4 initializer (ONNX int4, opset 21) -> DequantizeLinear (axis 0, per-channel float scale "
             "amax/7, zero point 0)",
        "8": "int8 initializer, values in [-128, 127] -> DequantizeLinear (axis 0, per-channel float scale "
             "amax/127, zero point 0)",
        "16": "float32 initializer",
    },
}

MODELOPT_W4_EXPORT = (
    "ModelOpt exports a 4-bit weight quantizer as trt::DequantizeLinear(float weight, amax/7) (TensorRT "
    "custom domain, refused by ONNX Runtime; ModelOpt's INT4 ONNX post-processing covers MatMul/Gemm only); "
    "this backend replaces it with integer weights computed as ModelOpt's fake quantization does "
    "(round(w * 7/amax), half to even) and a standard DequantizeLinear")


class ModelOptError(UserError):
    """A ModelOpt backend problem the user can fix (options, environment, model)."""


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Silence ModelOpt's prints and warnings (``Inserted N quantizers``, missing
    transformers/CUDA notices); yields the captured stdout."""
    buf = io.StringIO()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        yield buf


def import_mtq() -> Any:
    """``modelopt.torch.quantization``, imported quietly (no network, no extension build)."""
    try:
        with quiet():
            import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise ModelOptError(f"the modelopt backend needs NVIDIA ModelOpt: {exc} ({INSTALL_HINT})") from exc
    return mtq


def quant_config(assignment: Assignment, options: ModelOptOptions, *, output_quant: bool = False) -> dict[str, Any]:
    """The ModelOpt ``quantize`` config for ``assignment``: a deny-all rule, then one rule per
    quantized weight and per A8 input, naming the quantizer exactly (no wildcards).

    ``output_quant`` (deployment targets whose integer kernels requantize their output,
    ``ort-cpu``): also an 8-bit per-tensor ``output_quantizer`` on every layer that quantizes
    both its input and its weight (what becomes ``QLinearConv``), calibrated like the inputs.
    """
    histogram = options.calibration in ("entropy", "percentile")
    rules: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name, precision in assignment.items():
        if precision.quantizes_weights:
            rules.append({"quantizer_name": f"{name}.weight_quantizer",
                          "cfg": {"num_bits": precision.w_bits, "axis": 0}})
        if precision.quantizes_inputs:
            cfg: dict[str, Any] = {"num_bits": precision.a_bits, "axis": None}
            if histogram:
                cfg["calibrator"] = "histogram"
            rules.append({"quantizer_name": f"{name}.input_quantizer", "cfg": cfg})
            if output_quant and precision.quantizes_weights:
                rules.append({"quantizer_name": f"{name}.output_quantizer", "cfg": dict(cfg)})
    return {"quant_cfg": rules, "algorithm": None}


def restore_float_modules(work: nn.Module, original: nn.Module, assignment: Assignment) -> int:
    """Put back a copy of the float module wherever ModelOpt converted a module the assignment
    does not quantize (``mtq.quantize`` wraps every Conv2d, and a few other types, with
    disabled quantizers), so that only the assigned layers differ from the float model.
    Returns the number of modules restored."""
    import copy

    base = dict(original.named_modules())
    keep = set(assignment)
    device = next(work.parameters()).device
    restored = 0
    for name, mod in list(work.named_modules()):
        if not name or name not in base or type(mod) is type(base[name]):
            continue
        if name in keep or any(name.startswith(k + ".") for k in keep):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = work.get_submodule(parent_name) if parent_name else work
        setattr(parent, child, copy.deepcopy(base[name]).to(device))
        restored += 1
    return restored


def integer_weight(layer: nn.Module) -> tuple[np.ndarray, np.ndarray, int]:
    """The integer weight, per-channel scale and bit width of a ModelOpt-quantized layer,
    computed exactly as ModelOpt's fake quantization does (so that ``q * scale`` equals the
    fake-quantized weight to float rounding)."""
    import numpy as np
    import torch

    wq: Any = layer.weight_quantizer
    bits = int(wq.num_bits)
    amax = wq.amax
    if amax is None:
        raise ModelOptError(f"{layer}: weight quantizer has no amax (not calibrated)")
    amax = amax.detach().float().cpu()
    weight: Any = layer.weight
    w = weight.detach().float().cpu()
    max_bound = torch.tensor(2.0 ** (bits - 1) - 1.0)
    min_bound = -max_bound if wq._narrow_range else -max_bound - 1
    scale = max_bound / amax
    zero = amax <= 1.0 / (1 << 24)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    q = torch.clamp((w * scale).round_(), min_bound, max_bound)
    step = torch.where(zero, torch.ones_like(amax), amax / max_bound)
    return (q.numpy().astype(np.int8), step.reshape(-1).numpy().astype(np.float32), bits)


def _dead_code(graph: onnx.GraphProto) -> int:
    """Remove nodes whose outputs nobody uses and initializers no node reads; return the
    number of nodes removed."""
    outputs = {o.name for o in graph.output}
    removed = 0
    while True:
        used = set(outputs)
        for node in graph.node:
            used.update(i for i in node.input if i)
        dead = [n for n in graph.node if n.output and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return removed


def rewrite_weights(proto: onnx.ModelProto, module: nn.Module, qmodel: QuantizedModel, w4_format: str
                    ) -> dict[str, Any]:
    """Replace every quantized weight's Q/DQ (or ``trt::DequantizeLinear``) by an integer
    initializer and a standard ``DequantizeLinear``; return a summary."""
    import ml_dtypes
    import numpy as np
    from onnx import helper, numpy_helper

    from quantizers.onnx_names import map_layers_to_nodes

    graph = proto.graph
    layers = [qmodel.base.layer(name) for name, p in qmodel.assignment.items() if p.quantizes_weights]
    nmap = map_layers_to_nodes(proto, layers, source="ModelOpt export")
    index = {n.name: i for i, n in enumerate(graph.node)}
    new_nodes: dict[str, Any] = {}
    bits_seen: dict[str, int] = {}
    for lay in layers:
        match = nmap.matches[lay.name]
        q, step, bits = integer_weight(module.get_submodule(lay.name))
        lo, hi = int(q.min()), int(q.max())
        if w4_format == "int4" and bits == 4:
            q_t = numpy_helper.from_array(q.astype(ml_dtypes.int4), f"{lay.name}.weight_int4")
            zp_t = numpy_helper.from_array(np.zeros(step.shape, dtype=ml_dtypes.int4), f"{lay.name}.weight_zero_point")
        else:
            q_t = numpy_helper.from_array(q, f"{lay.name}.weight_int{bits}")
            zp_t = numpy_helper.from_array(np.zeros(step.shape, dtype=np.int8), f"{lay.name}.weight_zero_point")
        s_t = numpy_helper.from_array(step, f"{lay.name}.weight_scale")
        graph.initializer.extend([q_t, s_t, zp_t])
        scope = match.node.rsplit("/", 1)[0]
        # new names: the exported chain (removed below) used the weight_quantizer/... ones
        dq = helper.make_node("DequantizeLinear", [q_t.name, s_t.name, zp_t.name], [f"{lay.name}.weight_dequantized"],
                              name=f"{scope}/weight_dequantize/DequantizeLinear", axis=0)
        new_nodes[match.node] = dq
        bits_seen[lay.name] = bits
        if bits == 4 and (lo < -8 or hi > 7):
            raise ModelOptError(f"layer '{lay.name}': 4-bit weights out of range [{lo}, {hi}]")
    # rewire and insert each DequantizeLinear right before its Conv (keeps topological order)
    for conv_name, dq in new_nodes.items():
        conv = graph.node[index[conv_name]]
        conv.input[1] = dq.output[0]
    ordered = []
    for node in graph.node:
        if node.name in new_nodes:
            ordered.append(new_nodes[node.name])
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    removed = _dead_code(graph)
    leftovers = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx")})
    if leftovers:
        raise ModelOptError(f"the ModelOpt export still holds custom-domain ops {leftovers} that ONNX Runtime "
                            "cannot run")
    keep = [o for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    if w4_format == "int4" and any(b == 4 for b in bits_seen.values()):
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, 21)
    return {"rewritten": len(new_nodes), "nodes_removed": removed,
            "bits": {str(b): sum(1 for v in bits_seen.values() if v == b) for b in sorted(set(bits_seen.values()))}}


def snap_biases(work: nn.Module, outputs: dict[str, Any]) -> int:
    """Put the float bias of every layer with an output quantizer on the int32 grid
    ``input scale x weight scale`` (per output channel), which is what an integer kernel
    (``QLinearConv``) adds to its accumulator: ModelOpt has no bias quantizer for Conv, so
    without this the torch model and the lowered ``ort-cpu`` file would differ by up to half
    a step per channel (each such difference flips some outputs of the output quantizer).
    Scales are computed as the export writes them (``amax / 127`` in float32). Returns the
    number of layers changed."""
    import torch

    changed = 0
    with torch.no_grad():
        for name in outputs:
            layer: Any = work.get_submodule(name)
            if getattr(layer, "bias", None) is None:
                continue
            iq = layer.input_quantizer
            bound = torch.tensor(2.0 ** (int(iq.num_bits) - 1) - 1.0)
            s_x = (iq.amax.detach().float().cpu() / bound).reshape(())
            _, s_w, _ = integer_weight(layer)
            step = (s_x * torch.from_numpy(s_w)).float()
            bias = layer.bias.detach().float().cpu()
            snapped = torch.round(bias.double() / step.double()).float() * step
            layer.bias.copy_(snapped.to(layer.bias.device, layer.bias.dtype))
            changed += 1
    return changed


def enabled_quantizers(work: nn.Module, assignment: Assignment) -> tuple[dict[str, Any], dict[str, Any]]:
    """The enabled weight and input quantizers, by layer name; checks every rule took."""
    weights: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    for name, precision in assignment.items():
        layer = work.get_submodule(name)
        wq = getattr(layer, "weight_quantizer", None)
        iq = getattr(layer, "input_quantizer", None)
        if precision.quantizes_weights:
            if wq is None or not wq.is_enabled or int(wq.num_bits) != precision.w_bits:
                raise ModelOptError(f"layer '{name}': ModelOpt did not set up a {precision.w_bits}-bit weight "
                                    f"quantizer (got {wq})")
            weights[name] = wq
        if precision.quantizes_inputs:
            if iq is None or not iq.is_enabled or int(iq.num_bits) != precision.a_bits:
                raise ModelOptError(f"layer '{name}': ModelOpt did not set up an {precision.a_bits}-bit input "
                                    f"quantizer (got {iq})")
            inputs[name] = iq
    return weights, inputs


def enabled_output_quantizers(work: nn.Module, assignment: Assignment) -> dict[str, Any]:
    """The enabled output quantizers (layers quantizing input and weight), by layer name."""
    outputs: dict[str, Any] = {}
    for name, precision in assignment.items():
        if not (precision.quantizes_inputs and precision.quantizes_weights):
            continue
        oq = getattr(work.get_submodule(name), "output_quantizer", None)
        if oq is None or not oq.is_enabled or int(oq.num_bits) != precision.a_bits:
            raise ModelOptError(f"layer '{name}': ModelOpt did not set up an {precision.a_bits}-bit output "
                                f"quantizer (got {oq})")
        outputs[name] = oq
    return outputs


def weight_amax(model: LoadedModel, bits: int, options: ModelOptOptions) -> dict[str, Any]:
    """ModelOpt's per-channel weight ``amax`` of every quantizable layer at ``bits`` (its
    ``max`` or ``mse`` weight calibration on the float weights, as a build does)."""
    mtq = import_mtq()
    work = model.fresh().module.eval()
    everything = Assignment({lay.name: Precision(bits, 16) for lay in model.quantizable_layers})
    with quiet():
        mtq.quantize(work, quant_config(everything, options))
        mtq.calibrate(work, algorithm={"method": options.weight_calibration}, forward_loop=None)
    weights, _ = enabled_quantizers(work, everything)
    return {name: wq.amax.detach().float().cpu().clone() for name, wq in weights.items()}


def _calibration_pass(module: nn.Module, calib: CalibrationSet, device: str) -> None:
    """One forward pass of ``module`` over the calibration images (the quantizers collect statistics)."""
    import torch

    with torch.no_grad():
        for batch in calib.batches():
            module(torch.from_numpy(batch).to(device))


class ModelOptBackend:
    """ModelOpt torch PTQ backend (see the module docstring).

    Args:
        options: the study's ``backend`` section (:class:`~quantizers.modelopt_options.ModelOptOptions`);
            defaults when ``None``.
        device: torch device for calibration and the fake-quant model: ``auto``, ``cpu``,
            ``cuda`` or ``cuda:N``.
        progress: show a rich progress bar for the one-time weight rounding.
        cache_dir: where the one-time rounded weights are saved and looked up
            (``modelopt-<digest>.pt``); ``None``: in memory only.
        console: the rich console for that progress bar and cache warnings.
    """

    name = NAME
    capabilities = CAPABILITIES

    def __init__(self, *, options: ModelOptOptions | None = None, device: str = "cpu", target: str = "qcdq",
                 progress: bool = False, cache_dir: Path | str | None = None, console: Any = None) -> None:
        from mpq.device import resolve_device
        from quantizers.lowering import target_info

        if options is None:
            options = ModelOptOptions()
        if not isinstance(options, ModelOptOptions):
            raise ModelOptError(f"the modelopt backend needs ModelOptOptions, got {type(options).__name__} "
                                f"(backend name '{getattr(options, 'name', '?')}')")
        self.options = options
        try:
            self.device = resolve_device(device)
        except RuntimeError as exc:
            raise ModelOptError(str(exc)) from None
        #: the deployment target (``deploy.target``); ``ort-cpu`` needs output quantizers on A8 layers
        self.target = target
        self.output_quant = target_info(target).needs_output_quant
        self._stats_cache: _InputStats | None = None
        self.weights = ModelOptWeights(options, weight_amax, device=self.device, cache_dir=cache_dir, progress=progress,
                                       console=console, error=ModelOptError)

    # -- public API -----------------------------------------------------------------------
    def materialize(self, model: LoadedModel, assignment: Assignment, calib: CalibrationSet) -> QuantizedModel:
        """Build ``assignment`` on a copy of ``model`` (never modifying it), calibrated on ``calib``."""
        start = time.perf_counter()
        self.capabilities.check(model.layers, assignment)
        mtq = import_mtq()
        timings: dict[str, float] = {"import": time.perf_counter() - start}
        t = time.perf_counter()
        work = model.fresh().module.to(self.device).eval()
        timings["copy"] = time.perf_counter() - t

        t = time.perf_counter()
        config = quant_config(assignment, self.options, output_quant=self.output_quant)
        with quiet():
            mtq.quantize(work, config)
        weights, inputs = enabled_quantizers(work, assignment)
        outputs = enabled_output_quantizers(work, assignment) if self.output_quant else {}
        restored = restore_float_modules(work, model.module, assignment)
        timings["quantize"] = time.perf_counter() - t

        store, weights_info, timings["weights"] = self.weights.for_assignment(model, calib, bool(weights))
        if store is not None:
            t = time.perf_counter()
            self.weights.load(work, assignment, store)
            timings["load_weights"] = time.perf_counter() - t
        elif weights:
            t = time.perf_counter()
            for q in (*inputs.values(), *outputs.values()):
                q.disable()
            algorithm: dict[str, Any] = {"method": self.options.weight_calibration}
            with quiet():
                mtq.calibrate(work, algorithm=algorithm, forward_loop=None)
            for q in (*inputs.values(), *outputs.values()):
                q.enable()
            timings["calibrate_weights"] = time.perf_counter() - t
        cached = True
        if inputs:
            if len(calib) == 0:
                raise ModelOptError("A8 layers need calibration images, but the calibration set is empty")
            t = time.perf_counter()
            stats, cached = self._input_stats(model, calib)
            for name, q in inputs.items():
                q.amax = stats.amax[name].to(self.device)
            for name, q in outputs.items():
                q.amax = stats.out_amax[name].to(self.device)
            timings["calibrate_inputs"] = time.perf_counter() - t
        rounded = snap_biases(work, outputs) if outputs else 0
        work.eval()
        timings["total"] = time.perf_counter() - start
        info = {
            "device": self.device,
            "options": self.options.model_dump(mode="json"),
            "quantizers": {"weights": len(weights), "inputs": len(inputs), "outputs": len(outputs)},
            "target": self.target,
            "rules": len(config["quant_cfg"]),
            "float_modules_restored": restored,
            "biases_on_int32_grid": rounded,
            "calibration_images": len(calib),
            "input_stats_cached": cached,
            "weights": weights_info,
        }
        return QuantizedModel(backend=self.name, assignment=assignment, base=model, module=work,
                              timings=timings, info=info)

    def export(self, qmodel: QuantizedModel, path: Path | str) -> ExportResult:
        """Write ``qmodel`` as QDQ ONNX at ``path`` (atomically) and its metadata at ``<path>.json``."""
        import onnx
        import torch

        from mpq.files import atomic_path, write_json

        if qmodel.module is None:
            raise ModelOptError("this QuantizedModel has no torch module to export")
        path = Path(path)
        start = time.perf_counter()
        module = qmodel.module.eval()
        device = next(module.parameters()).device
        imgsz = qmodel.base.imgsz
        w4_format = self.options.w4_format
        has_w4 = any(p.w_bits == 4 for _, p in qmodel.assignment.items())
        opset = 20 if (w4_format == "int4" and has_w4) else self.options.opset
        dummy = torch.zeros(1, 3, imgsz, imgsz, device=device)
        dynamic_axes = {"images": {0: "batch"}, "output0": {0: "batch"}}
        with atomic_path(path) as tmp, torch.no_grad(), quiet():
            torch.onnx.export(module, (dummy,), str(tmp), opset_version=opset, input_names=["images"],
                              output_names=["output0"], dynamic_axes=dynamic_axes, dynamo=False,
                              do_constant_folding=True)
            t_export = time.perf_counter() - start
            proto = onnx.load(str(tmp))
            t = time.perf_counter()
            rewrite = rewrite_weights(proto, module, qmodel, w4_format)
            t_rewrite = time.perf_counter() - t
            stamp_metadata(proto, qmodel, {"yolo_mpq.weight_storage": w4_format})
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
        seconds = time.perf_counter() - start
        graph_meta, provenance = export_metadata(
            proto, path, qmodel, backend=self.name, fmt="QDQ", options=self.options,
            exporter="torch.onnx.export (legacy TorchScript exporter, dynamo=False) with ModelOpt's Q/DQ "
                     "symbolics; quantized weights rewritten as integer initializers + DequantizeLinear")
        counts = graph_meta["node_counts"]
        metadata = {
            **graph_meta,
            "weight_storage": WEIGHT_STORAGE[w4_format],
            "w4_format": w4_format,
            "modelopt_w4_export": MODELOPT_W4_EXPORT,
            "weight_rewrite": rewrite,
            "activations": "A8 layer inputs: QuantizeLinear -> DequantizeLinear per tensor, int8, zero point 0, "
                           f"scale amax/127 ({self.options.calibration} calibration)",
            **provenance,
            "device": str(device),
            "export_seconds": {"torch_export": round(t_export, 4), "weight_rewrite": round(t_rewrite, 4),
                               "total": round(seconds, 4)},
        }
        write_json(metadata_path(path), metadata)
        return ExportResult(path=path, seconds=seconds, node_counts=counts, metadata=metadata)

    def emit(self, qmodel: QuantizedModel, path: Path | str, float_onnx: Path | str) -> ExportResult:
        """Write ``qmodel`` as QDQ ONNX at ``path`` by graph emission into ``float_onnx``
        (:mod:`quantizers.emit`, :mod:`quantizers.modelopt_emit`), without tracing. Raises
        :class:`~quantizers.emit.EmitUnsupported` for what it cannot write (then :meth:`export`)."""
        from quantizers.emit import write_emitted
        from quantizers.modelopt_emit import layer_params

        return write_emitted(qmodel, layer_params(qmodel, self.options.w4_format, integer_weight), float_onnx, path,
                             backend=self.name, options=self.options)

    @property
    def rounding(self) -> str:
        """How weights become integers (the ``weight_rounding`` option)."""
        return self.weights.method

    def rounded_weights(self, model: LoadedModel, calib: CalibrationSet) -> tuple[WeightStore, str]:
        """Every quantizable layer's cached integers and ModelOpt steps at 4 and 8 bits, and
        where they came from (``memory``, ``disk`` or ``computed``)."""
        return self.weights.get(model, calib)

    # -- internals ------------------------------------------------------------------------
    def _stats_key(self, calib: CalibrationSet) -> str:
        o = self.options
        method = o.calibration if o.calibration != "percentile" else f"percentile:{o.percentile}"
        from mpq.keys import calibration_key

        return json.dumps([method, calibration_key(calib.images, calib.paths, calib.batch_size), self.output_quant])

    def _input_stats(self, model: LoadedModel, calib: CalibrationSet) -> tuple[_InputStats, bool]:
        """Every quantizable layer's calibrated INT8 input range for ``model`` and ``calib``,
        computed once per backend instance and reused by later ``materialize`` calls.

        As in ModelOpt's own ``max_calibrate`` (stats collection turns quantization off in
        every quantizer), the statistics are collected on the float model, so they do not
        depend on the assignment.
        """
        key = self._stats_key(calib)
        cache = self._stats_cache
        if cache is not None and cache.key == key and cache.module() is model.module:
            return cache, True
        mtq = import_mtq()
        work = model.fresh().module.to(self.device).eval()
        names = [lay.name for lay in model.quantizable_layers]
        everything = Assignment({n: Precision(8 if self.output_quant else 16, 8) for n in names})
        with quiet():
            mtq.quantize(work, quant_config(everything, self.options, output_quant=self.output_quant))
        _, inputs = enabled_quantizers(work, everything)
        outputs = enabled_output_quantizers(work, everything) if self.output_quant else {}
        for q in (*inputs.values(), *outputs.values()):
            q.disable_quant()
            q.enable_calib()
        amax: dict[str, Any] = {}
        out_amax: dict[str, Any] = {}
        with quiet():
            _calibration_pass(work, calib, self.device)
            method = self.options.calibration
            for table, quantizers, what in ((amax, inputs, "input"), (out_amax, outputs, "output")):
                for name, q in quantizers.items():
                    try:
                        if method == "max":
                            q.load_calib_amax()
                        elif method == "entropy":
                            q.load_calib_amax("entropy")
                        else:
                            q.load_calib_amax("percentile", percentile=self.options.percentile)
                    except RuntimeError as exc:
                        raise ModelOptError(f"layer '{name}': {what} calibration failed: {exc}") from exc
                    table[name] = q.amax.detach().clone()
        del work
        self._stats_cache = _InputStats(key=key, module=weakref.ref(model.module), amax=amax, out_amax=out_amax)
        return self._stats_cache, False


@dataclass
class _InputStats:
    """Calibrated input ranges of every quantizable layer, for one model and calibration set."""

    key: str
    module: Callable[[], Any]
    amax: dict[str, Any] = field(default_factory=dict)
    out_amax: dict[str, Any] = field(default_factory=dict)
