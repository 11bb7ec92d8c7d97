"""The backend contract (:mod:`quantizers.testing`) on every registered backend, on the real demo detector.

A backend that materializes a torch fake-quant model also runs the torch-vs-ONNX agreement
check (:class:`~quantizers.testing.FakeQuantContract`).

Every backend runs the suites twice (issue 12): for the research target ``qcdq`` (its export
as it is) and for ``ort-cpu`` (the backend models what the target runs, a quantizer on each A8
layer's output, and the export is lowered into ``QLinearConv`` units; the checks then apply to
the lowered file, and the torch model with its output quantizers must agree with it as closely
as the QCDQ export agrees with the model without them). On ``ort-cpu`` ONNX Runtime is also
asked what it runs: every layer quantizing input and weight must run as an integer kernel; and
the build lowered for ``tensorrt`` must pass TensorRT's rule checker.
"""

from __future__ import annotations

import pytest
from quantizer_helpers import cached, workdir

from mpq.errors import UserError
from quantizers import registry
from quantizers.testing import BackendContract, FakeQuantContract, mixed_assignment

#: Deploy targets every backend is built for (qcdq: the export as is; ort-cpu: lowered).
CONTRACT_TARGETS = ("qcdq", "ort-cpu")


def _backend(name: str, target: str = "qcdq"):
    try:
        return cached(f"backend:{name}:{target}", lambda: registry.get_backend(name, device="cpu", target=target))
    except UserError as exc:  # a backend whose framework is not installed here
        pytest.skip(f"backend '{name}' unavailable: {exc}")


@pytest.fixture(scope="module")
def contract_model(demo_model):
    return demo_model


@pytest.fixture(scope="module")
def contract_calib(calib):
    return calib


@pytest.fixture(scope="module")
def contract_images(images):
    return images


def _params(fake_quant_only: bool = False) -> list[tuple[str, str]]:
    names = [n for n, info in registry.backends().items() if info.fake_quant or not fake_quant_only]
    return [(n, t) for t in CONTRACT_TARGETS for n in names]


class TestBackendContract(BackendContract):
    @pytest.fixture(scope="class", params=_params(), ids=lambda p: f"{p[0]}-{p[1]}")
    def backend(self, request):
        return _backend(*request.param)


class TestFakeQuantContract(FakeQuantContract):
    @pytest.fixture(scope="class", params=_params(fake_quant_only=True), ids=lambda p: f"{p[0]}-{p[1]}")
    def backend(self, request):
        return _backend(*request.param)


def test_the_demo_model_has_one_fixed_layer(demo_model):
    """The DFL conv (fixed arange weights) is the demo model's only layer no backend may quantize."""
    assert [lay.name for lay in demo_model.layers if not lay.quantizable] == ["model.23.dfl.conv"]


# --------------------------------------------------------------------------------------
# ort-cpu: what ONNX Runtime runs; tensorrt: the rule checker
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", registry.names())
def test_ort_cpu_runs_every_integer_layer_as_an_integer_kernel(name, demo_model, calib):
    from evaluators.runtime import int8_layers
    from quantizers.lowering.checks import check_ort_cpu

    backend = _backend(name, "ort-cpu")
    assignment = mixed_assignment(demo_model, backend)
    _, result = BackendContract.build(backend, demo_model, assignment, calib, workdir(), "mixed")
    integer = {k for k, p in assignment.items() if p.quantizes_inputs and p.quantizes_weights}
    assert result.lowering.int8_layers == len(integer) > 0
    report = int8_layers(result.path, asked={k: str(p) for k, p in assignment.items()})
    ran = {k for k, v in report.per_layer.items() if v.int8}
    assert ran == integer, f"asked int8, ran float: {sorted(integer - ran)}; int8 unasked: {sorted(ran - integer)}"
    # W16A8 (float weights) cannot be an integer kernel: flagged by the checker and the runtime report, nothing else
    w16a8 = {k for k, p in assignment.items() if p.quantizes_inputs and not p.quantizes_weights}
    nodes = {v["node"]: k for k, v in result.lowering.layers.items()}
    a8_nodes = {v["node"] for k, v in result.lowering.layers.items() if assignment.get(k).quantizes_inputs}
    assert {nodes.get(v.node, v.node) for v in check_ort_cpu(result.path, a8_nodes=a8_nodes)} <= w16a8
    assert {nodes.get(v.node, v.node) for v in result.lowering.violations} <= w16a8
    assert set(report.a8_ran_float) == w16a8


def test_tensorrt_lowering_passes_the_rule_checker(demo_model, calib):
    from quantizers.lowering.checks import check_tensorrt

    for name in ("brevitas", "modelopt"):
        backend = _backend(name, "tensorrt")
        _, result = BackendContract.build(backend, demo_model, mixed_assignment(demo_model, backend), calib,
                                          workdir(), "mixed-trt")
        assert check_tensorrt(result.path) == [], name
        assert check_tensorrt(result.export.path), f"{name}: the raw export should break a TensorRT rule (Clip/"\
                                                   "weight-only DQ); else this test proves nothing"
