"""Fast paths of the reference modules, by name.

A reference module computes its semantics itself (e.g. `dsv3ref.moe.MoE` with its per-expert loop) and looks a
named backend up here; a backend module registers its functions on import and is loaded on first lookup. Every
backend is checked against the reference by the conformance suites, so a registered name is a promise of the same
result, not of the same rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import TypeVar

from dsv3ref.config import ConfigError

Fn = TypeVar("Fn", bound=Callable)

# kind -> modules that register backends of that kind (imported on the first lookup of the kind)
PROVIDERS: dict[str, tuple[str, ...]] = {"moe_experts": ("dsv3ref.moe_grouped",),
                                        "fp8_linear": ("dsv3ref.fp8.linear", "dsv3ref.fp8.fused")}
_REGISTRY: dict[str, dict[str, Callable]] = {}


def register(kind: str, name: str) -> Callable[[Fn], Fn]:
    """Decorator: register `fn` as backend `name` of `kind` (a second registration of the name is an error)."""

    def add(fn: Fn) -> Fn:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not fn:
            raise ValueError(f"backend {kind}/{name} is already registered by {table[name].__module__}")
        table[name] = fn
        return fn

    return add


def _load(kind: str) -> dict[str, Callable]:
    for module in PROVIDERS.get(kind, ()):
        import_module(module)
    return _REGISTRY.get(kind, {})


def names(kind: str) -> tuple[str, ...]:
    """The registered backend names of `kind`, sorted."""
    return tuple(sorted(_load(kind)))


def get(kind: str, name: str) -> Callable:
    """Backend `name` of `kind`; a ConfigError naming the known ones when there is none."""
    table = _load(kind)
    if name not in table:
        raise ConfigError(f"backend: expected one of {', '.join(sorted(table))} for {kind}, got {name!r}")
    return table[name]
