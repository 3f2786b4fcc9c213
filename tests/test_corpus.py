"""The standard-library byte corpus: file selection, the by-file split, batches and errors."""

from __future__ import annotations

import pytest
import torch

from dsv3ref.corpus import SEPARATOR, CorpusError, fixed_batches, is_validation, random_batch, stdlib_corpus


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_split_is_by_file_and_deterministic(corpus):
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert all(is_validation(f, 0.1) for f in corpus.val_files)
    assert not any(is_validation(f, 0.1) for f in corpus.train_files)
    assert 0.05 < len(corpus.val_files) / (len(corpus.train_files) + len(corpus.val_files)) < 0.15
    assert "os.py" in corpus.train_files + corpus.val_files
    assert not any(part in {"site-packages", "test", "tests"} for f in corpus.train_files for part in f.split("/"))
    stdlib_corpus.cache_clear()
    again = stdlib_corpus()
    assert again.val_files == corpus.val_files and torch.equal(again.val, corpus.val)
    assert corpus.train.dtype == torch.uint8 and corpus.train.numel() > 1_000_000


def test_validation_sets_are_nested():
    paths = [f"pkg/mod{i}.py" for i in range(500)]
    small = {p for p in paths if is_validation(p, 0.1)}
    assert small <= {p for p in paths if is_validation(p, 0.3)}


def test_custom_root(tmp_path):
    (tmp_path / "a.py").write_bytes(b"alpha")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_bytes(b"beta")
    for skipped in ("site-packages", "test"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "c.py").write_bytes(b"skipped")
    c = stdlib_corpus(0.65, str(tmp_path))  # CRC-32 fractions: a.py 0.59 (validation), pkg/b.py 0.70 (train)
    assert c.val_files == ("a.py",) and c.train_files == ("pkg/b.py",)
    assert sorted(bytes(c.train.tolist()).split(SEPARATOR) + bytes(c.val.tolist()).split(SEPARATOR)) == [
        b"alpha", b"beta"]


def test_batches():
    tokens = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    x, y = random_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = random_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    batches = fixed_batches(tokens, 2, 8, 3)
    assert len(batches) == 3 and batches[0][0].shape == (2, 8)
    assert torch.equal(batches[0][0][0], tokens[:8].long()) and batches[-1][1][-1, -1] == tokens[-1]


def test_errors(tmp_path):
    with pytest.raises(CorpusError, match="^val_fraction"):
        stdlib_corpus(1.5)
    with pytest.raises(CorpusError, match="^root: no"):
        stdlib_corpus(0.1, str(tmp_path))
    with pytest.raises(CorpusError, match="^seq_len"):
        random_batch(torch.zeros(10, dtype=torch.uint8), 1, 10, torch.Generator())
    with pytest.raises(CorpusError, match="^batch_size"):
        fixed_batches(torch.zeros(10, dtype=torch.uint8), 0, 4, 1)
