"""The MTP modules: labels and masking, the loss against a position-by-position computation, the input order of
eh_proj, checkpoints with MTP weights, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3ref.checkpoint import load_checkpoint, save_checkpoint
from dsv3ref.config import ModelConfig
from dsv3ref.model import Transformer
from dsv3ref.mtp import MTP, MTPError, MTPModel, check_depth, mtp_labels, mtp_loss_fn, mtp_losses
from dsv3ref.speculative import speculative_generate

TINY = ModelConfig.preset("dsv3-tiny")


def _pair(depth: int = 2, seed: int = 0) -> tuple[Transformer, MTP]:
    cfg = TINY.replace(mtp_depth=depth)
    torch.manual_seed(seed)
    model = Transformer(cfg, attn_mode="naive", moe_backend="loop").double().eval()
    mtp = MTP(cfg, attn_mode="naive", moe_backend="loop").double().eval()
    return model, mtp


def test_labels_shift_by_depth():
    targets = torch.arange(1, 6)[None]  # t_1..t_5 for inputs t_0..t_4
    assert mtp_labels(targets, 1).tolist() == [[2, 3, 4, 5]]  # depth 1 at position i predicts t_{i+2}
    assert mtp_labels(targets, 2).tolist() == [[3, 4, 5]]


def test_loss_equals_position_by_position_computation():
    """Hand-sized: T = 5, D = 2, batch 2. Each term recomputed alone: module k at position i from the prefix
    0..i only (h^0 from the main model's prefix pass, token t_{i+k}), -log P at t_{i+k+1}, summed / T."""
    model, mtp = _pair()
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(0, TINY.vocab_size, (2, 6), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    lam, t = 0.3, 5
    with torch.no_grad():
        got = mtp_losses(model, mtp, x, y, lam)
        want_depths = []
        for k in (1, 2):
            total = torch.zeros((), dtype=torch.float64)
            for b in range(2):
                for i in range(t - k):
                    h = model.hidden(x[b: b + 1, : i + 1])
                    for j in range(1, k + 1):  # depth j over positions 0..i, fed t_{p+j}
                        h = mtp.layers[j - 1](h, model.embed(seq[b: b + 1, j: i + 1 + j]))
                    logp = mtp.logits(model, k - 1, h[0, -1]).log_softmax(-1)
                    total -= logp[seq[b, i + k + 1]]
            want_depths.append(total / (2 * t))
        main = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    for g_k, w_k in zip(got.depths, want_depths, strict=True):
        assert float(g_k) == pytest.approx(float(w_k), rel=1e-10)
    assert float(got.main) == pytest.approx(float(main), rel=1e-10)
    assert float(got.total) == pytest.approx(float(main + lam / 2 * sum(want_depths)), rel=1e-10)


def test_last_positions_are_masked():
    """Depth k reads no token beyond the window: changing the last target changes only the terms that predict
    it (main at T-1, depth k at T-k-1), and depth k's hidden states have T - k positions."""
    model, mtp = _pair()
    x = torch.randint(0, TINY.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = mtp.hidden_states(model, model.hidden(x), x)
    assert [h.shape[1] for h in hs] == [5, 4]


def test_eh_proj_reads_embedding_first():
    """[enorm(emb); hnorm(h)]: with eh_proj's first D columns zeroed, the module ignores the token."""
    model, mtp = _pair(depth=1)
    d = TINY.hidden_size
    with torch.no_grad():
        mtp.layers[0].eh_proj.weight[:, :d] = 0
        h = torch.randn(1, 3, d, dtype=torch.float64)
        a = mtp.layers[0](h, model.embed(torch.tensor([[1, 2, 3]])))
        b = mtp.layers[0](h, model.embed(torch.tensor([[9, 8, 7]])))
    assert torch.equal(a, b)


def test_depth_must_be_below_sequence_length():
    model, mtp = _pair(depth=2)
    x = torch.randint(0, TINY.vocab_size, (1, 2))
    with pytest.raises(MTPError, match="mtp_depth: expected < the sequence length 2"):
        mtp_losses(model, mtp, x, x, 0.3)
    with pytest.raises(MTPError, match="mtp_depth"):
        check_depth(3, 3)


def test_loss_fn_trains_both_parts():
    model, mtp = _pair(depth=1)
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    loss = mtp_loss_fn(0.3)(MTPModel(model, mtp), x, x)
    loss.backward()
    assert mtp.layers[0].eh_proj.weight.grad is not None and model.embed.weight.grad is not None
    with pytest.raises(MTPError, match="mtp_lambda"):
        mtp_loss_fn(-1.0)
    with pytest.raises(MTPError, match="expected an MTPModel"):
        mtp_loss_fn(0.3)(model, x, x)


@pytest.mark.parametrize("layout", ["official", "hf"])
def test_checkpoint_round_trip_with_mtp(tmp_path, layout):
    model, mtp = _pair(depth=1)
    save_checkpoint(model, tmp_path / "ck", layout, mtp=mtp.checkpoint_state(model))
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.mtp and all(n.startswith("mtp.0.") for n in ck.mtp)
    loaded = MTP.from_state_dict(ck.model, ck.mtp, attn_mode="naive", moe_backend="loop")
    x = torch.randint(0, TINY.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(mtp_losses(ck.model, loaded, x, x, 0.3).total, mtp_losses(model, mtp, x, x, 0.3).total)


def test_hf_names_of_the_mtp_layer(tmp_path):
    """The official layer num_layers + k with enorm, hnorm, eh_proj and shared_head.{norm, head}."""
    from safetensors import safe_open

    model, mtp = _pair(depth=1)
    save_checkpoint(model, tmp_path / "ck", "hf", mtp=mtp.checkpoint_state(model))
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layer = f"model.layers.{TINY.num_layers}."
    for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.weight"):
        assert layer + n in names


def test_no_mtp_weights_and_mismatched_shared_tensors(tmp_path):
    model, mtp = _pair(depth=1)
    save_checkpoint(model, tmp_path / "plain")
    ck = load_checkpoint(tmp_path / "plain")
    with pytest.raises(MTPError, match="holds no MTP weights"):
        MTP.from_state_dict(ck.model, ck.mtp)
    state = mtp.checkpoint_state(model)
    state["mtp.0.head.weight"] = state["mtp.0.head.weight"] + 1
    with pytest.raises(MTPError, match="mtp.0.head.weight: expected the main model's shared head.weight"):
        MTP.from_state_dict(model, state)


def test_speculation_errors():
    model, mtp = _pair(depth=1)
    with pytest.raises(MTPError, match="speculative decoding needs MTP modules"):
        speculative_generate(model, None, [[1, 2]], 4)
    with pytest.raises(MTPError, match=r"draft_len: expected an integer in \[1, 1\]"):
        speculative_generate(model, mtp, [[1, 2]], 4, draft_len=0)
    with pytest.raises(MTPError, match="mtp_depth: expected >= 1"):
        MTP(TINY.replace(mtp_depth=0))
