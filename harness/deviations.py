"""Known deviations: the properties an implementation knowingly does not meet, each with its reason (as the array
API standard's test suite takes a file of expected failures), so that a project's CI fails only on new failures.

The file is TOML: one table per implementation (its `--impl` / `--dsv3-impl` name, or "*" for every one); each key
is a property as the conformance matrix names it, `COMPONENT/TEST` (every variant of the test) or
`COMPONENT/TEST[VARIANT]` (one variant, e.g. `[bf16]`), and each value the reason, a non-empty string:

    ["mykernels:make_moe"]
    "moe/test_weights_sum_to_route_scale_for_tiny_scores" = "the normaliser adds 1e-20 (padded tokens give 0)"

    ["*"]
    "mla/test_working_dtype_error_within_flash_attention_rule[bf16]" = "scores accumulate in bf16 on sm_80"

A listed property that fails is an expected failure (xfail), one that passes is reported as a deviation that now
passes (xpass: remove it from the file); neither fails the run.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

EVERY = "*"
_KEY = re.compile(r"(?P<component>[a-z][a-z0-9_]*)/(?P<test>test_\w+)(?:\[(?P<variant>[^\[\]]+)\])?")


class DeviationsError(ValueError):
    """A malformed known-deviations file; the message names the file and the entry."""


@dataclass(frozen=True)
class Deviation:
    """One entry: implementation `impl` (or "*") does not meet property `component/test[variant]`."""

    impl: str
    component: str
    test: str
    variant: str | None
    reason: str

    @property
    def key(self) -> str:
        """The entry as written in the file (`COMPONENT/TEST[VARIANT]`), after its implementation's table."""
        tail = f"[{self.variant}]" if self.variant is not None else ""
        return f"{self.impl} {self.component}/{self.test}{tail}"

    def matches(self, impl: str, component: str, test: str, variant: str) -> bool:
        """True when this entry covers implementation `impl` running test `test` (variant `variant`, '' if none)."""
        return (self.impl in (EVERY, impl) and self.component == component and self.test == test
                and self.variant in (None, variant))


def load(path: str | Path, components: tuple[str, ...]) -> tuple[Deviation, ...]:
    """Read and validate a known-deviations file; `components` are the registered component names."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DeviationsError(f"{path}: cannot read the known-deviations file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise DeviationsError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise DeviationsError(f"{path}: malformed TOML ({e})") from None
    entries = []
    for impl, table in data.items():
        if not isinstance(table, dict):
            raise DeviationsError(f"{path}: {impl!r}: expected a table [\"IMPLEMENTATION\"] of properties "
                                  f"(\"COMPONENT/TEST\" = \"reason\"), got a {type(table).__name__}")
        entries += [_entry(path, impl, key, reason, components) for key, reason in table.items()]
    return tuple(entries)


def _entry(path: Path, impl: str, key: str, reason: object, components: tuple[str, ...]) -> Deviation:
    where = f"{path}: [{impl!r}] {key!r}"
    match = _KEY.fullmatch(key)
    if match is None:
        raise DeviationsError(f"{where}: expected a property COMPONENT/TEST or COMPONENT/TEST[VARIANT], "
                              "e.g. \"moe/test_selection_uses_biased_scores\"")
    if match["component"] not in components:
        raise DeviationsError(f"{where}: unknown component {match['component']!r}; known: {', '.join(components)}")
    if not isinstance(reason, str) or not reason.strip():
        raise DeviationsError(f"{where}: expected the reason as a non-empty string, got {reason!r}")
    return Deviation(impl, match["component"], match["test"], match["variant"], reason.strip())


def find(deviations: tuple[Deviation, ...], impl: str, component: str, test: str, variant: str) -> Deviation | None:
    """The first entry covering this test of this implementation (an exact variant before a whole test)."""
    hits = [d for d in deviations if d.matches(impl, component, test, variant)]
    return min(hits, key=lambda d: (d.variant is None, d.impl == EVERY), default=None)
