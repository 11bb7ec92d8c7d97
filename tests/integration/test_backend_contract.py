"""The backend contract (:mod:`quantizers.testing`) on every registered backend, on the real demo detector.

A backend that materializes a torch fake-quant model also runs the torch-vs-ONNX agreement
check (:class:`~quantizers.testing.FakeQuantContract`).
"""

from __future__ import annotations

import pytest
from quantizer_helpers import cached

from mpq.errors import UserError
from quantizers import registry
from quantizers.testing import BackendContract, FakeQuantContract


def _backend(name: str):
    try:
        return cached(f"backend:{name}", lambda: registry.get_backend(name, device="cpu"))
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


class TestBackendContract(BackendContract):
    @pytest.fixture(scope="class", params=registry.names())
    def backend(self, request):
        return _backend(request.param)


class TestFakeQuantContract(FakeQuantContract):
    @pytest.fixture(scope="class", params=[n for n, info in registry.backends().items() if info.fake_quant])
    def backend(self, request):
        return _backend(request.param)


def test_the_demo_model_has_one_fixed_layer(demo_model):
    """The DFL conv (fixed arange weights) is the demo model's only layer no backend may quantize."""
    assert [lay.name for lay in demo_model.layers if not lay.quantizable] == ["model.23.dfl.conv"]
