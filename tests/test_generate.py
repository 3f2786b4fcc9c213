"""dsv3ref.generate: sampling rules, stopping, batches of different prompt lengths, one clear error per bad input."""

from __future__ import annotations

import pytest
import torch

from dsv3ref.config import ModelConfig
from dsv3ref.generate import GenerateError, Sampling, generate, sample
from dsv3ref.model import Transformer

TINY = ModelConfig.preset("dsv3-tiny")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).double().eval()


def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 0.0, 4.9]])
    assert sample(logits, Sampling()).tolist() == [1, 0]
    assert Sampling().generator(torch.device("cpu")) is None


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8), never 2 or 3
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(4000, 1)
    s = Sampling(temperature=1.0, top_p=0.75, seed=3)
    drawn = sample(logits, s, s.generator(torch.device("cpu")))
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03  # renormalised within the nucleus: 0.625 / 0.375
    # top_p below the first token's probability keeps that token alone
    assert sample(logits[:10], Sampling(1.0, 0.1), None).tolist() == [0] * 10


def test_sampling_is_reproducible_by_seed(model):
    prompts = [[1, 2, 3], [7]]
    runs = [generate(model, prompts, 8, sampling=Sampling(temperature=1.5, top_p=0.95, seed=s)) for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_rows_of_different_lengths_generate_as_alone(model):
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5]]
    batched = generate(model, prompts, 6)
    alone = [generate(model, [p], 6).tokens[0] for p in prompts]
    assert batched.tokens == alone and batched.stop == ["max_new_tokens"] * 3 and batched.steps == 5


def test_a_row_stops_at_eos_and_the_others_continue(model):
    free = generate(model, [[1, 2], [9, 9, 9]], 8)
    eos = free.tokens[0][2]  # a token row 0 generates
    out = generate(model, [[1, 2], [9, 9, 9]], 8, eos_id=eos)
    for row, tokens in enumerate(free.tokens):
        cut = tokens.index(eos) + 1 if eos in tokens else 8
        assert out.tokens[row] == tokens[:cut]
        assert out.stop[row] == ("eos" if eos in tokens else "max_new_tokens")


def test_generation_stops_at_max_seq_len(model):
    prompt = list(range(TINY.max_seq_len - 3))
    out = generate(model, [prompt], 10)
    assert len(out.tokens[0]) == 3 and out.stop == ["max_seq_len"]
    assert generate(model, [prompt], 10, use_cache=False).tokens == out.tokens


def test_cached_paged_and_fp8_caches_generate_like_recomputation(model):
    prompts = [[1, 2, 3, 4], [5, 6]]
    reference = generate(model, prompts, 5, use_cache=False)
    assert generate(model, prompts, 5).tokens == reference.tokens
    assert generate(model, prompts, 5, paged=True).tokens == reference.tokens
    assert len(generate(model, prompts, 5, fp8_cache=True).tokens[0]) == 5  # lossy cache: only that it runs


@pytest.mark.parametrize("prompts, message", [
    ([], r"^prompts: expected a non-empty sequence"),
    ([[1], []], r"^prompts\[1\]: expected at least one token"),
    ([[1, 256]], r"^prompts\[0\]: expected token ids in \[0, 256\), got 256"),
    ([[-1]], r"^prompts\[0\]: expected token ids"),
    ([[0] * 256], r"^prompts\[0\]: expected at most 255 tokens"),
    ("hello", r"^prompts: expected a non-empty sequence"),
    (torch.zeros(1, 3), r"^prompts: expected an integer tensor"),
])
def test_bad_prompts(model, prompts, message):
    with pytest.raises(GenerateError, match=message):
        generate(model, prompts, 4)


def test_bad_arguments(model):
    with pytest.raises(GenerateError, match="^max_new_tokens: expected a positive integer"):
        generate(model, [[1]], 0)
    with pytest.raises(GenerateError, match=r"^eos_id: expected None or a token id in \[0, 256\)"):
        generate(model, [[1]], 2, eos_id=300)
    with pytest.raises(GenerateError, match="^temperature"):
        Sampling(temperature=-1.0)
    with pytest.raises(GenerateError, match="^top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(GenerateError, match="^logits"):
        sample(torch.zeros(3), Sampling())
    with pytest.raises(ValueError, match="paged/fp8"):
        generate(Transformer(TINY, attn_mode="naive"), [[1]], 2, paged=True)
