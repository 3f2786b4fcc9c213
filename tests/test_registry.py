"""The implementation registry: declarations, protocol checks, re-registration rules."""

from __future__ import annotations

import pytest

from harness import registry
from harness.registry import UsageError


def test_costmodel_is_registered_with_a_reference():
    names = [i.name for i in registry.implementations("costmodel")]
    assert names[0] == "reference"
    obj = registry.implementations("costmodel")[0].create()
    assert obj.component == "costmodel"


def test_redeclaring_a_component_differently_is_an_error():
    registry.load_all()
    comp = registry.COMPONENTS["costmodel"]
    assert registry.register_component(comp.name, comp.description, comp.protocol, comp.properties) == comp
    with pytest.raises(ValueError, match="already registered differently"):
        registry.register_component("costmodel", "other", comp.protocol)


def test_protocol_check_names_missing_attributes():
    registry.load_all()
    with pytest.raises(UsageError, match="lacks component, kv_cache_bytes_per_token"):
        registry.check_protocol(registry.COMPONENTS["costmodel"], object(), "mine")


def test_missing_optional_modules_are_reported():
    impl = registry.Implementation("costmodel", "x", object, requires=("no_such_module_anywhere",))
    assert impl.missing() == ["no_such_module_anywhere"]
