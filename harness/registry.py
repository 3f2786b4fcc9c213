"""Registry of components under test and their implementations.

A component (e.g. `costmodel`, `mla`, `moe`, `fp8`) declares the typed Protocol its implementations satisfy
(`harness.protocols`); each implementation registers a zero-argument factory under a name. `reference` is, in
every component, dsv3ref's literal evaluation of the paper's formula (MLA's naive per-head attention, MoE's
per-expert loop, the torch FP8 quantizers, the analytic cost model); the fast paths have their own names
(`absorbed`, `grouped`, `triton`) and adapters of other libraries theirs (`transformers`). The conformance
suites are written once against the protocol and run against every selected implementation. Users add their own
with `--dsv3-impl module:factory`: the factory returns an object whose `component` attribute names the component.
A user factory is imported (from the working directory too), called and checked against the protocol once, when
the name is resolved, so that a missing method or a factory that raises is one line of usage error.

The built-in implementations are adapters in `harness/adapters/<component>.py`, which register themselves on
import; `load_all()` imports every module of that package, so adding a component touches no other file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.protocols import members


class UsageError(ValueError):
    """Bad command-line or plugin usage; reported as one line, exit code 2."""


@dataclass(frozen=True)
class Component:
    """A thing under test, the Protocol its implementations satisfy, the properties they may declare not
    applicable, and the members an implementation needs only while it claims a property (`property_members`)."""

    name: str
    description: str
    protocol: type
    properties: tuple[str, ...] = ()
    property_members: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def required(self) -> tuple[str, ...]:
        """The attributes and methods every implementation must have (the protocol's members, less those needed
        only for a property)."""
        optional = {m for names in self.property_members.values() for m in names}
        return tuple(m for m in members(self.protocol) if m not in optional)

    def required_by(self, obj: Any) -> tuple[str, ...]:
        """The members `obj` must have: the required ones plus those of every property it does not declare not
        applicable."""
        lacking = not_applicable(obj)
        extra = [m for prop, names in self.property_members.items() if prop not in lacking for m in names]
        return tuple(dict.fromkeys([*self.required, *extra]))


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

    @property
    def user(self) -> bool:
        """True for a `module:factory` implementation (not a registered one)."""
        return ":" in self.name


@dataclass
class _Registry:
    components: dict[str, Component] = field(default_factory=dict)
    impls: dict[tuple[str, str], Implementation] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)  # user objects by `module:factory`, made once
    loaded: bool = False


_REG = _Registry()
COMPONENTS = _REG.components


def register_component(name: str, description: str, protocol: type, properties: tuple[str, ...] = (),
                       property_members: dict[str, tuple[str, ...]] | None = None) -> Component:
    """Declare a component; a second, different declaration of the same name is an error (an identical one, as
    when a module is imported again, returns the first). `property_members` maps a property to the protocol
    members an implementation needs only while it does not declare that property not applicable."""
    comp = Component(name, description, protocol, properties, dict(property_members or {}))
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
    """Raise UsageError (one line) if `obj` names another component, lacks a member the component requires (or
    one of a property it claims), has a method that is not callable, or declares unknown properties."""
    prefix = f"implementation {label!r} of {comp.name!r}"
    if getattr(obj, "component", comp.name) != comp.name:
        raise UsageError(f"{prefix}: its `component` attribute is {obj.component!r}, expected {comp.name!r}")
    _check_declared(comp, obj, prefix)
    missing = [a for a in comp.required_by(obj) if not hasattr(obj, a)]
    if missing:
        needed = {m: p for p, names in comp.property_members.items() for m in names}
        hints = [f"{m} (needed for {needed[m]!r} unless it is declared not applicable)" if m in needed else m
                 for m in missing]
        raise UsageError(f"{prefix} lacks {', '.join(hints)}; the protocol is harness.protocols."
                         f"{comp.protocol.__name__}")
    methods = [m for m in comp.required_by(obj) if callable(getattr(comp.protocol, m, None))]
    uncallable = [m for m in methods if not callable(getattr(obj, m))]
    if uncallable:
        raise UsageError(f"{prefix}: {', '.join(uncallable)} must be callable (a method), got "
                         f"{type(getattr(obj, uncallable[0])).__name__}")


def _check_declared(comp: Component, obj: Any, prefix: str) -> None:
    """`not_applicable` must be a set (or a dict property -> reason) of the component's property names."""
    declared = getattr(obj, "not_applicable", ())
    if isinstance(declared, str) or not isinstance(declared, Iterable):
        raise UsageError(f"{prefix}: not_applicable: expected a set of property names or a dict name -> reason, "
                         f"got {type(declared).__name__}")
    unknown = sorted(str(p) for p in declared if p not in comp.properties)
    if unknown:
        known = ", ".join(comp.properties) or "none"
        raise UsageError(f"{prefix}: not_applicable: unknown property {unknown[0]!r}; {comp.name!r} has {known}")


def not_applicable(obj: Any) -> frozenset[str]:
    """Properties the implementation declares it legitimately lacks (attribute `not_applicable`: a set of names,
    or a dict name -> reason)."""
    return frozenset(getattr(obj, "not_applicable", ()))


def not_applicable_reason(obj: Any, prop: str) -> str:
    """Why `obj` declares `prop` not applicable: the dict's reason, or a generic sentence for a plain set."""
    declared = getattr(obj, "not_applicable", ())
    reason = declared.get(prop, "") if isinstance(declared, dict) else ""
    return reason or "declared without a reason"


def resolve(spec: str) -> list[Implementation]:
    """Resolve one `--dsv3-impl` value: a registered name (matched in every component) or `module:factory` (imported,
    created and checked now)."""
    load_all()
    if ":" in spec:
        return [_from_factory_path(spec)]
    found = [i for (_, n), i in _REG.impls.items() if n == spec]
    if not found:
        names = sorted({n for _, n in _REG.impls})
        raise UsageError(f"--dsv3-impl: unknown implementation {spec!r}; known: {', '.join(names)} "
                         "(or module:factory)")
    return found


def create(component: str, spec: str) -> Any:
    """The object of implementation `spec` (a registered name or `module:factory`) of `component`: what the suites'
    reproduction snippets call."""
    found = [i for i in resolve(spec) if i.component == component]
    if not found:
        raise UsageError(f"{spec!r} is not an implementation of {component!r}")
    return found[0].create()


def _import_user_module(spec: str, module_name: str) -> Any:
    """Import the module of a `module:factory`, from the working directory too (as `python -m pytest` would): a
    bare `pytest` or the `dsv3` script does not put it on sys.path. Anything the module raises is one line."""
    cwd = os.getcwd()
    if cwd not in sys.path and importlib.util.find_spec(module_name.partition(".")[0]) is None:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        where = f" (looked in {cwd} and sys.path)" if e.name == module_name.partition(".")[0] else ""
        raise UsageError(f"--dsv3-impl {spec}: cannot import module {module_name!r}: {e}{where}") from None
    except Exception as e:  # the user's module may raise anything while it is imported: reported as one line
        raise UsageError(f"--dsv3-impl {spec}: importing {module_name!r} raised {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _from_factory_path(spec: str) -> Implementation:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--dsv3-impl {spec}: expected module:factory (e.g. mykernels:make_moe)")
    module = _import_user_module(spec, module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--dsv3-impl {spec}: module {module_name!r} has no callable {attr!r}")
    if spec not in _REG.created:
        try:
            _REG.created[spec] = factory()
        except Exception as e:  # the user's factory may raise anything: reported as one line
            raise UsageError(f"--dsv3-impl {spec}: the factory raised {_one_line(e)}") from None
    obj = _REG.created[spec]
    component = getattr(obj, "component", None)
    if component not in _REG.components:
        raise UsageError(f"--dsv3-impl {spec}: the factory's object must have a `component` attribute naming one "
                         f"of {', '.join(sorted(_REG.components))}; got {component!r}")
    check_protocol(_REG.components[component], obj, spec)
    return Implementation(component, spec, lambda: _REG.created[spec], f"user implementation {spec}")
