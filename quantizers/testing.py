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


def match_detections(ref: np.ndarray, out: np.ndarray, conf: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """For every confident detection of ``ref`` (rows ``[x1, y1, x2, y2, score, class]``),
    the IoU of the best same-class detection of ``out`` and the score difference to it.

    Works per image on (N, D, 6) arrays; the order of rows may differ (top-k ties).
    Returns two flat arrays (IoU, |score difference|), one entry per confident ``ref`` row.
    """
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


# --------------------------------------------------------------------------------------
# The suites
# --------------------------------------------------------------------------------------
class _Builds:
    @pytest.fixture(scope="class")
    def contract_workdir(self, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """Where this class's exports go."""
        return tmp_path_factory.mktemp("backend-contract")

    @staticmethod
    def build(backend: Any, model: Any, assignment: Assignment, calib: Any, workdir: Path, tag: str) -> Any:
        """Materialize and export once per (backend, model, assignment) per session."""
        key = (backend.name, id(backend), id(model), tag, assignment.digest())
        if key not in _BUILDS:
            qmodel = backend.materialize(model, assignment, calib)
            result = backend.export(qmodel, workdir / backend.name / f"{tag}-{assignment.digest()}.onnx")
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
        wrong = {}
        for lay in model.layers:
            want = assignment.get(lay.name)
            got = found.get(lay.name)
            if got is None or (got.w_bits, got.a_bits) != (want.w_bits, want.a_bits):
                wrong[lay.name] = (str(want), got.label if got else "missing", got.weight_detail if got else "",
                                   got.input_detail if got else "")
        assert not wrong, f"layers whose ONNX precision differs from the assignment: {wrong}"
        assert {str(p) for p in assignment.precisions.values()} == set(map(str, conv_precisions(backend)))

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
        assert low == {layer: str(p)}
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
        """The fake-quant model and its ONNX agree within the measured noise floor."""
        import torch

        model = contract_model
        qmodel, result = self.build(backend, model, mixed_assignment(model, backend), contract_calib,
                                    contract_workdir, "mixed")
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
        assert np.percentile(ious, 5) >= min(np.percentile(f_ious, 5) - 0.02, 0.98), stats
        assert (ious == 0).mean() <= (f_ious == 0).mean() + 0.02, "confident torch detections missing in ONNX: " + stats
