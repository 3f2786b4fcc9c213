"""Conformance of speculative decoding with MTP drafts (dsv3ref.speculative) to plain decoding.

Greedy: speculative decoding emits exactly the tokens of plain greedy decoding (hypothesis over models, prompts,
lengths, batch, draft length, EOS and the cache kind), whatever the drafts; models are float64 with a small
vocabulary so that roughly 1 in V drafts is accepted and both the accept and the rollback paths run. Sampled: the
rejection rule's output follows the target distribution (chi-square on a 5-token vocabulary, fixed seed), and the
joint distribution of the first three sampled tokens of a whole speculative generation equals the model's exact
one (chi-square against the product of its conditional distributions). The p-value floor 1e-4 is for a fixed
seed: the tests are deterministic, and a wrong rule (no residual, or accepting by exact match) fails them by
hundreds of standard deviations.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from dsv3ref.config import ModelConfig
from dsv3ref.generate import Sampling, generate, sampling_probs
from dsv3ref.model import Transformer
from dsv3ref.mtp import MTP
from dsv3ref.speculative import speculative_generate, verify_drafts

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("model")]

TINY = ModelConfig.preset("dsv3-tiny")
P_FLOOR = 1e-4


def _pair(vocab: int, depth: int, seed: int, init_std: float = 0.02,
          device: str = "cpu") -> tuple[Transformer, MTP]:
    cfg = TINY.replace(vocab_size=vocab, mtp_depth=depth, max_seq_len=48)
    torch.manual_seed(seed)
    model = Transformer(cfg, init_std=init_std).double().to(device).eval()
    mtp = MTP(cfg, init_std=init_std).double().to(device).eval()
    return model, mtp


@given(seed=st.integers(0, 2**16), vocab=st.sampled_from([3, 5]), depth=st.integers(1, 2),
       lens=st.lists(st.integers(1, 7), min_size=1, max_size=3), max_new=st.integers(1, 10),
       paged=st.booleans(), eos=st.booleans(), data=st.data())
def test_speculative_greedy_equals_plain_greedy(seed, vocab, depth, lens, max_new, paged, eos, data):
    model, mtp = _pair(vocab, depth, seed)
    draft_len = data.draw(st.integers(1, depth), label="draft_len")
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    eos_id = 0 if eos else None
    plain = generate(model, prompts, max_new, eos_id=eos_id, paged=paged)
    spec = speculative_generate(model, mtp, prompts, max_new, draft_len=draft_len, eos_id=eos_id, paged=paged)
    assert spec.tokens == plain.tokens
    assert spec.stop == plain.stop
    assert spec.accepted <= spec.drafted
    assert spec.row_forwards <= plain.steps * len(prompts) + len(prompts)


def test_max_seq_len_stops_drafting():
    """Drafts never run past max_seq_len: a row generating up to the limit still equals plain decoding."""
    model, mtp = _pair(3, 2, seed=1)
    prompts = [[1] * 40, [2] * 45]
    plain = generate(model, prompts, 20)
    spec = speculative_generate(model, mtp, prompts, 20, draft_len=2, paged=True)
    assert spec.tokens == plain.tokens and spec.stop == plain.stop == ["max_seq_len", "max_seq_len"]


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of counts against probabilities; cells expecting < 5 are pooled into one."""
    expected = probs.double() / probs.double().sum() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum()[None].double()])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    return float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def test_rejection_rule_preserves_the_target_distribution():
    """Fixed p_1, p_2 and drafts d_j ~ q_j over 5 tokens for 40000 rows: the first emitted token (d_1 or the
    residual draw) follows p_1, the second (where d_1 was accepted) follows p_2."""
    g = torch.Generator().manual_seed(0)
    v, n, rows = 5, 2, 40_000
    p = (torch.randn(n + 1, v, generator=g) * 1.5).softmax(-1)
    q = (torch.randn(n, v, generator=g) * 1.5).softmax(-1)
    drafts = torch.stack([torch.multinomial(q[j], rows, replacement=True, generator=g) for j in range(n)], dim=1)
    sampling = Sampling(temperature=1.0)
    a, nxt = verify_drafts(p.expand(rows, -1, -1), q.expand(rows, -1, -1), drafts, torch.full((rows,), n),
                           sampling, g)
    first = torch.where(a >= 1, drafts[:, 0], nxt)
    assert _chi2_p(torch.bincount(first, minlength=v), p[0]) > P_FLOOR
    second = torch.where(a >= 2, drafts[:, 1], nxt)[a >= 1]
    assert _chi2_p(torch.bincount(second, minlength=v), p[1]) > P_FLOOR
    assert 0 < float((a == 0).float().mean()) < 1  # both paths ran


def test_sampled_generation_matches_the_model_distribution():
    """2500 rows of one prompt, 3 sampled tokens over a 3-token vocabulary with 1 draft per step: the joint
    distribution of (t1, t2, t3) equals p(t1) p(t2 | t1) p(t3 | t1 t2) from full passes of the model."""
    vocab, rows = 3, 2500
    model, mtp = _pair(vocab, 1, seed=2, init_std=0.3)
    sampling = Sampling(temperature=1.0, top_p=0.95, seed=5)
    prompt = [1, 0, 2]
    spec = speculative_generate(model, mtp, [prompt] * rows, 3, sampling=sampling)
    assert 0 < spec.accepted < spec.drafted  # both paths ran
    counts = torch.zeros(vocab**3)
    for t in spec.tokens:
        counts[t[0] * vocab**2 + t[1] * vocab + t[2]] += 1
    probs = torch.zeros(vocab**3)
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=2):
            x = torch.tensor([prompt + list(seq)])
            dist = sampling_probs(model(x)[0], sampling)  # [S, V]
            p1, p2, p3 = dist[len(prompt) - 1], dist[len(prompt)][seq[1]], dist[len(prompt) + 1]
            probs[seq[0] * vocab**2 + seq[1] * vocab: seq[0] * vocab**2 + seq[1] * vocab + vocab] = \
                p1[seq[0]] * p2 * p3
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    assert _chi2_p(counts, probs) > P_FLOOR


@pytest.mark.gpu
def test_speculative_greedy_on_cuda():
    """The same equality on CUDA, contiguous and paged caches."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, mtp = _pair(5, 2, seed=3, device="cuda")
    prompts = [[1, 2, 3], [4, 0, 1, 2, 3, 4]]
    for paged in (False, True):
        plain = generate(model, prompts, 12, paged=paged)
        assert speculative_generate(model, mtp, prompts, 12, draft_len=2, paged=paged).tokens == plain.tokens
