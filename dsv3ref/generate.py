"""Sampling and the generate loop: prefill every prompt into the model's caches, then decode one token per row per
step until each row stops (EOS, its token budget, or max_seq_len).

Sampling: temperature 0 is greedy (argmax); otherwise softmax(logits / temperature) in fp32, restricted to the
nucleus (the smallest set of most likely tokens whose probability reaches `top_p`, renormalised) and drawn from a
seeded `torch.Generator`, so a run is reproducible. Rows of different prompt lengths run in one batch: prompts are
right-padded for the prefill (`seqlens`), every row then continues at its own position, and a finished row is no
longer extended (its cache stops growing). `use_cache=False` recomputes the whole prefix with one causal pass per
generated token: the reference the cached loop must reproduce, and the baseline of its speed-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv3ref.model import ModelInputError, Transformer

STOP_REASONS = ("eos", "max_new_tokens", "max_seq_len")


class GenerateError(ModelInputError):
    """A bad argument to sampling or generation; the message names it and what was expected."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 = greedy; top_p in (0, 1] keeps the nucleus; seed fixes draws."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerateError(f"temperature: expected a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise GenerateError(f"seed: expected an integer, got {self.seed!r}")

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded with `seed` on `device` (None when greedy: nothing is drawn)."""
        return None if self.temperature == 0 else torch.Generator(device=device).manual_seed(self.seed)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] (int64) from logits [B, V]."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise GenerateError(f"logits: expected a [batch, vocab] tensor, got shape {tuple(logits.shape)}")
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, sampling), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution [..., V] (fp32) tokens are drawn from when sampling (temperature > 0): softmax of
    logits / temperature, restricted to the top_p nucleus and renormalised."""
    probs = (logits.float() / sampling.temperature).softmax(dim=-1)
    if sampling.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class Generation:
    """The generated tokens of each row (EOS included when the row stopped on it), why each row stopped (one of
    STOP_REASONS) and the number of decode steps run after the prefill."""

    tokens: list[list[int]]
    stop: list[str]
    steps: int


def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """The prompts as lists of ids; a GenerateError names the first bad one (empty, ids outside the vocabulary,
    too long to generate a token within max_seq_len)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
            raise GenerateError(f"prompts: expected an integer tensor [batch, length], got {prompts.dtype} "
                                f"{tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise GenerateError("prompts: expected a non-empty sequence of token-id sequences")
    cfg, rows = model.cfg, []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise GenerateError(f"prompts[{i}]: expected a sequence of token ids, got {type(prompt).__name__}")
        if len(prompt) == 0:
            raise GenerateError(f"prompts[{i}]: expected at least one token, got an empty prompt")
        if len(prompt) >= cfg.max_seq_len:
            raise GenerateError(f"prompts[{i}]: expected at most {cfg.max_seq_len - 1} tokens (max_seq_len "
                                f"{cfg.max_seq_len} leaves room for one generated token), got {len(prompt)}")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerateError(f"prompts[{i}]: expected token ids in [0, {cfg.vocab_size}), got {bad[0]!r}")
        rows.append(list(prompt))
    return rows


def _check_args(model: Transformer, max_new_tokens: int, eos_id: int | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < model.cfg.vocab_size):
        raise GenerateError(f"eos_id: expected None or a token id in [0, {model.cfg.vocab_size}), got {eos_id!r}")


def padded(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, longest] (padding id 0) and the row lengths [B]."""
    lens = torch.tensor([len(r) for r in rows], device=device)
    tokens = torch.zeros(len(rows), int(lens.max()), dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = torch.tensor(r, device=device)
    return tokens, lens


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int, *,
             eos_id: int | None = None, sampling: Sampling = Sampling(), use_cache: bool = True,
             paged: bool = False, fp8_cache: bool = False) -> Generation:
    """Generate up to `max_new_tokens` per prompt (a row also stops at `eos_id` and at max_seq_len tokens in all).

    use_cache: prefill once, then one cached token per row per step (paged / fp8_cache choose the latent cache;
    the absorbed mode only); False recomputes the whole prefix every step.
    """
    rows = check_prompts(model, prompts)
    _check_args(model, max_new_tokens, eos_id)
    device = model.embed.weight.device
    generator = sampling.generator(device)
    out: list[list[int]] = [[] for _ in rows]
    stop: list[str | None] = [None] * len(rows)
    decode = _Cached(model, rows, max_new_tokens, paged, fp8_cache) if use_cache else _Recompute(model, rows)
    logits, steps = decode.first(), 0
    while True:
        chosen = sample(logits, sampling, generator).tolist()
        for b, token in zip(decode.active, chosen, strict=True):
            out[b].append(token)
            if eos_id is not None and token == eos_id:
                stop[b] = "eos"
            elif len(out[b]) == max_new_tokens:
                stop[b] = "max_new_tokens"
            elif len(rows[b]) + len(out[b]) == model.cfg.max_seq_len:
                stop[b] = "max_seq_len"
        active = [b for b in range(len(rows)) if stop[b] is None]
        if not active:
            return Generation(out, [str(s) for s in stop], steps)
        logits, steps = decode.next(active, out), steps + 1


class _Cached:
    """The cached loop: one prefill of the padded prompts, then one token per active row per step."""

    def __init__(self, model: Transformer, rows: list[list[int]], max_new_tokens: int, paged: bool,
                 fp8: bool) -> None:
        self.model, self.rows = model, rows
        self.device = model.embed.weight.device
        capacity = max(len(r) for r in rows) + max_new_tokens - 1
        self.cache = model.new_cache(len(rows), capacity, paged=paged, fp8=fp8)
        self.active = list(range(len(rows)))

    def first(self) -> torch.Tensor:
        tokens, lens = padded(self.rows, self.device)
        uniform = bool((lens == lens[0]).all())
        return self.model.extend(tokens, self.cache, None if uniform else lens).logits

    def next(self, active: list[int], out: list[list[int]]) -> torch.Tensor:
        last = torch.tensor([out[b][-1] if out[b] else 0 for b in range(len(self.rows))], device=self.device)
        seqlens = None
        if len(active) < len(self.rows):
            seqlens = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
            seqlens[active] = 1  # finished rows take no token: their caches stop growing
        self.active = active
        return self.model.extend(last[:, None], self.cache, seqlens).logits[active]


class _Recompute:
    """The reference loop: every step runs one causal pass over each active row's whole sequence."""

    def __init__(self, model: Transformer, rows: list[list[int]]) -> None:
        self.model, self.rows = model, rows
        self.device = model.embed.weight.device
        self.active = list(range(len(rows)))

    def _last_logits(self, seqs: list[list[int]]) -> torch.Tensor:
        tokens, lens = padded(seqs, self.device)
        hidden = self.model.hidden(tokens)  # right padding is causal-safe: earlier positions never see it
        return self.model.logits(hidden[torch.arange(len(seqs), device=self.device), lens - 1])

    def first(self) -> torch.Tensor:
        return self._last_logits(self.rows)

    def next(self, active: list[int], out: list[list[int]]) -> torch.Tensor:
        self.active = active
        return self._last_logits([self.rows[b] + out[b] for b in active])
