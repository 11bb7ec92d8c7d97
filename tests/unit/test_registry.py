"""The backend registry: declarations, lookups, and the spec's backend union built from it."""

from __future__ import annotations

import typing
from dataclasses import replace

import pytest

from mpq.errors import UserError
from quantizers import registry


def test_bundled_backends_are_declared_with_options_and_capabilities():
    infos = registry.backends()
    assert list(infos) == ["brevitas", "modelopt", "modelopt-onnx"]
    for name, info in infos.items():
        assert info.name == name == info.capabilities.backend
        assert info.options.model_fields["name"].default == name
    assert infos["brevitas"].fake_quant and not infos["modelopt-onnx"].fake_quant


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UserError, match="unknown backend 'nope'; known backends: brevitas, modelopt, modelopt-onnx"):
        registry.backend_info("nope")
    with pytest.raises(UserError, match="known backends"):
        registry.get_backend("nope")
    assert registry.backend_class("brevitas").__name__ == "BrevitasBackend"


def test_a_declaration_must_agree_with_its_options_and_capabilities():
    info = registry.backend_info("brevitas")
    with pytest.raises(ValueError, match="name default 'brevitas'"):
        registry.register(replace(info, name="other"))
    with pytest.raises(ValueError, match="capabilities are declared for 'brevitas'"):
        registry.register(replace(info, options=registry.backend_info("modelopt").options, name="modelopt"))


def test_the_spec_backend_union_is_the_registry():
    from search.spec import StudySpec

    annotation = StudySpec.model_fields["backend"].annotation
    assert set(typing.get_args(annotation)) == set(registry.options_models())
