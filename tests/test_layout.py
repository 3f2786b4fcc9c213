"""The layout's import rules (docs/contributing.md), read from the source: dsv3ref imports only torch, triton,
numpy, the standard library and itself; hardware nothing of ours; nothing imports suites, tests or a report
section."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"dsv3ref", "baselines", "hardware", "harness", "suites", "tests"}
# safetensors: the checkpoint format of DeepSeek-V3 and Hugging Face, read and written by dsv3ref.checkpoint
THIRD_PARTY_ALLOWED = {"dsv3ref": {"torch", "triton", "numpy", "safetensors"}, "hardware": {"torch"}}


def imports(path: Path) -> set[str]:
    """Dotted names of every module `path` imports (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(THIRD_PARTY_ALLOWED))
def test_packages_import_only_what_they_may(package):
    allowed = THIRD_PARTY_ALLOWED[package] | set(sys.stdlib_module_names) | {package, "__future__"}
    for path in sources(package):
        bad = {name for name in imports(path) if name.split(".")[0] not in allowed}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_nothing_imports_suites_tests_or_a_section():
    for folder in ("dsv3ref", "baselines", "hardware", "harness", "suites", "tests"):
        for path in sources(folder):
            bad = {n for n in imports(path)
                   if n.split(".")[0] in ("suites", "tests") or n.startswith("harness.sections.")}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_baselines_import_only_the_reference_of_ours():
    for path in sources("baselines"):
        ours = {n.split(".")[0] for n in imports(path)} & OURS
        assert ours <= {"dsv3ref", "baselines"}, f"{path.relative_to(ROOT)} imports {sorted(ours)}"
