"""Registry of components under test and their implementations.

A component (e.g. `costmodel`, `mla`, `moe`, `fp8`) declares the typed Protocol its implementations satisfy
(`harness.protocols`); each implementation registers a zero-argument factory under a name. `reference` is, in
every component, dsv3ref's literal evaluation of the paper's formula (MLA's naive per-head attention, MoE's
per-expert loop, the torch FP8 quantizers, the analytic cost model); the fast paths have their own names
(`absorbed`, `grouped`, `triton`) and adapters of other libraries theirs (`transformers`). The conformance
suites are written once against the protocol and run against every selected implementation. Users add their own
with `--dsv3-impl module:factory`: the factory returns an object whose `component` attribute names the component.

The built-in implementations are adapters in `harness/adapters/<component>.py`, which register themselves on
import; `load_all()` imports every module of that package, so adding a component touches no other file.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.protocols import members


class UsageError(ValueError):
    """Bad command-line or plugin usage; reported as one line, exit code 2."""


@dataclass(frozen=True)
class Component:
    """A thing under test, the Protocol its implementations satisfy and the properties they may declare not
    applicable."""

    name: str
    description: str
    protocol: type
    properties: tuple[str, ...] = ()

    @property
    def required(self) -> tuple[str, ...]:
        """The attributes and methods an implementation must have (the protocol's members)."""
        return members(self.protocol)


@dataclass(frozen=True)
class Implementation:
    """A named factory for one component; `requires` lists importable modules it needs (e.g. transformers)."""

    component: str
    name: str
    factory: Callable[[], Any]
    description: str = ""
    requires: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")

    def missing(self) -> list[str]:
        """Modules in `requires` that are not importable here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def create(self) -> Any:
        """Build the implementation object and check it against its component's protocol."""
        obj = self.factory()
        check_protocol(COMPONENTS[self.component], obj, self.name)
        return obj


@dataclass
class _Registry:
    components: dict[str, Component] = field(default_factory=dict)
    impls: dict[tuple[str, str], Implementation] = field(default_factory=dict)
    loaded: bool = False


_REG = _Registry()
COMPONENTS = _REG.components


def register_component(name: str, description: str, protocol: type, properties: tuple[str, ...] = ()) -> Component:
    """Declare a component; a second, different declaration of the same name is an error (an identical one, as
    when a module is imported again, returns the first)."""
    comp = Component(name, description, protocol, properties)
    if _REG.components.setdefault(name, comp) != comp:
        raise ValueError(f"component {name!r} is already registered differently")
    return _REG.components[name]


def register_impl(component: str, name: str, factory: Callable[[], Any], description: str = "",
                  requires: tuple[str, ...] = (), devices: tuple[str, ...] = ("cpu", "cuda")) -> Implementation:
    """Register an implementation of an already declared component; the same name from another module is an error
    (from the same module, as when it is imported again, the new registration replaces the old)."""
    if component not in _REG.components:
        raise ValueError(f"unknown component {component!r}")
    old = _REG.impls.get((component, name))
    if old is not None and old.factory.__module__ != factory.__module__:
        raise ValueError(f"implementation {component}/{name} is already registered by {old.factory.__module__}")
    impl = Implementation(component, name, factory, description, requires, devices)
    _REG.impls[(component, name)] = impl
    return impl


def load_all() -> None:
    """Import every module of `harness.adapters` so that all built-in components and implementations register."""
    if _REG.loaded:
        return
    import harness.adapters as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    _REG.loaded = True


def implementations(component: str | None = None) -> list[Implementation]:
    """Registered implementations, optionally of one component, in registration order."""
    load_all()
    return [i for (c, _), i in _REG.impls.items() if component in (None, c)]


def check_protocol(comp: Component, obj: Any, label: str) -> None:
    """Raise UsageError if `obj` lacks an attribute the component requires."""
    missing = [a for a in comp.required if not hasattr(obj, a)]
    if missing:
        raise UsageError(f"implementation {label!r} of {comp.name!r} lacks {', '.join(missing)}")


def not_applicable(obj: Any) -> frozenset[str]:
    """Properties the implementation declares it legitimately lacks (attribute `not_applicable`)."""
    return frozenset(getattr(obj, "not_applicable", ()))


def resolve(spec: str) -> list[Implementation]:
    """Resolve one `--dsv3-impl` value: a registered name (matched in every component) or `module:factory`."""
    load_all()
    if ":" in spec:
        return [_from_factory_path(spec)]
    found = [i for (_, n), i in _REG.impls.items() if n == spec]
    if not found:
        names = sorted({n for _, n in _REG.impls})
        raise UsageError(f"--dsv3-impl: unknown implementation {spec!r}; known: {', '.join(names)} "
                         "(or module:factory)")
    return found


def _from_factory_path(spec: str) -> Implementation:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"--dsv3-impl {spec}: cannot import module {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--dsv3-impl {spec}: module {module_name!r} has no callable {attr!r}")
    component = getattr(factory, "component", None)
    if component is None:
        component = getattr(factory(), "component", None)
    if component not in _REG.components:
        raise UsageError(f"--dsv3-impl {spec}: the factory's object must have a `component` attribute naming one "
                         f"of {', '.join(sorted(_REG.components))}; got {component!r}")
    return Implementation(component, spec, factory, f"user implementation {spec}")
