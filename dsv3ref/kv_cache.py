"""KV caches of one attention layer, where a chunk of new tokens goes in them, and attention over what they hold.

- `KVCache`: per-head K and V, head-major [B, H, L, d] (MHA/GQA/MQA baselines and the naive MLA mode).
- `LatentCache`: MLA's cache, only kv_norm(c) [B, L, kv_lora_rank] and the roped shared key k_pe [B, L, rope_dim];
  BF16 (or any float dtype), or the latent in FP8 e4m3 with one fp32 scale per token (k_pe stays in `dtype`).
- `PagedLatentCache`: the same in a pool of fixed-size blocks (64 tokens, as FlashMLA) addressed through a block
  table [B, blocks]; unused slots are NaN-poisoned by default so a read past a row's length cannot go unnoticed.

Every row has its own length (`lengths`, [B]). A `Span` says where a chunk of S new tokens goes: per-row start
positions and per-row valid counts (right padding). Writing at a start below a row's length rewinds it (the row's
length becomes start + seqlen); a start above it would leave a gap and is an error, as is passing the capacity.
Attention reads each row's first `length` slots only, so nothing past a row's length is ever touched. `rewind`
shortens rows without writing (speculative decoding drops rejected draft tokens): the slots past the new length
keep their old values (a paged cache's NaN poison is not restored) and are overwritten by the next append.
`nbytes()` is the true size of the stored payload (data and scales; lengths and block tables are metadata).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dsv3ref.fp8.quant import FP8, scale_from_amax

BLOCK_SIZE = 64


class CacheError(ValueError):
    """A cache used out of range: a gap before the start position, past its capacity, or with the wrong shape."""


@dataclass(frozen=True)
class Span:
    """Where a chunk of `width` new tokens goes: start position and valid-token count per row."""

    start: torch.Tensor  # [B] int64
    seqlens: torch.Tensor  # [B] int64, <= width; tokens past it in a row are padding
    width: int
    uniform: int | None  # the common start when every row starts there with all `width` tokens valid
    limit: int  # max_seq_len: positions must stay below it

    @classmethod
    def make(cls, batch: int, width: int, start_pos: int | torch.Tensor, seqlens: torch.Tensor | None,
             max_seq_len: int, device: torch.device) -> Span:
        """Validate start_pos (int or [B]) and seqlens ([B] or None = all `width` tokens) against max_seq_len."""
        uniform = start_pos if isinstance(start_pos, int) and seqlens is None else None
        start = _row_tensor("start_pos", start_pos, batch, device)
        if seqlens is None:
            lens = torch.full((batch,), width, dtype=torch.long, device=device)
        else:
            lens = _row_tensor("seqlens", seqlens, batch, device)
            if int(lens.min()) < 0 or int(lens.max()) > width:
                raise ValueError(f"seqlens: expected values in [0, {width}] (the chunk length), got {lens.tolist()}")
        if int(start.min()) < 0:
            raise ValueError(f"start_pos: expected >= 0, got {start.tolist()}")
        end = int((start + lens).max())
        if end > max_seq_len:
            raise ValueError(f"start_pos + sequence length: expected <= max_seq_len {max_seq_len}, got {end}")
        return cls(start, lens, width, uniform, max_seq_len)

    @property
    def end(self) -> torch.Tensor:
        """[B] first position after each row's valid tokens."""
        return self.start + self.seqlens

    def positions(self) -> torch.Tensor:
        """[B, S] absolute positions; padding positions are clamped below the limit (their results are dropped)."""
        pos = self.start[:, None] + torch.arange(self.width, device=self.start.device)
        return pos.clamp(max=self.limit - 1)

    def query_valid(self) -> torch.Tensor:
        """[B, S] True for real tokens, False for right padding."""
        return torch.arange(self.width, device=self.start.device) < self.seqlens[:, None]

    def keys(self, cached: bool) -> list[int]:
        """Keys each row attends: its cached length after the append (cached) or its own valid tokens."""
        return (self.end if cached else self.seqlens).tolist()

    def causal_mask(self, row: int, keys: int, cached: bool) -> torch.Tensor | None:
        """[S, T] True where key t is at or before query i of `row`; None for a one-token chunk (nothing masked).

        cached: key t is absolute position t; otherwise key t is the chunk's own token t. A padding query sits past
        every valid key, so it sees them all (its output is dropped); no query row is ever fully masked.
        """
        if self.width == 1:
            return None
        offset = int(self.start[row]) if cached else 0
        q_pos = offset + torch.arange(self.width, device=self.start.device)
        return torch.arange(keys, device=self.start.device) <= q_pos[:, None]


def _row_tensor(name: str, value: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected an int or an integer tensor [batch], got {value!r}")
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.long, device=device)
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool \
            or tuple(value.shape) != (batch,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected an int or an integer tensor of shape ({batch},), got {shape}")
    return value.to(device=device, dtype=torch.long)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """softmax over the last dim in fp32 (fp64 for fp64 scores) with disallowed keys excluded, cast to `dtype`
    (the official code's order: scores in the activation dtype, softmax in fp32, probabilities cast back)."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(dtype)


def attend_heads(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """One row's attention: q [H, S, dk], keys [H_kv, T, dk], values [H_kv, T, dv] -> [H, S, dv].

    Query head h uses key/value head h // (H / H_kv) (MHA, GQA, MQA). Each KV head is one pair of 2-D matmuls
    over its [T, d] slice of the cache, which CPU BLAS reads in place (a batched matmul would first copy a
    strided cache slice).
    """
    heads, seqlen, _ = q.shape
    kv_heads, n_keys = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    q = q.reshape(kv_heads, group * seqlen, -1)  # heads sharing a KV head are consecutive
    scores = torch.stack([q[g] @ keys[g].T for g in range(kv_heads)]) * scale  # [H_kv, G*S, T]
    probs = masked_softmax(scores.view(kv_heads, group, seqlen, n_keys), allowed, q.dtype)
    probs = probs.view(kv_heads, group * seqlen, n_keys)
    return torch.stack([probs[g] @ values[g] for g in range(kv_heads)]).view(heads, seqlen, -1)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., w] -> (float8_e4m3fn [..., w], fp32 scale [...]) with one scale amax / 448 per token."""
    scale = scale_from_amax(x.abs().amax(dim=-1))  # the 1x128 quantizer's rule, over a whole token
    return (x.float() / scale[..., None]).to(FP8), scale


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_per_token`, in `dtype`."""
    return (q.float() * scale[..., None]).to(dtype)


class _Rows(ABC):
    """Per-row lengths and capacity, and the append checks every cache shares."""

    def __init__(self, batch: int, max_len: int, device: torch.device | str | None, dtype: torch.dtype) -> None:
        for name, value in (("batch", batch), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CacheError(f"{name}: expected a positive integer, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            raise CacheError(f"dtype: expected a float dtype of 2 or more bytes (FP8 is the fp8=True option of "
                             f"the latent cache), got {dtype}")
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)

    def _advance(self, span: Span, tensors: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        """Check a chunk (and each tensor's [B, S, *shape]) against the rows, then update the lengths."""
        for name, (tensor, shape) in tensors.items():
            if tuple(tensor.shape) != (self.batch, span.width, *shape):
                raise CacheError(f"{name}: expected shape {(self.batch, span.width, *shape)} for this cache, "
                                 f"got {tuple(tensor.shape)}")
        gap = span.start > self.lengths
        if bool(gap.any()):
            row = int(gap.nonzero()[0, 0])
            raise CacheError(f"start_pos: expected <= the cached length {int(self.lengths[row])} of row {row} "
                             f"(a gap would be left), got {int(span.start[row])}")
        longest = int(span.end.max())
        if longest > self.max_len:
            raise CacheError(f"start_pos + sequence length: expected <= the cache capacity {self.max_len}, "
                             f"got {longest}")
        self.lengths = span.end.clone()

    @staticmethod
    def _token_index(span: Span) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, chunk offset, absolute position) of every valid token of a chunk, each [N]."""
        rows, offsets = span.query_valid().nonzero(as_tuple=True)
        return rows, offsets, span.start[rows] + offsets

    def rewind(self, lengths: int | torch.Tensor) -> None:
        """Shorten the rows to `lengths` (an int for every row, or [B]); a row cannot grow this way."""
        new = _row_tensor("lengths", lengths, self.batch, self.lengths.device)
        bad = (new < 0) | (new > self.lengths)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise CacheError(f"lengths: expected 0 <= length <= the cached length {int(self.lengths[row])} of row "
                             f"{row}, got {int(new[row])}")
        self.lengths = new.clone()

    def nbytes(self) -> int:
        """Bytes of the stored payload (data and scales)."""
        return sum(t.numel() * t.element_size() for t in self._payload())

    def slots(self) -> int:
        """Token slots the payload has room for."""
        return self.batch * self.max_len

    def bytes_per_token(self) -> float:
        """True size per token slot: nbytes() / slots()."""
        return self.nbytes() / self.slots()

    @abstractmethod
    def _payload(self) -> list[torch.Tensor]:
        """The tensors that hold cached tokens."""


class KVCache(_Rows):
    """Per-head keys and values, head-major: k [B, H, L, k_dim], v [B, H, L, v_dim]."""

    def __init__(self, batch: int, max_len: int, heads: int, k_dim: int, v_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__(batch, max_len, device, dtype)
        self.k = torch.zeros(batch, heads, max_len, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads, max_len, v_dim, dtype=dtype, device=device)

    def append(self, span: Span, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the valid tokens of k [B, S, H, k_dim] and v [B, S, H, v_dim]."""
        heads, k_dim, v_dim = self.k.shape[1], self.k.shape[3], self.v.shape[3]
        self._advance(span, {"k": (k, (heads, k_dim)), "v": (v, (heads, v_dim))})
        if span.uniform is not None:
            s = span.uniform
            self.k[:, :, s: s + span.width] = k.transpose(1, 2)
            self.v[:, :, s: s + span.width] = v.transpose(1, 2)
        else:
            rows, offsets, pos = self._token_index(span)
            self.k[rows, :, pos] = k[rows, offsets].to(self.dtype)
            self.v[rows, :, pos] = v[rows, offsets].to(self.dtype)

    def row(self, b: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's first `keys` tokens: k [H, T, k_dim], v [H, T, v_dim] (views)."""
        return self.k[b, :, :keys], self.v[b, :, :keys]

    def _payload(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class LatentCache(_Rows):
    """MLA's latent cache: kv [B, L, kv_lora_rank] (dtype, or e4m3 + fp32 scale [B, L]) and pe [B, L, rope_dim]."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 fp8: bool = False) -> None:
        super().__init__(batch, max_len, device, dtype)
        self.fp8 = fp8
        self.kv, self.pe, self.scale = self._storage((batch, max_len), kv_lora_rank, rope_dim, device)

    def _storage(self, slots: tuple[int, int], rank: int, rope_dim: int,
                 device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        kv = torch.zeros(*slots, rank, dtype=torch.float8_e4m3fn if self.fp8 else self.dtype, device=device)
        scale = torch.zeros(slots, dtype=torch.float32, device=device) if self.fp8 else None
        return kv, torch.zeros(*slots, rope_dim, dtype=self.dtype, device=device), scale

    def _encode(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return quantize_per_token(kv) if self.fp8 else (kv.to(self.dtype), None)

    def _decode(self, kv: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return dequantize_per_token(kv, scale, self.dtype) if self.fp8 else kv

    def _check(self, span: Span, kv: torch.Tensor, pe: torch.Tensor) -> None:
        self._advance(span, {"kv": (kv, (self.kv.shape[-1],)), "pe": (pe, (self.pe.shape[-1],))})

    def append(self, span: Span, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store the valid tokens of kv_norm(c) [B, S, kv_lora_rank] and the roped k_pe [B, S, rope_dim]."""
        self._check(span, kv, pe)
        if span.uniform is not None:
            self._write((slice(None), slice(span.uniform, span.uniform + span.width)), kv, pe)
        else:
            rows, offsets, pos = self._token_index(span)
            self._write((rows, pos), kv[rows, offsets], pe[rows, offsets])

    def _write(self, where: tuple, kv: torch.Tensor, pe: torch.Tensor) -> None:
        kv, scale = self._encode(kv)
        self.kv[where] = kv
        self.pe[where] = pe.to(self.dtype)
        if scale is not None:
            self.scale[where] = scale

    def row(self, b: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's first `keys` tokens: kv [T, kv_lora_rank] and pe [T, rope_dim] in dtype (views unless fp8)."""
        scale = self.scale[b, :keys] if self.fp8 else None
        return self._decode(self.kv[b, :keys], scale), self.pe[b, :keys]

    def _payload(self) -> list[torch.Tensor]:
        return [t for t in (self.kv, self.pe, self.scale) if t is not None]


class PagedLatentCache(LatentCache):
    """The latent cache in a pool of blocks: kv [N, block_size, rank], pe [N, block_size, rope_dim], scale
    [N, block_size]; row b's token p lives in block block_table[b, p // block_size] at slot p % block_size.

    block_table defaults to consecutive blocks; pass a permuted one (FlashMLA's tests do) to check that results
    do not depend on the physical placement. poison=True fills every slot with NaN until it is written.
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None, fp8: bool = False,
                 block_size: int = BLOCK_SIZE, num_blocks: int | None = None,
                 block_table: torch.Tensor | None = None, poison: bool = True) -> None:
        _Rows.__init__(self, batch, max_len, device, dtype)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise CacheError(f"block_size: expected a positive integer, got {block_size!r}")
        self.fp8, self.block_size = fp8, block_size
        per_row = math.ceil(max_len / block_size)
        num_blocks = batch * per_row if num_blocks is None else num_blocks
        if block_table is None:
            block_table = torch.arange(batch * per_row).view(batch, per_row)
        self.block_table = self._check_table(block_table, (batch, per_row), num_blocks).to(device)
        self.kv, self.pe, self.scale = self._storage((num_blocks, block_size), kv_lora_rank, rope_dim, device)
        if poison:
            for t in self._payload():
                t.fill_(float("nan"))

    @staticmethod
    def _check_table(table: torch.Tensor, shape: tuple[int, int], num_blocks: int) -> torch.Tensor:
        if not isinstance(table, torch.Tensor) or table.dtype.is_floating_point or tuple(table.shape) != shape:
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise CacheError(f"block_table: expected an integer tensor of shape {shape}, got {got}")
        flat = table.flatten().long()
        if int(flat.min()) < 0 or int(flat.max()) >= num_blocks:
            raise CacheError(f"block_table: expected block ids in [0, {num_blocks}), got "
                             f"{int(flat.min())}..{int(flat.max())}")
        if flat.unique().numel() != flat.numel():
            raise CacheError("block_table: expected every block id at most once (rows must not share blocks)")
        return table.to(torch.int32)

    def slots(self) -> int:
        return self.kv.shape[0] * self.block_size

    def append(self, span: Span, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """As LatentCache.append, through the block table."""
        self._check(span, kv, pe)
        rows, offsets, pos = self._token_index(span)
        blocks = self.block_table[rows, pos // self.block_size].long()
        self._write((blocks, pos % self.block_size), kv[rows, offsets], pe[rows, offsets])

    def row(self, b: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row b's first `keys` tokens gathered from its blocks: kv [T, rank], pe [T, rope_dim] (copies)."""
        blocks = self.block_table[b, : math.ceil(keys / self.block_size)].long()

        def gather(pool: torch.Tensor) -> torch.Tensor:
            return pool[blocks].flatten(0, 1)[:keys]  # [nb, bs, *] -> [T, *]

        return self._decode(gather(self.kv), gather(self.scale) if self.fp8 else None), gather(self.pe)
