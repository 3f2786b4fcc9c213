"""The shared training loop: schedule, determinism, precisions, custom losses, validation of settings."""

from __future__ import annotations

import copy

import pytest
import torch

from dsv3ref.config import ModelConfig
from dsv3ref.corpus import stdlib_corpus
from dsv3ref.fp8.linear import LowPrecisionLinear
from dsv3ref.model import Transformer
from dsv3ref.train import NonFiniteLoss, TrainConfig, Trainer, TrainError, learning_rate, next_token_loss, train

TINY = ModelConfig.preset("dsv3-tiny")
FP8_TINY = ModelConfig.preset("dsv3-tiny-fp8")  # every projection input a multiple of 128: the FP8 recipe tiles it


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def _model(seed: int = 0, cfg: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, attn_mode="naive", moe_backend="loop")


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


@pytest.mark.parametrize("precision,recipe,other_ops", [("fp8", "fp8", "bf16"), ("fp8", "fp8", "fp32"),
                                                         ("bf16-linear", "bf16", "fp32"), ("bf16", None, "bf16")])
def test_precisions(corpus, precision, recipe, other_ops):
    model = _model(cfg=FP8_TINY)
    outputs = []
    model.head.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    result = train(model, corpus, TrainConfig(steps=2, batch_size=2, seq_len=32, precision=precision,
                                              other_ops=other_ops))
    converted = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    assert all(m.recipe == recipe for m in converted) and bool(converted) == (recipe is not None)
    assert isinstance(model.head, torch.nn.Linear) and not isinstance(model.head, LowPrecisionLinear)
    assert len(result.losses) == 2 and result.val_losses[-1][0] == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert set(outputs) == {torch.bfloat16 if other_ops == "bf16" else torch.float32}  # the head runs in other_ops


def test_evaluation_schedule_and_batches(corpus):
    cfg = TrainConfig(steps=5, batch_size=2, seq_len=16, eval_batches=3, eval_at=(2, 4), precision="fp32")
    result = train(_model(), corpus, cfg)
    assert [s for s, _ in result.val_losses] == [2, 4, 5]
    assert len(result.val_batch_losses) == 3
    assert result.final_val_loss == pytest.approx(sum(result.val_batch_losses) / 3, rel=1e-12)


def test_trainer_steps_are_the_loop(corpus):
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, eval_batches=1, precision="fp32")
    trainer = Trainer(_model(), corpus, cfg)
    losses = [trainer.step() for _ in range(3)]
    assert losses == train(_model(), corpus, cfg).losses and trainer.evaluates_now()


def test_non_finite_loss_stops_the_run_and_keeps_the_history(corpus):
    calls = []

    def loss_fn(model, x, y):
        calls.append(1)
        loss = next_token_loss(model, x, y)
        return loss * float("nan") if len(calls) == 3 else loss

    cfg = TrainConfig(steps=5, batch_size=2, seq_len=16, eval_batches=1, precision="fp32", name="seed 4 fp8")
    with pytest.raises(NonFiniteLoss, match=r"^seed 4 fp8: training loss not finite at step 3 of 5 \(nan\)") as e:
        train(_model(), corpus, cfg, loss_fn)
    assert e.value.step == 3 and len(e.value.result.losses) == 2 and e.value.result.seconds > 0


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
                                         ("min_lr_ratio", 2.0), ("bias_update_speed", -1.0), ("other_ops", "fp16"),
                                         ("eval_at", (0,)), ("eval_at", (101,)), ("fp8_backend", "cuda")])
def test_bad_settings(field, value):
    with pytest.raises(TrainError, match=f"^{field}"):
        TrainConfig(**{field: value})
    with pytest.raises(TrainError, match="^other_ops: applies to the bf16-linear and fp8 precisions"):
        TrainConfig(precision="bf16", other_ops="fp32")
