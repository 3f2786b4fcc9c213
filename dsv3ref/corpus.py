"""A real text corpus on every machine without a download: the Python standard library's own source files.

Tokens are bytes (vocabulary 256). Files are the `*.py` files under `sysconfig`'s stdlib directory, excluding
installed packages (site-packages, dist-packages) and test suites (test, tests, idle_test), in sorted path
order, joined by a NUL byte. The train/validation split is by file: a file is in validation when the CRC-32 of
its relative path falls in the first `val_fraction` of the range, so the split is deterministic and stable when
files are added. The content depends on the Python version (recorded in `Corpus.python`).
"""

from __future__ import annotations

import platform
import sysconfig
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SEPARATOR = b"\x00"


class CorpusError(ValueError):
    """A bad corpus request; the message names the argument and what was expected."""


@dataclass(frozen=True)
class Corpus:
    """Byte tokens (uint8) of the training and validation files."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str
    python: str


def source_files(root: Path) -> list[Path]:
    """The corpus files under `root`, in sorted relative-path order."""
    files = (p for p in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relative_path: str, val_fraction: float) -> bool:
    """Whether a file belongs to the validation split (by the CRC-32 of its relative path)."""
    return zlib.crc32(relative_path.encode()) < val_fraction * 2**32


@cache
def stdlib_corpus(val_fraction: float = 0.1, root: str | None = None) -> Corpus:
    """The standard-library corpus split by file (cached per process)."""
    if not 0 < val_fraction < 1:
        raise CorpusError(f"val_fraction: expected a value in (0, 1), got {val_fraction!r}")
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = source_files(base)
    if not files:
        raise CorpusError(f"root: no *.py source files under {base}")
    split: dict[bool, list[tuple[str, bytes]]] = {False: [], True: []}
    for path in files:
        rel = path.relative_to(base).as_posix()
        split[is_validation(rel, val_fraction)].append((rel, path.read_bytes()))
    if not split[True] or not split[False]:
        raise CorpusError(f"val_fraction: {val_fraction} leaves one split empty for the {len(files)} files")

    def tokens(parts: list[tuple[str, bytes]]) -> torch.Tensor:
        return torch.frombuffer(bytearray(SEPARATOR.join(data for _, data in parts)), dtype=torch.uint8)

    return Corpus(tokens(split[False]), tokens(split[True]), tuple(r for r, _ in split[False]),
                  tuple(r for r, _ in split[True]), str(base), platform.python_version())


def _check_window(tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise CorpusError(f"batch_size, seq_len: expected >= 1, got {batch_size}, {seq_len}")
    if tokens.numel() < seq_len + 1:
        raise CorpusError(f"seq_len: expected < {tokens.numel()} (the token count), got {seq_len}")


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [B, S] (int64) from windows at random offsets drawn from `generator`."""
    _check_window(tokens, batch_size, seq_len)
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()]).long()  # [B, S + 1]
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
                  count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of windows at evenly spaced offsets (the same validation set for every run)."""
    _check_window(tokens, batch_size, seq_len)
    if count < 1:
        raise CorpusError(f"count: expected >= 1, got {count}")
    starts = torch.linspace(0, tokens.numel() - seq_len - 1, count * batch_size).long().tolist()
    windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts]).long().view(count, batch_size, -1)
    return [(w[:, :-1], w[:, 1:]) for w in windows]
