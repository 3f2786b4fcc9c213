"""The documentation against the project: the protocol table lists every protocol member and every property an
implementation may declare not applicable; every relative link (file and heading) and every project path the docs
name exists; the README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import registry

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").rglob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
README_MAX_BYTES = 12 * 1024
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
CODE = re.compile(r"`([^`\n]+)`")
PROJECT_DIRS = ("baselines/", "dsv3ref/", "docs/", "hardware/", "harness/", "suites/", "tests/", ".ci/")
PLACEHOLDER = re.compile(r"[*<>{}]|\.\.\.")  # globs and <date>-style placeholders name no single file


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a `## ` line) up to the next `## ` heading."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _components() -> list[registry.Component]:
    registry.load_all()
    return list(registry.COMPONENTS.values())


@pytest.mark.parametrize("component", _components(), ids=lambda c: c.name)
def test_protocol_table_lists_every_member_and_property(component):
    text = (ROOT / "docs" / "protocols.md").read_text()
    heading = f"## `{component.name}`"
    assert heading + "\n" in text, f"docs/protocols.md has no section {heading!r}"
    section = _section(text, heading)
    assert f"`{component.protocol.__name__}`" in section
    missing = [n for n in (*component.required, *component.properties) if f"`{n}`" not in section]
    assert not missing, f"docs/protocols.md, {heading}: missing {', '.join(missing)}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files_and_headings(page):
    targets = [t for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:", t)]
    missing = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = page if not path else page.parent / path
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files or headings: {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_project_paths_named_in_code_spans_exist(page):
    words = [w.rstrip(".,:;)") for span in CODE.findall(page.read_text()) for w in span.split()]
    paths = [w for w in words if w.startswith(PROJECT_DIRS) and not PLACEHOLDER.search(w)]
    missing = [p for p in paths if not (ROOT / p.split(":")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names missing project paths: {', '.join(missing)}"


def test_readme_is_a_front_page():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the front page keeps to {README_MAX_BYTES}"


def test_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# The paper's numbers\n## The `local` profile (`hardware/probe.py`)\n")
    assert _anchors(page) == {"the-papers-numbers", "the-local-profile-hardwareprobepy"}


def test_the_section_helper_stops_at_the_next_heading():
    text = "# t\n## `a`\nx `m`\n## `b`\ny\n"
    assert _section(text, "## `a`") == "## `a`\nx `m`"
    assert _section(text, "## `b`") == "## `b`\ny\n"
