"""Lowering: one step, for every backend, from a backend's Q/DQ export to the file a
deployment target runs.

Every backend exports what it computes (Brevitas: QCDQ; ModelOpt: QDQ with integer
weights); :func:`lower` rewrites that graph by the rules of one target, in one place per
target, keeping the backend's integer weights, scales and calibrated activation ranges:

====================  ==========================================================================
``ort-cpu``           :mod:`quantizers.lowering.ort_cpu`: A8 layers as the ``DQ -> Conv -> Q``
                      units ONNX Runtime fuses into ``QLinearConv`` (u8 activations, s8 weights,
                      int32 bias, output quantizer), the SiLU between them as
                      ``QLinearSigmoid`` + ``QLinearMul``, the ops between A8 layers on uint8
                      (:mod:`quantizers.lowering.ort_cpu_ops`: ``QLinearConcat``, ``QLinearAdd``,
                      Q/DQ dropped around data movement); weight-only layers as float values of
                      their grid
``tensorrt``          :mod:`quantizers.lowering.tensorrt`: explicit quantization (symmetric
                      int8 Q/DQ, axis-0 weights, nothing between a weight and its DQ)
``qcdq``              the backend's export, unchanged
====================  ==========================================================================

The file's rules are then checked statically (:mod:`quantizers.lowering.checks`) and the
result says, per layer, what it became, with the file's bytes and the packed weight bytes.
What ONNX Runtime actually runs is read back by :func:`evaluators.runtime.int8_layers`.

>>> from quantizers.lowering import lower
>>> result = lower("trial.export.onnx", "trial.onnx", target="ort-cpu", layers=model.layers)  # doctest: +SKIP
>>> result.int8_layers, result.violations                                                   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantizers.lowering.graph import LoweringError
from quantizers.lowering.options import DEPLOY_TARGETS, DeploySpec, DeployTarget

if TYPE_CHECKING:
    import numpy as np

    from quantizers.lowering.checks import Violation

__all__ = ["DEPLOY_TARGETS", "DeploySpec", "DeployTarget", "LoweringError", "LoweringResult", "TargetInfo",
           "lower", "metadata_path", "target_info"]


@dataclass(frozen=True)
class TargetInfo:
    """What a target asks of backends and what it says about its files."""

    name: str
    #: the backend must model (or the lowering calibrate) a quantizer on every A8 layer's output
    needs_output_quant: bool
    description: str
    notes: tuple[str, ...] = ()


def target_info(target: str) -> TargetInfo:
    """The rules summary of ``target`` (``ort-cpu``, ``tensorrt`` or ``qcdq``)."""
    if target == "ort-cpu":
        from quantizers.lowering import ort_cpu

        return TargetInfo(ort_cpu.NAME, ort_cpu.NEEDS_OUTPUT_QUANT,
                          "ONNX Runtime CPU: A8 layers as QLinearConv (u8 activations, s8 per-channel weights, int32 "
                          "bias, output quantizer); weight-only layers as float values of their grid",
                          (ort_cpu.W4_NOTE, ort_cpu.A16_NOTE))
    if target == "tensorrt":
        from quantizers.lowering import tensorrt

        return TargetInfo(tensorrt.NAME, tensorrt.NEEDS_OUTPUT_QUANT,
                          "TensorRT explicit quantization: symmetric int8 Q/DQ on inputs and weights (axis 0), "
                          "float biases; weight-only layers as float values of their grid",
                          (tensorrt.W4_NOTE, tensorrt.A16_NOTE))
    if target == "qcdq":
        return TargetInfo("qcdq", False, "the backend's export, unchanged (fake quantization)")
    raise LoweringError(f"unknown deploy target '{target}'; known: {', '.join(DEPLOY_TARGETS)}")


def metadata_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``<file>.json``: where a lowered file's metadata is written (as the backends do)."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


@dataclass(frozen=True)
class LoweringResult:
    """The lowered file and what is in it."""

    path: Path
    target: str
    seconds: float
    layers: Mapping[str, Mapping[str, Any]]
    violations: tuple[Violation, ...] = ()
    notes: tuple[str, ...] = ()
    node_counts: Mapping[str, int] = field(default_factory=dict)
    file_bytes: int = 0
    weight_bytes_packed: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def a8_layers(self) -> int:
        """Layers whose input is quantized (what the assignment asked at A8)."""
        return sum(1 for v in self.layers.values() if v.get("a_bits") == 8)

    @property
    def int8_layers(self) -> int:
        """Layers lowered to the target's integer-kernel form."""
        return sum(1 for v in self.layers.values() if v.get("form") == "qdq-int8")

    def summary(self) -> str:
        forms: dict[str, int] = {}
        for v in self.layers.values():
            forms[str(v.get("form"))] = forms.get(str(v.get("form")), 0) + 1
        text = ", ".join(f"{k} {n}" for k, n in sorted(forms.items()))
        rules = f"; {len(self.violations)} rule violation(s)" if self.violations else "; every rule holds"
        return f"{self.target}: {text}{rules}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "target": self.target, "seconds": round(self.seconds, 4),
                "a8_layers": self.a8_layers, "int8_layers": self.int8_layers,
                "violations": [v.to_dict() for v in self.violations], "notes": list(self.notes),
                "node_counts": dict(self.node_counts), "file_bytes": self.file_bytes,
                "weight_bytes_packed": self.weight_bytes_packed}


def packed_weight_bytes(layers: Sequence[Any]) -> int:
    """Bytes the layers' weights take in containers of their bit width (INT4 packed two per
    byte), plus a float32 scale per output channel of a quantized weight and float32 biases;
    float weights at 4 bytes."""
    import numpy as np

    total = 0.0
    for lq in layers:
        if lq.weight_int is not None:
            n = int(np.asarray(lq.weight_int).size)
            total += n * lq.w_bits / 8 + 4 * int(np.asarray(lq.w_q.scale).size)
        elif lq.weight_float is not None:
            total += 4 * int(np.asarray(lq.weight_float).size)
        if lq.bias is not None:
            total += 4 * int(np.asarray(lq.bias).size)
    return int(round(total))


def _asked(meta: Mapping[str, str], assignment: Mapping[str, str] | None) -> dict[str, str]:
    from mpq.onnx_nodes import assignment_from_metadata

    if assignment is not None:
        return {k: str(v) for k, v in assignment.items()}
    return assignment_from_metadata(meta)


def lower(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, target: str, layers: Sequence[Any] | None = None,
          assignment: Mapping[str, Any] | None = None, images: np.ndarray | None = None,
          options: DeploySpec | None = None, cache_dir: str | os.PathLike[str] | None = None,
          batch_size: int = 8) -> LoweringResult:
    """Lower the backend export ``src`` for ``target`` into ``dst`` (atomically) and write
    ``<dst>.json``.

    Args:
        src: the backend's exported ONNX (and its ``<src>.json`` metadata, if any).
        dst: the lowered file (may equal ``src`` for ``qcdq``).
        target: ``ort-cpu``, ``tensorrt`` or ``qcdq``.
        layers: the model's layer table (:class:`~mpq.assignment.LayerInfo`), to name the
            nodes; without it, names come from the exporter's scopes.
        assignment: layer name -> precision asked (default: the ``yolo_mpq.assignment``
            the backend stamped into the file), to record asked vs built per layer.
        images: calibration images, for output quantizers the backend did not model
            (``modelopt-onnx`` on ``ort-cpu``).
        options: the study's ``deploy`` section (calibration method of those quantizers,
            ``strict``).
        cache_dir: where those calibrated ranges are cached.

    Raises:
        LoweringError: a layer the target cannot express (the message names it and why),
            or, with ``options.strict``, a broken target rule.
    """
    import onnx

    from mpq.files import atomic_path, read_json, write_json
    from quantizers.lowering import graph as G
    from quantizers.lowering.checks import CHECKERS, RULES

    options = options or DeploySpec(target=target)  # type: ignore[arg-type]
    info = target_info(target)
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise LoweringError(f"nothing to lower: {src} does not exist")
    proto = G.load(src)
    source_meta = read_json(metadata_path(src)) if metadata_path(src).is_file() else {}
    names = G.layer_names(proto, layers, source=str(src))
    asked = _asked(G.metadata(proto), {k: str(v) for k, v in assignment.items()} if assignment is not None else None)
    if asked and layers is not None:  # the layers the assignment leaves out were asked float
        asked = {lay.name: asked.get(lay.name, "W16A16") for lay in layers} | asked
    qlayers = G.read_layers(proto, names, asked)
    packed = packed_weight_bytes(qlayers)
    notes: list[str] = list(info.notes)
    calibration: dict[str, Any] = {}
    activations: dict[str, Any] = {}
    if target == "qcdq":
        per_layer = {lq.name: {"node": lq.node.name, "op": lq.node.op_type, "w_bits": lq.w_bits,
                               "a_bits": 8 if lq.quantizes_inputs else 16, "form": "as-exported"} for lq in qlayers}
        if src.resolve() != dst.resolve():
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    else:
        if target == "ort-cpu":
            from quantizers.lowering import ort_cpu
            from quantizers.lowering.calibrate import output_ranges

            need = [lq for lq in qlayers if lq.quantizes_inputs and lq.quantizes_weights and lq.y_q is None]
            ranges: dict[str, Any] = {}
            if need:
                ranges, calibration = output_ranges(
                    proto, need, images if images is not None else _no_images(need), method=options.output_calibration,
                    percentile=options.output_percentile, batch_size=batch_size,
                    cache_dir=Path(cache_dir) if cache_dir is not None else None)
            per_layer = ort_cpu.lower(proto, qlayers, output_ranges=ranges)
            activations = {"activations_to_uint8": ort_cpu.activations_to_uint8(proto)}
            if options.int8_silu:
                activations.update(ort_cpu.int8_silu(proto))
                if options.int8_ops:
                    activations.update(_int8_ops(proto, activations, images, cache_dir, batch_size))
        else:
            from quantizers.lowering import tensorrt

            per_layer = tensorrt.lower(proto, qlayers)
        G.set_metadata(proto, {"yolo_mpq.deploy_target": target, "yolo_mpq.lowered_from": src.name,
                               "yolo_mpq.deploy_notes": " | ".join(notes)})
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as exc:
            raise LoweringError(f"{src}: the graph lowered for {target} is not valid ONNX: {str(exc)[:400]}") from None
        with atomic_path(dst) as tmp:
            onnx.save(proto, str(tmp))
    for lname, entry in per_layer.items():
        want = asked.get(lname)
        if want is not None:
            entry["asked"] = want
            built = f"W{entry['w_bits']}A{entry['a_bits']}"
            if want != built and not (want == "W16A16" and built == "W16A16"):
                entry["mismatch"] = f"the graph holds {built}"
    violations: list[Any] = []
    if target == "ort-cpu":
        from quantizers.lowering.checks import check_ort_cpu

        a8 = {str(v["node"]) for k, v in per_layer.items()
              if str(v.get("asked", f"W{v['w_bits']}A{v['a_bits']}")).endswith("A8")}
        violations = check_ort_cpu(dst, a8_nodes=a8)
    elif target in CHECKERS:
        violations = list(CHECKERS[target](dst if target != "qcdq" else proto))
    if violations and options.strict:
        shown = "\n".join(f"  - {v}" for v in violations[:10])
        raise LoweringError(f"{dst}: the file lowered for {target} breaks {len(violations)} rule(s) "
                            f"(deploy.strict is set):\n{shown}")
    seconds = time.perf_counter() - start
    lowered = G.load(dst) if target != "qcdq" else proto
    counts = G.op_counts(lowered)
    q_counts = {k: v for k, v in counts.items() if k in ("QuantizeLinear", "DequantizeLinear", "Clip")}
    result_meta: dict[str, Any] = {
        "format": {"ort-cpu": "QDQ for ONNX Runtime CPU (QLinearConv units)", "tensorrt": "QDQ for TensorRT "
                   "(explicit quantization)", "qcdq": "the backend's export (QCDQ/QDQ, unchanged)"}[target],
        "deploy": {"target": target, "description": info.description, **options.model_dump(mode="json")},
        "rules": dict(RULES.get(target, {})),
        "violations": [v.to_dict() for v in violations],
        "notes": notes,
        "layers": per_layer,
        "summary": {"a8_layers": sum(1 for v in per_layer.values() if v.get("a_bits") == 8),
                    "int8_layers": sum(1 for v in per_layer.values() if v.get("form") == "qdq-int8"),
                    "float_grid_layers": sum(1 for v in per_layer.values() if v.get("form") == "float-grid"),
                    **activations},
        "node_counts": q_counts,
        "op_counts": counts,
        "sizes": {"file_bytes": dst.stat().st_size, "weight_bytes_packed": packed,
                  "explain": "file_bytes: the ONNX file on disk; weight_bytes_packed: the layers' weights in "
                             "containers of their bit width (INT4 two per byte) + per-channel float32 scales + "
                             "float32 biases, what an INT4/INT8 engine would hold"},
        "output_calibration": calibration,
        "activations": activations,
        "lowering_seconds": round(seconds, 4),
        "source": {"path": str(src), "metadata": source_meta},
    }
    write_json(metadata_path(dst), result_meta)
    return LoweringResult(path=dst, target=target, seconds=seconds, layers=per_layer, violations=tuple(violations),
                          notes=tuple(notes), node_counts=q_counts, file_bytes=dst.stat().st_size,
                          weight_bytes_packed=packed, metadata=result_meta)


def _int8_ops(proto: Any, silu: Mapping[str, Any], images: np.ndarray | None,
              cache_dir: str | os.PathLike[str] | None, batch_size: int) -> dict[str, Any]:
    """``deploy.int8_ops`` (:mod:`quantizers.lowering.ort_cpu_ops`), calibrating on ``images`` the
    grids no quantizer gives; the SiLU counts are those of both passes."""
    from quantizers.lowering.calibrate import tensor_ranges
    from quantizers.lowering.ort_cpu_ops import int8_ops

    info: dict[str, Any] = {}

    def ranges(tensors: Sequence[str]) -> dict[str, Any]:
        assert images is not None
        out, info["int8_ops_calibration"] = tensor_ranges(
            proto, tensors, images, batch_size=batch_size, cache_dir=Path(cache_dir) if cache_dir is not None else None)
        return out

    found = int8_ops(proto, ranges if images is not None and len(images) else None)
    return {**found, "silu_int8": int(silu.get("silu_int8", 0)) + found["silu_int8"], **info}


def _no_images(need: Sequence[Any]) -> Any:
    raise LoweringError(f"{len(need)} A8 layers (e.g. '{need[0].name}') have no quantizer on their output, which "
                        "ort-cpu needs, and no calibration images were given to calibrate one")
