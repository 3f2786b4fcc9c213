"""Training with the MTP loss: both parts learn, checkpoints load as a model with its MTP layer, a resumed run
equals the uninterrupted one bit for bit, and bad settings are refused."""

from __future__ import annotations

import pytest
import torch

from dsv3ref.checkpoint import load_checkpoint
from dsv3ref.config import ModelConfig
from dsv3ref.corpus import stdlib_corpus
from dsv3ref.mtp import MTP, MTPError
from dsv3ref.mtp_train import checkpoints, train_mtp
from dsv3ref.train import TrainConfig, TrainError

TINY = ModelConfig.preset("dsv3-tiny")
TCFG = TrainConfig(steps=4, batch_size=2, seq_len=16, warmup_steps=1, precision="fp32", eval_every=2)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus()


def test_resumed_run_equals_uninterrupted(tmp_path, corpus):
    whole = train_mtp(TINY, corpus, TCFG, tmp_path / "a", checkpoint_every=2)

    def stop_at_2(step, history):
        if step == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train_mtp(TINY, corpus, TCFG, tmp_path / "b", checkpoint_every=2, progress=stop_at_2)
    assert sorted(checkpoints(tmp_path / "b")) == [2]
    resumed = train_mtp(TINY, corpus, TCFG, tmp_path / "b", checkpoint_every=2, resume=True)
    assert resumed.history.total == whole.history.total
    assert resumed.history.depths == whole.history.depths
    assert resumed.history.val == whole.history.val
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(whole.mtp.state_dict().values(), resumed.mtp.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(whole.history.depths[0]) == TINY.mtp_depth


def test_checkpoint_loads_with_its_mtp_layer(tmp_path, corpus):
    run = train_mtp(TINY, corpus, TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, precision="fp32"),
                    tmp_path / "r")
    ck = load_checkpoint(run.checkpoints[2] / "model", mtp=True)
    mtp = MTP.from_state_dict(ck.model, ck.mtp)
    for a, b in zip(mtp.state_dict().values(), run.mtp.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_bad_settings(tmp_path, corpus):
    small = TrainConfig(steps=1, batch_size=1, seq_len=8, warmup_steps=0, precision="fp32")
    train_mtp(TINY, corpus, small, tmp_path / "r")
    with pytest.raises(TrainError, match="holds checkpoints of a run"):
        train_mtp(TINY, corpus, small, tmp_path / "r")
    with pytest.raises(TrainError, match="other settings"):
        train_mtp(TINY, corpus, TrainConfig(steps=2, batch_size=1, seq_len=8, warmup_steps=0, precision="fp32",
                                            lr=1e-3), tmp_path / "r", resume=True)
    with pytest.raises(MTPError, match="mtp_depth: expected < the sequence length 1"):
        train_mtp(TINY, corpus, TrainConfig(steps=1, batch_size=1, seq_len=1, warmup_steps=0, precision="fp32"))
    with pytest.raises(MTPError, match="mtp_depth: expected >= 1"):
        train_mtp(TINY.replace(mtp_depth=0), corpus, small)
