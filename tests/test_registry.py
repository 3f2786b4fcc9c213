"""The implementation registry: declarations, protocol checks, re-registration rules."""

from __future__ import annotations

import re

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


class _Attention:
    """A minimal object of the mla protocol, without `paged_pool`."""

    component = "mla"
    cache_mode = "absorbed"

    def build(self, cfg, state_dict, dtype, device):
        return None

    def new_cache(self, layer, batch, max_len, **options):
        return None

    def cache_bytes_per_token(self, cache):
        return 0.0


def test_a_member_needed_by_one_property_is_required_only_while_it_is_claimed():
    registry.load_all()
    mla = registry.COMPONENTS["mla"]
    with pytest.raises(UsageError, match=r"lacks paged_pool \(needed for 'paged_cache' unless it is declared not "):
        registry.check_protocol(mla, _Attention(), "mine")
    declared = _Attention()
    declared.not_applicable = {"paged_cache": "contiguous only"}
    registry.check_protocol(mla, declared, "mine")


@pytest.mark.parametrize(("change", "message"), [
    ({"component": "moe"}, "its `component` attribute is 'moe', expected 'mla'"),
    ({"not_applicable": {"paged": "typo"}}, "not_applicable: unknown property 'paged'; 'mla' has fp64_exact"),
    ({"not_applicable": "paged_cache"}, "not_applicable: expected a set of property names or a dict"),
    ({"build": 3, "not_applicable": {"paged_cache"}}, "build must be callable (a method), got int"),
])
def test_protocol_check_rejects_what_the_suites_could_not_use(change, message):
    registry.load_all()
    obj = _Attention()
    for name, value in change.items():
        setattr(obj, name, value)
    with pytest.raises(UsageError, match=re.escape(message)):
        registry.check_protocol(registry.COMPONENTS["mla"], obj, "mine")


def test_not_applicable_reasons_come_from_a_dict_or_default():
    obj = _Attention()
    obj.not_applicable = {"varlen": "one length per batch"}
    assert registry.not_applicable(obj) == {"varlen"}
    assert registry.not_applicable_reason(obj, "varlen") == "one length per batch"
    obj.not_applicable = {"varlen"}
    assert registry.not_applicable_reason(obj, "varlen") == "declared without a reason"


def test_create_builds_a_registered_or_user_implementation_of_a_component():
    assert registry.create("costmodel", "reference").component == "costmodel"
    with pytest.raises(UsageError, match="'absorbed' is not an implementation of 'moe'"):
        registry.create("moe", "absorbed")
