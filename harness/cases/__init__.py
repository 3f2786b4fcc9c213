"""Conformance cases rebuilt from the few values hypothesis draws (seeds, sizes, configs): one public module per
component, used by the suites to build weights and inputs, so that a failure can print the lines that rebuild it
outside pytest (`rebuild`), and a user can rerun one case against their implementation by hand.
"""

from __future__ import annotations

from typing import Any

REBUILD = "Rebuild this case:"
CONFIG_IMPORT = "from dsv3ref.config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig"


def rebuild(*lines: str) -> None:
    """Note (hypothesis.note: printed with the shrunk failing example) the lines that rebuild the current example
    with public functions, after the line that creates the implementation under test (`impl`)."""
    from hypothesis import note

    from harness.pytest_plugin import current_implementation

    current = current_implementation()
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    rest = [line for line in lines if line not in imports]
    if current:
        imports.append("from harness.registry import create")
        rest.insert(0, f"impl = create{current!r}")
    note("\n".join([REBUILD, *(f"    {line}" for line in [*imports, *rest])]))


def config_line(cfg: Any) -> str:
    """`cfg = ModelConfig(...)`: a config's repr evaluates back to it (with CONFIG_IMPORT)."""
    return f"cfg = {cfg!r}"
