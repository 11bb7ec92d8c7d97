"""The contract every quantizer backend passes, as pytest test classes any backend can reuse.

Like ``optuna.testing``: a backend (of this repository or another package) subclasses
:class:`BackendContract` (and :class:`FakeQuantContract` when its ``materialize`` builds a torch
fake-quant model) in a test module that provides these fixtures:

- ``backend``: the backend instance under test;
- ``contract_model``: a :class:`~mpq.model.LoadedModel`, a real trained detector (random
  weights give near-zero activations: numeric checks on them prove nothing);
- ``contract_calib``: a :class:`~mpq.data.CalibrationSet` for it;
- ``contract_images``: a few preprocessed images ``(N, 3, S, S)`` float32 (N >= 4).

::

    import pytest
    from quantizers.testing import BackendContract

    @pytest.fixture(scope="module")
    def backend():
        return MyBackend(options=MyOptions(), device="cpu")

    class TestMyBackend(BackendContract):
        pass

Each test chooses precisions from the backend's declared capabilities, so the suite is
backend-agnostic:

- capabilities are declared, and asking for anything else (a precision the backend does not
  list, a layer that is not quantizable, a layer that does not exist) is an error naming the
  layer and the precision;
- ``materialize`` never modifies the model it is given;
- any assignment (one mixing every supported precision with float layers, one single-layer
  assignment, the empty assignment) materializes, exports to ONNX with the float model's
  input/output layout and dynamic batch, and runs in ONNX Runtime;
- the precisions read back from the ONNX graph (:mod:`quantizers.onnx_inspect`) are exactly
  where the assignment put them, float layers included;
- (:class:`FakeQuantContract`) the torch fake-quant model and the ONNX agree on real images.

A backend built for a deployment target (its ``target`` attribute, ``deploy.target`` of the
spec: ``ort-cpu``, ``tensorrt``) is checked on the file lowered for that target
(:func:`quantizers.lowering.lower`), which is what every trial measures: on ``ort-cpu`` a
weight-only layer holds float values of its grid (no DequantizeLinear), and a layer reading an
int8 layer's output reads it through that layer's output quantizer (an 8-bit input).

Tolerance of the torch-vs-ONNX check, measured rather than guessed: Q/DQ nodes compute
exactly what the torch quantizers compute, but the float convolutions accumulate in a
different order, so an A8 input within float rounding of a quantization boundary flips by one
step, and downstream A8 layers turn those flips into more flips. The same happens inside
torch alone: the same fake-quant model run with oneDNN disabled (a different convolution
implementation) differs from itself about as much. So the test measures that noise floor for
the model at hand (torch vs torch with oneDNN off) and requires torch vs ONNX to stay within
twice of it, with absolute floors (median score difference 0.005, 95th percentile 0.02, IoU
0.98 for the 5th percentile) for models whose floor is zero. Detections are compared, not
tensors (top-k order can swap among near ties). A wrong scale, zero point, bit width or
output layout moves boxes and scores far beyond the floor; a wrong precision in the graph is
caught by the read-back test.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpq.assignment import ACT_BITS, FLOAT, WEIGHT_BITS, Assignment, Precision
from mpq.errors import UserError
from quantizers.base import Capabilities, UnsupportedPrecisionError, count_qdq_nodes
from quantizers.onnx_inspect import layer_precisions

ALL_LOW = [Precision(w, a) for w in WEIGHT_BITS for a in ACT_BITS if (w, a) != (16, 16)]

_BUILDS: dict[tuple[Any, ...], Any] = {}


# --------------------------------------------------------------------------------------
# Helpers (also used by backend-specific tests)
# --------------------------------------------------------------------------------------
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``a`` (N, 4) against ``b`` (M, 4)."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:4] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:4] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def as_rows(x: np.ndarray) -> np.ndarray:
    """Detections as (N, D, 6) rows ``[x1, y1, x2, y2, score, class]``: end-to-end outputs as
    they are, raw one-to-many outputs (N, 4 + nc, anchors) decoded with NMS (conf 0.001, IoU 0.7)."""
    x = np.asarray(x, np.float32)
    if x.ndim == 3 and x.shape[-1] == 6:
        return x
    import torch
    from torchvision.ops import batched_nms

    rows: list[np.ndarray] = []
    for pred in x:
        p = pred.T  # (anchors, 4 + nc)
        cls = p[:, 4:].argmax(1)
        score = p[np.arange(len(p)), 4 + cls]
        keep = score > 0.001
        xy, wh = p[keep, :2], p[keep, 2:4]
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
        kept = batched_nms(torch.from_numpy(boxes), torch.from_numpy(score[keep]), torch.from_numpy(cls[keep]),
                           0.7).numpy()[:300]
        rows.append(np.concatenate([boxes[kept], score[keep][kept, None], cls[keep][kept, None]], 1))
    out = np.zeros((len(rows), max(max((len(r) for r in rows), default=0), 1), 6), np.float32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def match_detections(ref: np.ndarray, out: np.ndarray, conf: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """For every confident detection of ``ref`` (rows ``[x1, y1, x2, y2, score, class]``),
    the IoU of the best same-class detection of ``out`` and the score difference to it.

    Works per image on (N, D, 6) arrays (raw outputs are decoded first, :func:`as_rows`); the
    order of rows may differ (top-k ties). Returns two flat arrays (IoU, |score difference|),
    one entry per confident ``ref`` row.
    """
    ref, out = as_rows(ref), as_rows(out)
    ious: list[float] = []
    dscores: list[float] = []
    assert ref.shape[0] == out.shape[0], "different batch sizes"
    for r_img, o_img in zip(ref, out, strict=True):
        r = r_img[r_img[:, 4] > conf]
        o = o_img[o_img[:, 4] > conf / 4]
        for det in r:
            same = o[o[:, 5] == det[5]]
            if len(same) == 0:
                ious.append(0.0)
                dscores.append(float(det[4]))
                continue
            iou = box_iou(det[None, :4], same[:, :4])[0]
            k = int(iou.argmax())
            ious.append(float(iou[k]))
            dscores.append(float(abs(same[k, 4] - det[4])))
    return np.array(ious), np.array(dscores)


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """Run an exported model (input ``images``, output ``output0``) in ONNX Runtime on the CPU."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["output0"]
    return sess.run(None, {"images": images})[0]


def run_torch(module: Any, images: np.ndarray) -> np.ndarray:
    """Run a torch detector on ``images`` on its own device."""
    import torch

    device = next(module.parameters()).device
    with torch.no_grad():
        return module(torch.from_numpy(images).to(device)).cpu().numpy()


def state_digest(module: Any) -> str:
    """A digest of a module's state dict (to prove it was not modified)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def conv_precisions(backend: Any) -> list[Precision]:
    """The low precisions ``backend`` builds for Conv2d layers."""
    return sorted(p for p in backend.capabilities.allowed("Conv2d") if not p.is_float)


def mixed_assignment(model: Any, backend: Any) -> Assignment:
    """Every supported precision cycled over the quantizable layers; every 6th layer float."""
    precs = conv_precisions(backend)
    low = [lay for i, lay in enumerate(model.quantizable_layers) if i % 6 != 5]
    return Assignment({lay.name: precs[k % len(precs)] for k, lay in enumerate(low)})


def target_of(backend: Any) -> str:
    """The deployment target ``backend`` was built for (``qcdq``: its export as it is)."""
    return str(getattr(backend, "target", "qcdq"))


def graph_precision(backend: Any, precision: Precision) -> tuple[int, int]:
    """The (w_bits, a_bits) the graph itself shows for a layer built at ``precision``: on
    ort-cpu a weight-only layer holds float values of its grid (no DequantizeLinear)."""
    if target_of(backend) == "ort-cpu" and not precision.quantizes_inputs:
        return 16, 16
    return precision.w_bits, precision.a_bits


def reads_int8_output(path: Path) -> set[str]:
    """Layers whose input is the dequantized output of an integer Conv (``Conv -> Q -> DQ ->
    layer``, no activation between): on ort-cpu every reader of an int8 layer's output reads
    it through that layer's output quantizer, so the graph shows them an 8-bit input."""
    import onnx

    from mpq.onnx_nodes import module_name_from_node
    from quantizers.lowering.graph import GraphIndex

    model = onnx.load(str(path))
    index = GraphIndex(model)
    out = set()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        dq = index.producer.get(node.input[0])
        q = index.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        src = index.producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
        name = module_name_from_node(node.name)
        if src is not None and src.op_type == "Conv" and name is not None:
            out.add(name)
    return out


def assert_on_grid(path: Path, bits: dict[str, int]) -> None:
    """Weight-only layers lowered as float: every output channel holds at most 2**bits distinct
    values (the quantized grid), as float32 initializers."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    for layer, b in bits.items():
        w = numpy_helper.to_array(inits[f"{layer}.weight"])
        assert w.dtype == np.float32, layer
        per_channel = max(len(np.unique(c)) for c in w.reshape(w.shape[0], -1))
        assert per_channel <= 2 ** b, f"{layer}: {per_channel} distinct values in a channel, more than {b} bits hold"


@dataclass(frozen=True)
class LoweredBuild:
    """A backend's export lowered for its target: ``path``/``node_counts`` are the lowered file's."""

    path: Path
    seconds: float
    node_counts: dict[str, int]
    lowering: Any
    export: Any


# --------------------------------------------------------------------------------------
# The suites
# --------------------------------------------------------------------------------------
class _Builds:
    @pytest.fixture(scope="class")
    def contract_workdir(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """Where this class's exports go."""
        return tmp_path_factory.mktemp("backend-contract")

    @staticmethod
    def build(backend: Any, model: Any, assignment: Assignment, calib: Any, workdir: Path, tag: str,
              deploy: Any = None) -> Any:
        """Materialize, export and lower (for the backend's target, with ``deploy``: a
        :class:`~mpq.options.DeploySpec`, default options when ``None``) once per (backend,
        model, assignment, tag) per session."""
        target = target_of(backend)
        key = (backend.name, id(backend), id(model), target, tag, assignment.digest())
        if key not in _BUILDS:
            qmodel = backend.materialize(model, assignment, calib)
            folder = workdir / backend.name / target
            if target == "qcdq":
                result = backend.export(qmodel, folder / f"{tag}-{assignment.digest()}.onnx")
            else:
                from quantizers.lowering import lower

                export = backend.export(qmodel, folder / f"{tag}-{assignment.digest()}.export.onnx")
                lowered = lower(export.path, folder / f"{tag}-{assignment.digest()}.onnx", target=target,
                                layers=model.layers, images=calib.images, options=deploy)
                result = LoweredBuild(path=lowered.path, seconds=export.seconds + lowered.seconds,
                                      node_counts=dict(lowered.node_counts), lowering=lowered, export=export)
            _BUILDS[key] = (qmodel, result)
        return _BUILDS[key]


class BackendContract(_Builds):
    """What every backend must do (fixtures: see the module docstring)."""

    def test_capabilities_are_declared(self, backend: Any) -> None:
        """Capabilities name the backend and list precisions per op kind; float is allowed."""
        caps = backend.capabilities
        assert isinstance(caps, Capabilities) and caps.backend == backend.name
        assert conv_precisions(backend), "a backend must build at least one low precision for Conv2d"
        for kind, precs in caps.precisions.items():
            assert kind in ("Conv2d", "Linear")
            assert all(isinstance(p, Precision) for p in precs)
        assert FLOAT in caps.allowed("Conv2d")

    def test_unsupported_requests_name_layer_and_precision(self, backend: Any, contract_model: Any,
                                                           contract_calib: Any) -> None:
        """Asking for what the backend cannot build names the layer and the precision."""
        model = contract_model
        layer = model.quantizable_layers[3].name
        for p in [p for p in ALL_LOW if p not in backend.capabilities.allowed("Conv2d")]:
            with pytest.raises(UnsupportedPrecisionError) as err:
                backend.materialize(model, Assignment({layer: p}), contract_calib)
            assert layer in str(err.value) and str(p) in str(err.value)
        low = conv_precisions(backend)[0]
        fixed = [lay.name for lay in model.layers if not lay.quantizable]
        if fixed:
            with pytest.raises(UnsupportedPrecisionError) as err:
                backend.materialize(model, Assignment({fixed[0]: low}), contract_calib)
            assert fixed[0] in str(err.value) and str(low) in str(err.value)
        with pytest.raises(UserError, match="model.99.conv"):
            backend.materialize(model, Assignment({"model.99.conv": low}), contract_calib)

    def test_materialize_never_modifies_the_model(self, backend: Any, contract_model: Any, contract_calib: Any,
                                                  contract_images: np.ndarray, contract_workdir: Path) -> None:
        """The float model is untouched: state, module types and outputs."""
        model = contract_model
        before = state_digest(model.module)
        types_before = [type(m).__name__ for m in model.module.modules()]
        out_before = run_torch(model.module, contract_images[:2])
        self.build(backend, model, mixed_assignment(model, backend), contract_calib, contract_workdir, "mixed")
        assert state_digest(model.module) == before
        assert [type(m).__name__ for m in model.module.modules()] == types_before
        np.testing.assert_array_equal(run_torch(model.module, contract_images[:2]), out_before)

    def test_mixed_assignment_exports_with_the_float_layout(self, backend: Any, contract_model: Any,
                                                            contract_calib: Any, contract_images: np.ndarray,
                                                            contract_workdir: Path) -> None:
        """A mixed assignment exports with the float model's input, output and dynamic batch."""
        model = contract_model
        assignment = mixed_assignment(model, backend)
        qmodel, result = self.build(backend, model, assignment, contract_calib, contract_workdir, "mixed")
        assert qmodel.backend == backend.name and qmodel.assignment == assignment
        assert result.path.is_file() and result.seconds > 0
        assert dict(result.node_counts) == count_qdq_nodes(result.path)
        assert result.node_counts.get("DequantizeLinear", 0) > 0
        out = run_onnx(result.path, contract_images[:3])  # dynamic batch: 3 was never traced
        assert out.shape == model.output_shape(3)
        assert np.isfinite(out).all()

    def test_precisions_in_the_graph_are_where_the_assignment_put_them(self, backend: Any, contract_model: Any,
                                                                       contract_calib: Any,
                                                                       contract_workdir: Path) -> None:
        """The graph holds each layer at its assigned precision, float layers included."""
        model = contract_model
        assignment = mixed_assignment(model, backend)
        _, result = self.build(backend, model, assignment, contract_calib, contract_workdir, "mixed")
        found = layer_precisions(result.path)
        lowering = getattr(result, "lowering", None)
        via_output = reads_int8_output(result.path) if lowering is not None else set()
        wrong = {}
        for lay in model.layers:
            want = assignment.get(lay.name)
            got = found.get(lay.name)
            expect = graph_precision(backend, want)
            if got is not None and lay.name in via_output and not want.quantizes_inputs and got.a_bits == 8:
                expect = (expect[0], 8)  # reads an int8 layer's dequantized output
            if got is None or (got.w_bits, got.a_bits) != expect:
                wrong[lay.name] = (str(want), got.label if got else "missing", got.weight_detail if got else "",
                                   got.input_detail if got else "")
        assert not wrong, f"layers whose ONNX precision differs from the assignment: {wrong}"
        assert {str(p) for p in assignment.precisions.values()} == set(map(str, conv_precisions(backend)))
        if lowering is not None:  # what each layer was lowered from, as the lowering read it from the export
            built = {k: f"W{v['w_bits']}A{v['a_bits']}" for k, v in lowering.layers.items()}
            assert {k: v for k, v in built.items() if v != "W16A16"} == {k: str(p) for k, p in assignment.items()}
            grid = [k for k, v in lowering.layers.items() if v["form"] == "float-grid"]
            assert sorted(grid) == sorted(k for k, p in assignment.items()
                                          if p.quantizes_weights and not p.quantizes_inputs)
            assert_on_grid(result.path, {k: assignment[k].w_bits for k in grid})

    def test_single_layer_assignment_touches_only_that_layer(self, backend: Any, contract_model: Any,
                                                             contract_calib: Any, contract_workdir: Path) -> None:
        """Quantizing one layer changes that layer only."""
        model = contract_model
        layer = model.quantizable_layers[7].name
        p = conv_precisions(backend)[0]
        qmodel, result = self.build(backend, model, Assignment({layer: p}), contract_calib, contract_workdir,
                                    "single")
        found = layer_precisions(result.path)
        low = {name: g.label for name, g in found.items() if (g.w_bits, g.a_bits) != (16, 16)}
        gp = graph_precision(backend, p)
        assert low == ({layer: f"W{gp[0]}A{gp[1]}"} if gp != (16, 16) else {})
        if qmodel.module is not None:
            base = dict(model.module.named_modules())
            changed = [n for n, m in qmodel.module.named_modules()
                       if n in base and n != "" and type(m) is not type(base[n])]
            assert [n for n in changed if not n.startswith(layer + ".")] == [layer]

    def test_empty_assignment_stays_float(self, backend: Any, contract_model: Any, contract_calib: Any,
                                          contract_images: np.ndarray, contract_workdir: Path) -> None:
        """The empty assignment exports a float graph that matches the float model."""
        model = contract_model
        _, result = self.build(backend, model, Assignment({}), contract_calib, contract_workdir, "empty")
        counts = count_qdq_nodes(result.path)
        assert counts.get("QuantizeLinear", 0) == counts.get("DequantizeLinear", 0) == 0
        assert all(g.label == "W16A16" for g in layer_precisions(result.path).values())
        ref = run_torch(model.module, contract_images[:4])
        out = run_onnx(result.path, contract_images[:4])
        ious, dscore = match_detections(ref, out)
        assert len(ious) > 0
        assert ious.min() > 0.999 and dscore.max() < 1e-3


class FakeQuantContract(_Builds):
    """What a backend that materializes a torch fake-quant model must also do."""

    def test_torch_and_onnx_agree_on_real_images(self, backend: Any, contract_model: Any, contract_calib: Any,
                                                 contract_images: np.ndarray, contract_workdir: Path) -> None:
        """The fake-quant model and its ONNX agree within the measured noise floor.

        The file is lowered as the torch model computes it: on ``ort-cpu`` without
        ``deploy.int8_silu``, a deliberate further approximation (the SiLU on integers) that
        no backend's torch model carries; its cost is measured on the file (mAP), not here."""
        import torch

        from mpq.options import DeploySpec

        model = contract_model
        target = target_of(backend)
        deploy = DeploySpec.model_validate({"target": target, "int8_silu": False}) if target != "qcdq" else None
        qmodel, result = self.build(backend, model, mixed_assignment(model, backend), contract_calib,
                                    contract_workdir, "mixed-as-modelled", deploy)
        assert qmodel.module is not None, f"backend '{backend.name}' should build a torch fake-quant model"
        torch_out = run_torch(qmodel.module, contract_images)
        onnx_out = run_onnx(result.path, contract_images)
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False):
            torch_alt = run_torch(qmodel.module, contract_images)  # the same model, another accumulation order
        ious, dscore = match_detections(torch_out, onnx_out, conf=0.25)
        f_ious, f_dscore = match_detections(torch_out, torch_alt, conf=0.25)
        assert len(ious) >= 5, "too few confident detections to compare"
        stats = (f"torch vs ONNX: IoU p5 {np.percentile(ious, 5):.4f}, score diff median {np.median(dscore):.4f} "
                 f"p95 {np.percentile(dscore, 95):.4f}; noise floor (torch vs torch): IoU p5 "
                 f"{np.percentile(f_ious, 5):.4f}, median {np.median(f_dscore):.4f} "
                 f"p95 {np.percentile(f_dscore, 95):.4f}")
        assert np.median(dscore) <= max(2 * np.median(f_dscore), 0.005), stats
        assert np.percentile(dscore, 95) <= max(2 * np.percentile(f_dscore, 95), 0.02), stats
        # 0.04: an integer kernel's per-layer requantization flips rounding ties that a float
        # fake-quant run does not, and the flips compound over up to ~80 quantized layers in series
        # (measured on the demo, ort-cpu, mixed: IoU p5 0.935 against a torch-vs-torch floor of 0.969)
        assert np.percentile(ious, 5) >= min(np.percentile(f_ious, 5) - 0.04, 0.98), stats
        assert (ious == 0).mean() <= (f_ious == 0).mean() + 0.02, "confident torch detections missing in ONNX: " + stats
