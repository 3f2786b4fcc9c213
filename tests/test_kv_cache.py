"""Unit tests of dsv3ref.kv_cache: spans, append/rewind semantics, errors, true sizes, FP8 and paging."""

from __future__ import annotations

import pytest
import torch

from dsv3ref.fp8.quant import AMAX_EPS, E4M3_MAX
from dsv3ref.kv_cache import (
    CacheError,
    KVCache,
    LatentCache,
    PagedLatentCache,
    Span,
    dequantize_per_token,
    quantize_per_token,
)

CPU = torch.device("cpu")


def span(batch: int, width: int, start=0, seqlens=None, limit: int = 64) -> Span:  # noqa: ANN001
    return Span.make(batch, width, start, seqlens, limit, CPU)


def test_span_validation():
    with pytest.raises(ValueError, match="start_pos: expected >= 0"):
        span(2, 3, -1)
    with pytest.raises(ValueError, match="max_seq_len 64"):
        span(2, 3, 62)
    with pytest.raises(ValueError, match=r"seqlens: expected values in \[0, 3\]"):
        span(2, 3, 0, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"start_pos: expected an int or an integer tensor of shape \(2,\)"):
        span(2, 3, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="seqlens"):
        span(2, 3, 0, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="start_pos"):
        span(2, 3, True)


def test_span_fast_path_only_for_a_common_start_and_full_rows():
    assert span(2, 3, 5).uniform == 5
    assert span(2, 3, torch.tensor([5, 5])).uniform is None
    assert span(2, 3, 5, torch.tensor([3, 3])).uniform is None


def test_causal_mask_offsets_by_the_cached_start():
    s = span(1, 3, 4)
    assert s.causal_mask(0, 7, cached=True).tolist() == [[t <= 4 + i for t in range(7)] for i in range(3)]
    assert s.causal_mask(0, 3, cached=False).tolist() == [[t <= i for t in range(3)] for i in range(3)]
    assert span(1, 1, 4).causal_mask(0, 5, cached=True) is None


def test_cache_constructor_errors():
    with pytest.raises(CacheError, match="batch"):
        KVCache(0, 4, 2, 3, 3)
    with pytest.raises(CacheError, match="max_len"):
        LatentCache(1, 0, 4, 2)
    with pytest.raises(CacheError, match="dtype"):
        LatentCache(1, 4, 4, 2, dtype=torch.float8_e4m3fn)
    with pytest.raises(CacheError, match="dtype"):
        KVCache(1, 4, 2, 3, 3, dtype=torch.int32)


def test_append_errors_name_the_problem():
    cache = LatentCache(2, 8, 4, 2)
    kv, pe = torch.randn(2, 3, 4), torch.randn(2, 3, 2)
    with pytest.raises(CacheError, match="start_pos: expected <= the cached length 0 of row 0"):
        cache.append(span(2, 3, 1), kv, pe)
    cache.append(span(2, 3, 0), kv, pe)
    with pytest.raises(CacheError, match="cache capacity 8"):
        cache.append(span(2, 6, 3), torch.randn(2, 6, 4), torch.randn(2, 6, 2))
    with pytest.raises(CacheError, match=r"kv: expected shape \(2, 3, 4\)"):
        cache.append(span(2, 3, 0), torch.randn(2, 3, 5), pe)


def test_writing_below_the_length_rewinds_the_row():
    cache = KVCache(1, 8, 1, 2, 2, dtype=torch.float64)
    k = torch.arange(12.0, dtype=torch.float64).view(1, 6, 1, 2)
    cache.append(span(1, 6), k, k)
    cache.append(span(1, 1, 2), -k[:, :1], -k[:, :1])  # overwrite position 2; positions 3..5 are dropped
    assert cache.lengths.tolist() == [3]
    keys, _ = cache.row(0, 3)
    assert keys[0].tolist() == [[0.0, 1.0], [2.0, 3.0], [-0.0, -1.0]]


@pytest.mark.parametrize("make", [lambda: KVCache(2, 8, 1, 2, 2, dtype=torch.float64),
                                  lambda: PagedLatentCache(2, 8, 2, 2, dtype=torch.float64, block_size=2)])
def test_rewind_shortens_rows_without_writing(make):
    cache = make()
    x = torch.arange(24.0, dtype=torch.float64).view(2, 6, *([1, 2] if isinstance(cache, KVCache) else [2]))
    cache.append(span(2, 6), x, x)
    cache.rewind(torch.tensor([2, 5]))
    assert cache.lengths.tolist() == [2, 5]
    cache.append(span(2, 1, cache.lengths.clone()), -x[:, :1], -x[:, :1])  # continues at each row's new length
    assert cache.lengths.tolist() == [3, 6]
    first = cache.row(0, 3)[0]
    assert first.flatten().tolist()[-2:] == [-0.0, -1.0]
    with pytest.raises(CacheError, match="lengths: expected 0 <= length <= the cached length 3 of row 0, got 4"):
        cache.rewind(4)
    with pytest.raises(ValueError, match="lengths: expected an int or an integer tensor of shape"):
        cache.rewind(torch.tensor([1.0, 2.0]))


def test_varlen_append_writes_only_valid_tokens():
    cache = LatentCache(2, 6, 3, 2, dtype=torch.float64)
    kv = torch.randn(2, 4, 3, dtype=torch.float64)
    cache.append(span(2, 4, torch.tensor([0, 0]), torch.tensor([4, 1])), kv, torch.randn(2, 4, 2, dtype=torch.float64))
    assert cache.lengths.tolist() == [4, 1]
    assert torch.equal(cache.row(1, 1)[0], kv[1, :1])
    assert torch.count_nonzero(cache.kv[1, 1:]) == 0


@pytest.mark.parametrize("dtype, width", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_true_sizes(dtype, width):
    assert KVCache(3, 10, 4, 6, 5, dtype).nbytes() == 3 * 10 * 4 * (6 + 5) * width
    latent = LatentCache(3, 10, 16, 4, dtype)
    assert latent.bytes_per_token() == (16 + 4) * width and latent.slots() == 30
    fp8 = LatentCache(3, 10, 16, 4, dtype, fp8=True)
    assert fp8.bytes_per_token() == 16 + 4 + 4 * width  # e4m3 latent + fp32 scale + k_pe in dtype
    paged = PagedLatentCache(3, 10, 16, 4, dtype, block_size=4, num_blocks=11)
    assert paged.slots() == 44 and paged.nbytes() == 44 * (16 + 4) * width


def test_fp8_round_trip_bounds():
    x = torch.randn(64, 128) * torch.logspace(-3, 3, 64)[:, None]
    q, scale = quantize_per_token(x)
    assert torch.equal(scale, x.abs().amax(-1) / E4M3_MAX)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), E4M3_MAX))  # the amax maps onto 448
    err = (dequantize_per_token(q, scale, torch.float32) - x).abs()
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normals; subnormal step 2^-9 of the scale
    assert torch.all(err <= torch.maximum(2**-4 * x.abs(), 2**-10 * scale[:, None]) * (1 + 1e-6))


def test_fp8_all_zero_token_stays_finite():
    q, scale = quantize_per_token(torch.zeros(2, 8))
    assert torch.equal(scale, torch.full((2,), AMAX_EPS / E4M3_MAX))
    assert torch.count_nonzero(dequantize_per_token(q, scale, torch.bfloat16)) == 0


def test_paged_table_validation():
    with pytest.raises(CacheError, match=r"block_table: expected an integer tensor of shape \(2, 2\)"):
        PagedLatentCache(2, 8, 4, 2, block_size=4, block_table=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(CacheError, match=r"block ids in \[0, 4\)"):
        PagedLatentCache(2, 8, 4, 2, block_size=4, block_table=torch.tensor([[0, 1], [2, 4]]))
    with pytest.raises(CacheError, match="at most once"):
        PagedLatentCache(2, 8, 4, 2, block_size=4, block_table=torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(CacheError, match="block_size"):
        PagedLatentCache(2, 8, 4, 2, block_size=0)


def test_paged_rows_follow_the_block_table_and_unused_slots_are_poisoned():
    table = torch.tensor([[3, 0], [1, 2]])
    cache = PagedLatentCache(2, 8, 3, 2, torch.float64, block_size=4, block_table=table)
    assert bool(torch.isnan(cache.kv).all())
    kv, pe = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 6, 2, dtype=torch.float64)
    cache.append(span(2, 6), kv, pe)
    assert torch.equal(cache.kv[3], kv[0, :4]) and torch.equal(cache.kv[0, :2], kv[0, 4:])
    assert bool(torch.isnan(cache.kv[0, 2:]).all())  # still unwritten
    got_kv, got_pe = cache.row(1, 6)
    assert torch.equal(got_kv, kv[1]) and torch.equal(got_pe, pe[1])


def test_fp8_paged_row_dequantizes():
    cache = PagedLatentCache(1, 8, 16, 2, torch.bfloat16, fp8=True, block_size=4)
    kv = torch.randn(1, 5, 16).bfloat16()
    cache.append(span(1, 5), kv, torch.randn(1, 5, 2).bfloat16())
    got, _ = cache.row(0, 5)
    assert got.dtype == torch.bfloat16
    assert torch.all((got.float() - kv[0].float()).abs() <= 2**-4 * kv[0].float().abs().amax(-1, keepdim=True))
