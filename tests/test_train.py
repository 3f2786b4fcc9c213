"""The shared training loop: schedule, determinism, precisions, custom losses, validation of settings."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv3ref.config import ModelConfig
from dsv3ref.corpus import stdlib_corpus
from dsv3ref.fp8.linear import LowPrecisionLinear
from dsv3ref.model import Transformer
from dsv3ref.train import TrainConfig, TrainError, learning_rate, next_token_loss, train

TINY = ModelConfig.preset("dsv3-tiny")


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TINY, attn_mode="naive", moe_backend="loop")


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=101, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4, rel=1e-12)
    assert learning_rate(cfg, 9) == pytest.approx(1e-3, rel=1e-12)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3, rel=1e-12)
    assert learning_rate(cfg, 55) == pytest.approx(0.55e-3, rel=1e-12)  # halfway: (0.1 + 0.9 * 0.5) lr
    assert learning_rate(cfg, 100) == pytest.approx(1e-4, rel=1e-12)


def test_deterministic_and_learning(corpus):
    cfg = TrainConfig(steps=15, batch_size=4, seq_len=32, warmup_steps=2, precision="fp32", eval_every=15)
    model = _model()
    first = train(copy.deepcopy(model), corpus, cfg)
    second = train(copy.deepcopy(model), corpus, cfg)
    assert first.losses == second.losses and first.val_losses == second.val_losses
    assert first.final_val_loss < first.losses[0] - 0.5  # a byte model well below the ~ln 256 = 5.5 start
    other_order = train(copy.deepcopy(model), corpus, TrainConfig(**{**cfg.__dict__, "data_seed": 1}))
    assert other_order.losses != first.losses


@pytest.mark.parametrize("precision,recipe", [("fp8", "fp8"), ("bf16-linear", "bf16"), ("bf16", None)])
def test_precisions(corpus, precision, recipe):
    model = _model()
    result = train(model, corpus, TrainConfig(steps=2, batch_size=2, seq_len=32, precision=precision))
    converted = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    assert all(m.recipe == recipe for m in converted) and bool(converted) == (recipe is not None)
    assert isinstance(model.head, torch.nn.Linear) and not isinstance(model.head, LowPrecisionLinear)
    assert len(result.losses) == 2 and result.val_losses[-1][0] == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_routing_bias_update(corpus):
    # The aux-loss-free update moves each bias by gamma sign(mean - load) minus the mean of that (so at most
    # 2 gamma per step) and keeps the biases summing to 0.
    model = _model()
    train(model, corpus, TrainConfig(steps=3, batch_size=2, seq_len=32, precision="fp32", eval_batches=1))
    bias = model.moe_layers()[0].gate.bias.detach()
    assert bias.abs().max() > 0 and bias.abs().max() <= 3 * 2 * 0.001 * (1 + 1e-6)
    assert abs(bias.sum().item()) < 1e-6
    fixed = _model()
    train(fixed, corpus, TrainConfig(steps=2, batch_size=2, seq_len=32, precision="fp32", eval_batches=1,
                                     bias_update_speed=0.0))
    assert (fixed.moe_layers()[0].gate.bias == 0).all()


def test_custom_loss_function(corpus):
    calls = []

    def loss_fn(model, x, y):
        calls.append(x.shape)
        return next_token_loss(model, x, y) * 2

    train(_model(), corpus, TrainConfig(steps=2, batch_size=2, seq_len=16, eval_batches=1, precision="fp32"),
          loss_fn)
    assert calls == [(2, 16)] * 3  # two steps, one validation batch


@pytest.mark.parametrize("field,value", [("steps", 0), ("precision", "fp4"), ("lr", 0.0), ("warmup_steps", -1),
                                         ("min_lr_ratio", 2.0), ("bias_update_speed", -1.0)])
def test_bad_settings(field, value):
    with pytest.raises(TrainError, match=f"^{field}"):
        TrainConfig(**{field: value})
