"""Speculative decoding with the MTP modules as the drafter (DeepSeek-V3 §5.4.3: MTP predicts the token after
next, the main model verifies it in its next step).

Each step of a row whose sequence is x_0..x_c (x_c sampled, not yet in the main cache):
1. draft: MTP module k (k = 1..n, n = draft_len <= D) reads the main model's hidden state (k = 1) or module
   k-1's, and the embedding of x_{i+k} (a draft where i + k > c), and proposes d_k = x_{c+k} from its
   distribution q_k at position c-1;
2. verify: one main-model step over [x_c, d_1..d_n] gives the target distributions p_1..p_{n+1};
3. accept: d_j is kept with probability min(1, p_j(d_j) / q_j(d_j)) (greedy: when it is p_j's argmax) until the
   first rejection, where a token is drawn from the residual max(0, p_j - q_j) renormalised (greedy: p_j's
   argmax); when all n are kept, a bonus token is drawn from p_{n+1}. This is the standard rejection rule
   (Leviathan et al. 2023; Chen et al. 2023): every emitted token is distributed exactly as plain sampling from
   the main model would draw it, and greedy speculative decoding emits exactly plain greedy decoding's tokens;
4. roll back: the main cache keeps x_c, d_1..d_a (a accepted) and drops the rest (`ModelCache.rewind`); each MTP
   module's cache keeps the positions computed from accepted tokens only (< c + a + 1 - n) and recomputes the
   rest in the next draft from a buffer of the main model's last hidden states.

Stops (EOS, max_new_tokens, max_seq_len) as `dsv3ref.generate.generate`: tokens after a stop are discarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv3ref.generate import (
    Sampling,
    _check_args,
    check_prompts,
    padded,
    sample,
    sampling_probs,
)
from dsv3ref.model import Transformer
from dsv3ref.mtp import MTP, MTPError

GREEDY = Sampling()


@dataclass(frozen=True)
class SpeculativeGeneration:
    """Tokens and stop reasons per row (as `Generation`), and counts over all rows: `drafted` and `accepted`
    draft tokens, `row_forwards` (main-model forwards per row summed: the prefill and each verify step) and
    `steps` (verify steps run)."""

    tokens: list[list[int]]
    stop: list[str]
    steps: int
    drafted: int
    accepted: int
    row_forwards: int

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (NaN without drafts)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        """Emitted tokens per main-model forward of a row (1 for plain decoding)."""
        return sum(len(t) for t in self.tokens) / self.row_forwards


def check_draft_len(mtp: MTP | None, draft_len: int) -> None:
    """A drafter is needed (an MTP with weights) and 1 <= draft_len <= its depth."""
    if mtp is None:
        raise MTPError("mtp: speculative decoding needs MTP modules (a checkpoint with mtp.{k}.* weights, or a "
                       "trained MTP), got none")
    if isinstance(draft_len, bool) or not isinstance(draft_len, int) or not 1 <= draft_len <= mtp.depth:
        raise MTPError(f"draft_len: expected an integer in [1, {mtp.depth}] (the MTP depth), got {draft_len!r}")


def verify_drafts(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, n_valid: torch.Tensor,
                  sampling: Sampling, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule for a batch: p [B, n+1, V] target distributions (greedy: logits), q [B, n, V] the draft
    distributions (None when greedy), drafts [B, n], n_valid [B] drafts to check per row. Returns the accepted
    count a [B] and the token emitted after them [B] (residual or bonus)."""
    b, n = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    j = torch.arange(n, device=drafts.device)
    if sampling.temperature == 0:
        ok = p[:, :n].argmax(dim=-1) == drafts
    else:
        ratio = p[:, :n].gather(-1, drafts[..., None]).squeeze(-1) / q.gather(-1, drafts[..., None]).squeeze(-1)
        ok = torch.rand(b, n, generator=generator, device=drafts.device) < ratio
    ok = ok & (j[None] < n_valid[:, None])
    a = ok.long().cumprod(dim=1).sum(dim=1)  # [B] the accepted prefix
    if sampling.temperature == 0:
        return a, p[rows, a].argmax(dim=-1)
    target = p[rows, a]  # [B, V]
    if n:
        residual = (target - q[rows, a.clamp(max=n - 1)]).clamp(min=0)
        mass = residual.sum(dim=-1, keepdim=True)
        rejected = (a < n_valid)[:, None] & (mass > 0)  # mass 0 only when p == q, where nothing is rejected
        target = torch.where(rejected, residual / mass.clamp(min=torch.finfo(mass.dtype).tiny), target)
    return a, torch.multinomial(target, 1, generator=generator).squeeze(-1)


class _Rows:
    """Per-row state: the sequence (prompt + output), the main model's hidden states at the positions the MTP
    caches still have to (re)compute, and whether the row has stopped."""

    def __init__(self, rows: list[list[int]], hidden: torch.Tensor) -> None:
        self.seqs = [list(r) for r in rows]
        self.prompt_len = [len(r) for r in rows]
        self.hbuf = [hidden[b, : len(r)] for b, r in enumerate(rows)]  # the MTP caches start empty
        self.stop: list[str | None] = [None] * len(rows)

    def cached(self, b: int) -> int:
        """c: the main cache's length (every token but the last)."""
        return len(self.seqs[b]) - 1

    def active(self) -> list[int]:
        return [b for b, s in enumerate(self.stop) if s is None]


class _Decoder:
    """The caches and the draft / verify / rollback of one speculative generation."""

    def __init__(self, model: Transformer, mtp: MTP, rows: list[list[int]], max_new_tokens: int, n: int,
                 paged: bool) -> None:
        self.model, self.mtp, self.n = model, mtp, n
        self.device = model.embed.weight.device
        capacity = max(len(r) for r in rows) + max_new_tokens + n
        self.cache = model.new_cache(len(rows), capacity, paged=paged)
        self.mtp_caches = mtp.new_caches(len(rows), capacity, paged=paged)[:n]

    def _mtp_step(self, k: int, h_prev: torch.Tensor, emb_tokens: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        """Module k (0-based) over [B, m] positions after its cached ones -> its hidden states [B, m, D]."""
        cache = self.mtp_caches[k]
        start = cache.lengths.clone()
        uniform = bool((start == start[0]).all()) and bool((seqlens == h_prev.shape[1]).all())
        pos: int | torch.Tensor = int(start[0]) if uniform else start
        return self.mtp.layers[k](h_prev, self.model.embed(emb_tokens), pos, cache.layers[0],
                                  None if uniform else seqlens)

    def draft(self, st: _Rows, active: list[int], sampling: Sampling,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [B, n] and their distributions [B, n, V] (None when greedy); rows not active draft nothing."""
        b_all = len(st.seqs)
        m = torch.zeros(b_all, dtype=torch.long)
        for b in active:
            m[b] = st.hbuf[b].shape[0]
        width = int(m.max())
        w = self.model.embed.weight
        h = torch.zeros(b_all, width, w.shape[1], device=self.device, dtype=w.dtype)
        for b in active:
            h[b, : int(m[b])] = st.hbuf[b]
        drafts = torch.zeros(b_all, self.n, dtype=torch.long, device=self.device)
        qs = []
        rows = torch.arange(b_all, device=self.device)
        last = (m - 1).clamp(min=0).to(self.device)
        for k in range(self.n):
            tokens = torch.zeros(b_all, width, dtype=torch.long)
            for b in active:  # position i (of c - m .. c - 1) reads x_{i+k+1}: the sequence, then the drafts
                c = st.cached(b)
                ext = st.seqs[b] + drafts[b, :k].tolist()
                tokens[b, : int(m[b])] = torch.tensor(ext[c - int(m[b]) + k + 1: c + k + 1])
            h = self._mtp_step(k, h, tokens.to(self.device), m.to(self.device))
            logits = self.mtp.logits(self.model, k, h[rows, last])  # [B, V] at position c - 1
            if sampling.temperature == 0:
                drafts[:, k] = logits.argmax(dim=-1)
            else:
                q = sampling_probs(logits, sampling)
                drafts[:, k] = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                qs.append(q)
        return drafts, torch.stack(qs, dim=1) if qs else None

    def verify(self, st: _Rows, active: list[int], drafts: torch.Tensor,
               n_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The main model over [x_c, d_1..d_{n_b}] per active row: logits [B, n+1, V] and hidden [B, n+1, D]."""
        b_all = len(st.seqs)
        tokens = torch.cat([torch.tensor([s[-1] for s in st.seqs], device=self.device)[:, None], drafts], dim=1)
        seqlens = torch.zeros(b_all, dtype=torch.long, device=self.device)
        seqlens[active] = n_valid[active].to(self.device) + 1
        full = len(active) == b_all and bool((seqlens == tokens.shape[1]).all())
        step = self.model.extend(tokens, self.cache, None if full else seqlens, all_logits=True)
        return step.logits, step.hidden

    def roll_back(self, st: _Rows, before: list[int], hidden: torch.Tensor, accepted: torch.Tensor,
                  active: list[int]) -> None:
        """Main cache: keep x_c and the accepted drafts. MTP caches: keep positions < min(c, c' - n) (computed
        from accepted tokens only); the hidden buffer covers the rest up to c' - 1."""
        main = self.cache.lengths.clone()
        keep = self.mtp_caches[0].lengths.clone()
        for b in active:
            c, a = before[b], int(accepted[b])
            main[b] = c + a + 1
            r_old = c - st.hbuf[b].shape[0]
            r_new = max(0, min(c, c + a + 1 - self.n))
            st.hbuf[b] = torch.cat([st.hbuf[b][r_new - r_old:], hidden[b, : a + 1]])
            keep[b] = r_new
        self.cache.rewind(main)
        for cache in self.mtp_caches:
            cache.rewind(keep)


@torch.no_grad()
def speculative_generate(model: Transformer, mtp: MTP | None, prompts: Sequence[Sequence[int]] | torch.Tensor,
                         max_new_tokens: int, *, draft_len: int = 1, eos_id: int | None = None,
                         sampling: Sampling = GREEDY, paged: bool = False) -> SpeculativeGeneration:
    """Generate as `dsv3ref.generate.generate` (same tokens when greedy; the same distribution when sampling),
    drafting `draft_len` tokens per step with the first MTP modules and verifying them in one main-model step."""
    check_draft_len(mtp, draft_len)
    rows = check_prompts(model, prompts)
    _check_args(model, max_new_tokens, eos_id)
    if mtp.cfg.hidden_size != model.cfg.hidden_size or mtp.cfg.vocab_size != model.cfg.vocab_size:
        raise MTPError(f"mtp: built for {mtp.cfg.name} (hidden {mtp.cfg.hidden_size}), not for the model "
                       f"{model.cfg.name} (hidden {model.cfg.hidden_size})")
    dec = _Decoder(model, mtp, rows, max_new_tokens, draft_len, paged)
    generator = sampling.generator(dec.device)
    tokens, lens = padded(rows, dec.device)
    step = model.extend(tokens, dec.cache, None if bool((lens == lens[0]).all()) else lens)
    st = _Rows(rows, step.hidden)
    first = sample(step.logits, sampling, generator).tolist()
    for b, t in enumerate(first):
        _emit(st, b, [t], model.cfg.max_seq_len, max_new_tokens, eos_id)
    steps, drafted, accepted, forwards = 0, 0, 0, len(rows)
    max_len = model.cfg.max_seq_len
    while active := st.active():
        before = [st.cached(b) for b in range(len(rows))]
        n_valid = torch.zeros(len(rows), dtype=torch.long)
        for b in active:  # no drafts past the token budget or max_seq_len
            left = min(max_new_tokens - (len(st.seqs[b]) - st.prompt_len[b]), max_len - len(st.seqs[b]))
            n_valid[b] = max(0, min(draft_len, left - 1))
        drafts, q = dec.draft(st, active, sampling, generator)
        logits, hidden = dec.verify(st, active, drafts, n_valid)
        p = logits if sampling.temperature == 0 else sampling_probs(logits, sampling)
        a, nxt = verify_drafts(p, q, drafts, n_valid.to(dec.device), sampling, generator)
        dec.roll_back(st, before, hidden, a, active)
        for b in active:
            _emit(st, b, drafts[b, : int(a[b])].tolist() + [int(nxt[b])], max_len, max_new_tokens, eos_id)
            drafted, accepted = drafted + int(n_valid[b]), accepted + int(a[b])
        steps, forwards = steps + 1, forwards + len(active)
    out = [s[n:] for s, n in zip(st.seqs, st.prompt_len, strict=True)]
    return SpeculativeGeneration(out, [str(s) for s in st.stop], steps, drafted, accepted, forwards)


def _emit(st: _Rows, b: int, tokens: list[int], max_seq_len: int, max_new_tokens: int, eos_id: int | None) -> None:
    """Append tokens to row b until a stop (the tokens after it are dropped)."""
    for token in tokens:
        st.seqs[b].append(token)
        if eos_id is not None and token == eos_id:
            st.stop[b] = "eos"
        elif len(st.seqs[b]) - st.prompt_len[b] == max_new_tokens:
            st.stop[b] = "max_new_tokens"
        elif len(st.seqs[b]) == max_seq_len:
            st.stop[b] = "max_seq_len"
        if st.stop[b] is not None:
            return

