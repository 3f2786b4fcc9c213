"""The known-deviations file: its format, its errors (one line naming the entry) and which entry covers a test."""

from __future__ import annotations

import pytest

from harness.deviations import DeviationsError, find, load

COMPONENTS = ("costmodel", "mla", "moe", "fp8")


def test_entries_per_implementation_with_optional_variant(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('["mine:make"]\n"mla/test_x" = " every variant "\n"mla/test_x[bf16]" = "only bf16"\n'
                    '["*"]\n"moe/test_y" = "everyone"\n')
    entries = load(path, COMPONENTS)
    assert [e.key for e in entries] == ["mine:make mla/test_x", "mine:make mla/test_x[bf16]", "* moe/test_y"]
    assert entries[0].reason == "every variant"
    assert find(entries, "mine:make", "mla", "test_x", "bf16").reason == "only bf16"  # the exact variant first
    assert find(entries, "mine:make", "mla", "test_x", "fp32").reason == "every variant"
    assert find(entries, "other", "mla", "test_x", "") is None
    assert find(entries, "other", "moe", "test_y", "").impl == "*"


@pytest.mark.parametrize(("text", "message"), [
    ('["*"]\n"moe/x" = "r"\n', "expected a property COMPONENT/TEST"),
    ('["*"]\n"moe/test_x[]" = "r"\n', "expected a property COMPONENT/TEST"),
    ('["*"]\n"moe/test_x" = "  "\n', "expected the reason as a non-empty string"),
    ("x = 1\n", "expected a table"),
    (b"\xff\xfe", "not UTF-8 text"),
])
def test_errors_name_the_file_and_the_entry(tmp_path, text, message):
    path = tmp_path / "d.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DeviationsError, match=message) as err:
        load(path, COMPONENTS)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
