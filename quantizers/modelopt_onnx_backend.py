"""ModelOpt ONNX backend: INT8 PTQ of the float ONNX (``modelopt.onnx.quantization``) with per-node exclusions.

A restricted backend: each Conv layer is **W8A8 or float** (ModelOpt's ONNX INT8 mode
quantizes a Conv's input and weight together); its capabilities say so, so the search
never proposes anything else. :meth:`ModelOptOnnxBackend.materialize` works on ONNX only
(``QuantizedModel.module`` is ``None``; ``onnx_path`` is the built file):

1. the float model is exported once per backend instance (:func:`mpq.model.export_onnx`) and
   every layer is mapped to its ``Conv`` node (:func:`quantizers.onnx_names.map_layers_to_nodes`);
2. ModelOpt quantizes exactly the Conv nodes of the W8A8 layers (``nodes_to_quantize``;
   every other Conv node in ``nodes_to_exclude``), calibrated on the study's calibration
   images fed one image per step (``max`` or ``entropy``; ORT's entropy calibrator only
   clips once later batches widen its histogram), weights as int8 initializers (``dq_only``);
3. the result is checked node by node against the assignment (:func:`check_graph`); a float
   layer that ModelOpt fed a shared quantized input is rewired to the float tensor.

:meth:`ModelOptOnnxBackend.export` copies that file with the assignment stamped in its
``metadata_props`` and a ``<file>.json`` beside it. ModelOpt refuses some small convolutions
for INT8; :func:`~quantizers.modelopt_onnx_options.int8_conv_supported` applies the same
rule per layer and ``materialize`` double-checks with ModelOpt's own function.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpq.assignment import Assignment
from mpq.errors import UserError
from quantizers.base import (
    CalibrationSet,
    Capabilities,
    ExportResult,
    QuantizedModel,
    UnsupportedPrecisionError,
    export_metadata,
    metadata_path,
    stamp_metadata,
)
from quantizers.modelopt_onnx_options import (  # noqa: F401 - int8_conv_supported: part of this backend's API
    CAPABILITIES,
    INSTALL_HINT,
    NAME,
    W8A8,
    ModelOptOnnxOptions,
    OnnxInt8Capabilities,
    int8_conv_supported,
)

if TYPE_CHECKING:
    import onnx

    from mpq.model import LoadedModel
    from quantizers.onnx_names import LayerNodeMap


class ModelOptOnnxError(UserError):
    """A ModelOpt ONNX backend problem the user can fix (options, environment, model)."""


@contextlib.contextmanager
def _captured_modelopt_output(log_file: Path) -> Any:
    """Send ModelOpt's console logging, ORT's calibration prints and progress bars to a buffer
    (ModelOpt's own log goes to ``log_file``)."""
    import warnings

    buf = io.StringIO()
    logger = logging.getLogger("modelopt.onnx")
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        try:
            yield buf
        finally:
            for h in list(logger.handlers):
                if getattr(h, "stream", None) is buf:
                    logger.removeHandler(h)
                elif isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file:
                    h.close()
                    logger.removeHandler(h)


@dataclass
class _FloatGraph:
    """The float ONNX of one model (exported once per backend instance) and its node map."""

    path: Path
    module: Any  # weakref to the exported module
    imgsz: int
    node_map: LayerNodeMap
    unsupported: frozenset[str]
    seconds: float


class ModelOptOnnxBackend:
    """ModelOpt ONNX INT8 PTQ backend (see the module docstring).

    Args:
        options: the study's ``backend`` section (:class:`~quantizers.modelopt_onnx_options.ModelOptOnnxOptions`);
            defaults when ``None``.
        device: accepted for the common constructor; calibration runs on the ONNX Runtime
            providers of ``options.calibration_eps``.
    """

    name = NAME
    capabilities: Capabilities = CAPABILITIES

    def __init__(self, *, options: ModelOptOnnxOptions | None = None, device: str = "cpu") -> None:
        if options is None:
            options = ModelOptOnnxOptions()
        if not isinstance(options, ModelOptOnnxOptions):
            raise ModelOptOnnxError(f"the modelopt-onnx backend needs ModelOptOnnxOptions, got "
                                    f"{type(options).__name__} (backend name '{getattr(options, 'name', '?')}')")
        self.options = options
        self.device = device
        self._workdir = Path(tempfile.mkdtemp(prefix="yolo-mpq-modelopt-onnx-"))
        weakref.finalize(self, shutil.rmtree, self._workdir, True)
        self._float: _FloatGraph | None = None

    # -- public API -----------------------------------------------------------------------
    def materialize(self, model: LoadedModel, assignment: Assignment, calib: CalibrationSet) -> QuantizedModel:
        """Build ``assignment`` from the float ONNX of ``model`` (never modifying ``model``),
        calibrated on ``calib``."""
        start = time.perf_counter()
        self.capabilities.check(model.layers, assignment)
        timings: dict[str, float] = {}
        fg, cached = self._float_graph(model)
        timings["float_export"] = 0.0 if cached else fg.seconds
        refused = sorted(name for name in assignment if fg.node_map.node(name) in fg.unsupported)
        if refused:
            raise UnsupportedPrecisionError(self.name, refused[0], assignment[refused[0]], [],
                                            "ModelOpt's INT8 mode excludes this Conv node")
        # its own folder, removed with the QuantizedModel (not with this backend instance)
        outdir = Path(tempfile.mkdtemp(prefix="yolo-mpq-modelopt-onnx-q-"))
        out = outdir / "model.onnx"
        quantized = {fg.node_map.node(name) for name in assignment}
        others = sorted(set(fg.node_map.nodes.values()) - quantized)
        log_text = ""
        if not quantized:
            shutil.copyfile(fg.path, out)
            timings["quantize"] = 0.0
        else:
            if len(calib) == 0:
                raise ModelOptOnnxError("W8A8 layers need calibration images, but the calibration set is empty")
            t = time.perf_counter()
            log_text = self._quantize(fg.path, out, sorted(quantized), others, calib, outdir / "modelopt.log")
            timings["quantize"] = time.perf_counter() - t
        t = time.perf_counter()
        check = check_graph(out, model, assignment)
        timings["check"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - start
        info = {
            "options": self.options.model_dump(mode="json"),
            "float_onnx": str(fg.path),
            "float_onnx_cached": cached,
            "nodes_quantized": len(quantized),
            "nodes_excluded": len(others),
            "graph_check": check,
            "calibration_images": len(calib),
            "modelopt_log_tail": log_text[-2000:],
        }
        qmodel = QuantizedModel(backend=self.name, assignment=assignment, base=model, module=None,
                                onnx_path=out, timings=timings, info=info)
        weakref.finalize(qmodel, shutil.rmtree, outdir, True)
        return qmodel

    def export(self, qmodel: QuantizedModel, path: Path | str) -> ExportResult:
        """Write ``qmodel``'s QDQ ONNX at ``path`` (atomically) and its metadata at ``<path>.json``."""
        import onnx

        from mpq.files import atomic_path, write_json

        if qmodel.onnx_path is None or not Path(qmodel.onnx_path).is_file():
            raise ModelOptOnnxError(f"this QuantizedModel has no ONNX file to export ({qmodel.onnx_path})")
        path = Path(path)
        start = time.perf_counter()
        proto = onnx.load(str(qmodel.onnx_path))
        stamp_metadata(proto, qmodel, {"yolo_mpq.calibration": self.options.calibration})
        with atomic_path(path) as tmp:
            onnx.save(proto, str(tmp))
        seconds = time.perf_counter() - start
        graph_meta, provenance = export_metadata(
            proto, path, qmodel, backend=self.name, fmt="QDQ", options=self.options,
            exporter="modelopt.onnx.quantization.quantize (quantize_mode int8) on the float ONNX of "
                     "mpq.model.export_onnx (legacy exporter, dynamo=False)")
        counts = graph_meta["node_counts"]
        metadata = {
            **graph_meta,
            "weight_storage": {
                "8": ("int8 initializer -> DequantizeLinear (ModelOpt dq_only" if self.options.dq_only else
                      "float initializer -> QuantizeLinear -> DequantizeLinear (ModelOpt default")
                     + "; int8, axis 0, per-channel scale, zero point 0)",
                "16": "float32 initializer",
            },
            "activations": "W8A8 layer inputs: QuantizeLinear -> DequantizeLinear per tensor, int8, zero point 0 "
                           f"({self.options.calibration} calibration); one Q/DQ pair per tensor, shared by the "
                           "quantized consumers of that tensor",
            "graph_check": qmodel.info.get("graph_check", {}),
            **provenance,
            "export_seconds": {"total": round(seconds, 4)},
        }
        write_json(metadata_path(path), metadata)
        return ExportResult(path=path, seconds=seconds, node_counts=counts, metadata=metadata)

    # -- internals ------------------------------------------------------------------------
    def _float_graph(self, model: LoadedModel) -> tuple[_FloatGraph, bool]:
        """The float ONNX of ``model`` and its layer -> node map (exported once)."""
        fg = self._float
        if fg is not None and fg.module() is model.module and fg.imgsz == model.imgsz:
            return fg, True
        import onnx

        from mpq.model import export_onnx
        from quantizers.onnx_names import map_layers_to_nodes

        t = time.perf_counter()
        path = Path(tempfile.mkdtemp(prefix="float-", dir=self._workdir)) / "float.onnx"
        export_onnx(model.module, path, model.imgsz)
        node_map = map_layers_to_nodes(path, model.layers, source=f"float ONNX of {model.source}")
        unsupported = frozenset(_modelopt_unsupported_convs(onnx.load(str(path))))
        self._float = _FloatGraph(path=path, module=weakref.ref(model.module), imgsz=model.imgsz,
                                  node_map=node_map, unsupported=unsupported, seconds=time.perf_counter() - t)
        return self._float, False

    def _quantize(self, src: Path, out: Path, quantize: list[str], exclude: list[str], calib: CalibrationSet,
                  log_file: Path) -> str:
        """Run ModelOpt's INT8 PTQ; return what it printed."""
        try:
            import onnxruntime as ort
            from modelopt.onnx.quantization import quantize as mo_quantize
        except ImportError as exc:
            raise ModelOptOnnxError(f"the modelopt-onnx backend needs NVIDIA ModelOpt's ONNX path: {exc} "
                                    f"({INSTALL_HINT})") from exc
        # one image per calibration step, as ModelOpt does by default for a dynamic batch: its
        # entropy calibrator (ORT's, 128 histogram bins) only clips ranges when later batches
        # widen the histogram, so a single batch would give exactly the max ranges
        s = int(calib.images.shape[-1])
        ort.set_default_logger_severity(3)
        with _captured_modelopt_output(log_file) as buf:
            try:
                mo_quantize(
                    str(src),
                    quantize_mode="int8",
                    calibration_data={"images": calib.images},
                    calibration_shapes=f"images:1x3x{s}x{s}",
                    calibration_method=self.options.calibration,
                    calibration_eps=list(self.options.calibration_eps),
                    op_types_to_quantize=["Conv"],
                    nodes_to_quantize=[f"^{re.escape(x)}$" for x in quantize],
                    nodes_to_exclude=[f"^{re.escape(x)}$" for x in exclude],
                    output_path=str(out),
                    high_precision_dtype=self.options.high_precision_dtype,
                    dq_only=self.options.dq_only,
                    log_level="WARNING",
                    log_file=str(log_file),
                )
            except Exception as exc:
                tail = buf.getvalue()[-1500:]
                raise ModelOptOnnxError(f"ModelOpt ONNX INT8 quantization failed: {type(exc).__name__}: {exc}\n"
                                        f"ModelOpt output (tail):\n{tail}") from exc
        if not out.is_file():
            raise ModelOptOnnxError(f"ModelOpt ONNX quantization wrote no file at {out}; its output:\n"
                                    f"{buf.getvalue()[-1500:]}")
        return buf.getvalue()


def _modelopt_unsupported_convs(proto: onnx.ModelProto) -> list[str]:
    """Conv nodes ModelOpt's INT8 mode would exclude on its own (its own function, quietly)."""
    try:
        import onnx_graphsurgeon as gs
        from modelopt.onnx.quantization.graph_utils import find_nodes_from_convs_to_exclude
    except ImportError:
        return []
    logger = logging.getLogger("modelopt.onnx")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return list(find_nodes_from_convs_to_exclude(gs.import_onnx(proto), quantize_mode="int8"))
    finally:
        logger.setLevel(level)


def check_graph(path: Path, model: LoadedModel, assignment: Assignment) -> dict[str, Any]:
    """Check that exactly the W8A8 layers are quantized; rewire float layers fed by a
    shared quantized input back to the float tensor. Rewrites ``path`` if needed."""
    import onnx

    from quantizers.onnx_names import map_layers_to_nodes

    proto = onnx.load(str(path))
    nmap = map_layers_to_nodes(proto, model.layers, source="ModelOpt INT8 output")
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = {n.name: n for n in proto.graph.node}

    def dq_of(tensor: str) -> Any:
        p = producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    problems: list[str] = []
    rewired: list[str] = []
    for lay in model.layers:
        node = nodes[nmap.node(lay.name)]
        want = assignment.get(lay.name) == W8A8
        w_dq = dq_of(node.input[1])
        x_dq = dq_of(node.input[0])
        x_q = producer.get(x_dq.input[0]) if x_dq is not None else None
        has_w, has_x = w_dq is not None, x_q is not None and x_q.op_type == "QuantizeLinear"
        if want and not (has_w and has_x):
            problems.append(f"layer '{lay.name}' should be W8A8 but has weight DQ={has_w}, input Q/DQ={has_x}")
        elif not want:
            if has_w:
                problems.append(f"layer '{lay.name}' should be float but its weight is quantized")
            if has_x and x_q is not None:
                node.input[0] = x_q.input[0]  # shared Q/DQ of a quantized neighbour
                rewired.append(lay.name)
    if problems:
        raise ModelOptOnnxError("ModelOpt's INT8 graph does not match the assignment:\n"
                                + "\n".join(f"  - {p}" for p in problems[:10]))
    if rewired:
        onnx.save(proto, str(path))
    return {"layers": len(model.layers), "w8a8": len(assignment), "rewired_float_inputs": rewired}
