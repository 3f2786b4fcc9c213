"""dsv3ref.checkpoint: names in both layouts, strict all-or-nothing loading with one error listing every problem,
FP8 weights, official model-parallel shards, MTP tensors, and the configs a checkpoint directory carries."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dsv3ref.checkpoint import (
    CheckpointError,
    expected_tensors,
    hf_to_ours,
    load_checkpoint,
    ours_to_hf,
    save_checkpoint,
)
from dsv3ref.config import ModelConfig
from dsv3ref.fp8.inference import FP8Linear
from dsv3ref.fp8.quant import FP8, dequant_128x128, quant_128x128
from dsv3ref.hf_config import hf_config_dict
from dsv3ref.model import Transformer

TINY = ModelConfig.preset("dsv3-tiny")  # 2 layers (dense, MoE), mtp_depth 1


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def _mtp() -> dict[str, torch.Tensor]:
    return {n: torch.randn(s) for n, s in expected_tensors(TINY).shapes.items() if n.startswith("mtp.")}


def test_names_map_both_ways():
    names = expected_tensors(TINY).shapes
    assert all(hf_to_ours(ours_to_hf(n, 2), 2) == n for n in names)
    assert ours_to_hf("layers.1.ffn.experts.3.w1.weight", 2) == "model.layers.1.mlp.experts.3.gate_proj.weight"
    assert ours_to_hf("layers.0.attn.wkv_a.scale", 2) == "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    assert ours_to_hf("layers.1.ffn.gate.bias", 2) == "model.layers.1.mlp.gate.e_score_correction_bias"
    assert ours_to_hf("head.weight", 2) == "lm_head.weight" and ours_to_hf("embed.weight", 2) == \
        "model.embed_tokens.weight"
    # the MTP module is layer num_layers + k in the Hugging Face files
    assert ours_to_hf("mtp.0.head.weight", 2) == "model.layers.2.shared_head.head.weight"
    assert ours_to_hf("mtp.0.attn.wq_a.weight", 2) == "model.layers.2.self_attn.q_a_proj.weight"
    assert hf_to_ours("model.layers.2.embed_tokens.weight", 2) == "mtp.0.embed.weight"
    assert hf_to_ours("transformer.h.0.weight", 2) is None


@pytest.mark.parametrize("layout, mp", [("official", 1), ("official", 2), ("hf", 1)])
def test_round_trip_with_mtp(tmp_path, model, layout, mp):
    mtp = _mtp()
    path = save_checkpoint(model, tmp_path / "ckpt", layout, mtp=mtp, mp=mp, max_shard_bytes=50_000)
    if layout == "hf":
        assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
        assert (path / "model.safetensors.index.json").exists()
    loaded = load_checkpoint(path)
    assert loaded.layout == layout
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(loaded.mtp[k], v) for k, v in mtp.items()) and set(loaded.mtp) == set(mtp)
    assert load_checkpoint(path, mtp=False).mtp == {}


def test_official_shards_split_and_merge(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "ckpt", "official", mp=2)
    from safetensors import safe_open

    with safe_open(str(path / "model1-mp2.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("layers.0.attn.wo.weight").get_shape() == [64, 32]  # wo splits its 64 input columns
        assert f.get_slice("embed.weight").get_shape() == [128, 64]  # the vocabulary splits
    assert "layers.1.ffn.experts.7.w1.weight" in keys and "layers.1.ffn.experts.0.w1.weight" not in keys
    assert "layers.0.attn_norm.weight" in keys  # replicated
    (path / "model1-mp2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="official shards must be model0-mpN"):
        load_checkpoint(path)


def _corrupt(tmp_path, model, change) -> str:  # noqa: ANN001
    state = {k: v.clone() for k, v in model.state_dict().items()}
    change(state)
    state = {k: v.contiguous() for k, v in state.items()}
    path = tmp_path / "bad"
    path.mkdir()
    save_file(state, str(path / "model0-mp1.safetensors"))
    return str(path)


def test_one_error_lists_missing_unexpected_and_misshaped(tmp_path, model):
    def change(state: dict) -> None:
        del state["layers.0.attn.wq_a.weight"], state["norm.weight"]
        state["layers.0.attn.extra.weight"] = torch.zeros(2, 2)
        state["layers.1.ffn.experts.3.w2.weight"] = torch.zeros(64, 31)

    path = _corrupt(tmp_path, model, change)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, TINY)
    message = str(info.value)
    assert "nothing was loaded" in message
    assert "2 missing: layers.0.attn.wq_a.weight, norm.weight" in message
    assert "1 unexpected: layers.0.attn.extra.weight" in message
    assert "1 mis-shaped: layers.1.ffn.experts.3.w2.weight (expected (64, 32), got (64, 31))" in message


def test_a_config_that_does_not_match_the_weights(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "ckpt", "hf")
    with pytest.raises(CheckpointError, match=r"does not match the config .*hidden 128.*mis-shaped: embed\.weight"):
        load_checkpoint(path, TINY.replace(hidden_size=128))
    # one layer: the file's layer 1 reads as an MTP module (layer num_layers), which is a MoE layer here
    with pytest.raises(CheckpointError, match=r"\(1 layers.*unexpected: mtp\.0\.ffn\.experts\.0"):
        load_checkpoint(path, TINY.replace(num_layers=1, moe=None))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing: layers\.2\."):
        load_checkpoint(path)


def test_bad_directories_and_files(tmp_path, model):
    with pytest.raises(CheckpointError, match="expected a checkpoint directory"):
        load_checkpoint(tmp_path / "absent", TINY)
    (tmp_path / "pickled").mkdir()
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files \(pytorch_model\.bin are pickle files"):
        load_checkpoint(tmp_path / "pickled", TINY)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model0-mp1.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "broken", TINY)
    path = save_checkpoint(model, tmp_path / "hf", "hf", max_shard_bytes=50_000)
    (path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(CheckpointError, match="malformed index"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no config.json; pass the model config"):
        load_checkpoint(_corrupt(tmp_path, model, lambda state: None))


def test_saving_is_all_or_nothing(tmp_path, model):
    target = tmp_path / "full"
    target.mkdir()
    (target / "x").write_text("keep")
    with pytest.raises(CheckpointError, match="exists and is not an empty directory"):
        save_checkpoint(model, target)
    with pytest.raises(CheckpointError, match="mis-shaped: mtp.0.eh_proj.weight"):
        save_checkpoint(model, tmp_path / "new", mtp={**_mtp(), "mtp.0.eh_proj.weight": torch.zeros(3, 3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial directory left behind
    with pytest.raises(CheckpointError, match="mp: expected a divisor of n_routed_experts 8"):
        save_checkpoint(model, tmp_path / "mp3", mp=3)


def _fp8_state(model: Transformer) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    for name in [n for n in state if n.endswith(("wq_b.weight", "wkv_b.weight", "experts.2.w3.weight"))]:
        state[name], state[name.removesuffix(".weight") + ".scale"] = quant_128x128(state[name])
    return state


def test_fp8_weights_are_dequantized_or_kept(tmp_path, model):
    fp8_model = Transformer.from_state_dict(TINY, _fp8_state(model))
    assert isinstance(fp8_model.layers[0].attn.wkv_b, FP8Linear)
    path = save_checkpoint(fp8_model, tmp_path / "ckpt", "hf")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    kept = load_checkpoint(path, fp8="keep").model  # auto runs experts with an FP8Linear as modules (segments)
    dense = load_checkpoint(path, moe_backend="segments").model
    w = kept.layers[0].attn.wkv_b
    assert w.weight.dtype == FP8 and w.scale.shape == (1, 1)
    assert torch.equal(dense.layers[0].attn.wkv_b.weight, dequant_128x128(w.weight, w.scale))
    tokens = torch.randint(0, 256, (2, 7))
    with torch.no_grad():  # FP8Linear "dequant" multiplies the same dequantized weight: the same result
        assert torch.equal(kept(tokens), dense(tokens))
    assert isinstance(load_checkpoint(path, fp8="keep", fp8_gemm="fp8").model.layers[0].attn.wq_b, FP8Linear)
    with pytest.raises(CheckpointError, match="fp8: expected one of dequantize, keep"):
        load_checkpoint(path, fp8="cast")


def test_fp8_problems_are_listed(tmp_path, model):
    def change(state: dict) -> None:
        state["layers.0.attn.wq_b.weight"], _ = quant_128x128(state["layers.0.attn.wq_b.weight"])  # no scale
        state["norm.weight"] = state["norm.weight"].to(FP8)
        state["layers.0.attn.wo.scale"] = torch.ones(1, 1)  # a scale of a non-FP8 weight

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_corrupt(tmp_path, model, change), TINY)
    message = str(info.value)
    assert "layers.0.attn.wq_b.scale (the block scales of FP8 layers.0.attn.wq_b.weight)" in message
    assert "unexpected: layers.0.attn.wo.scale" in message
    assert "norm.weight: stored in FP8, expected a float dtype" in message


def test_tied_embeddings(tmp_path):
    cfg = TINY.replace(tie_word_embeddings=True)
    tied = Transformer(cfg)
    path = save_checkpoint(tied, tmp_path / "ckpt", "hf")
    loaded = load_checkpoint(path).model
    assert loaded.head.weight is loaded.embed.weight and torch.equal(loaded.embed.weight, tied.embed.weight)


def test_official_model_args_config(tmp_path, model):
    args = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
            "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
            "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
            "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}
    (tmp_path / "config_671B.json").write_text(json.dumps(args))
    cfg = ModelConfig.load(tmp_path / "config_671B.json")
    v3 = ModelConfig.preset("deepseek-v3-671b")
    # the official code runs at max_seq_len 16384 (its default), the preset at the HF config's 163840
    assert cfg.replace(name=v3.name, source=v3.source, max_seq_len=v3.max_seq_len, mtp_depth=1) == v3
    (tmp_path / "bad.json").write_text(json.dumps({**args, "n_experts": 3}))
    with pytest.raises(ValueError, match="official config: n_experts: unknown key"):
        ModelConfig.load(tmp_path / "bad.json")


def test_hf_config_dict_round_trips():
    for name in ("dsv3-tiny", "deepseek-v3-671b", "deepseek-v2-236b"):
        cfg = ModelConfig.preset(name)
        back = ModelConfig.from_hf({**hf_config_dict(cfg), "_name_or_path": name})
        assert back.replace(source=cfg.source) == cfg
    with pytest.raises(ValueError, match="needs MLA attention and a MoE section"):
        hf_config_dict(ModelConfig.preset("qwen2.5-72b"))
