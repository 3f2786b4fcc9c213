"""Model configuration: one frozen, validated description of every architecture the paper compares.

A `ModelConfig` holds an attention section (MHA, GQA, MQA or MLA), an optional DeepSeekMoE section, RoPE/YaRN
parameters and the MTP depth. Presets are TOML data files in `dsv3ref/presets/`; user configs load from our own
JSON/TOML schema or from a Hugging Face `config.json` (DeepSeek-V3/V2, Qwen2, Llama). Every invalid field raises
`ConfigError` with a one-line message naming the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

ATTENTION_KINDS = ("mha", "gqa", "mqa", "mla")
SCORE_FUNCS = ("sigmoid", "softmax")
ROPE_KINDS = ("default", "yarn", "llama3")
# MLA's two executions of the same weights (the official attn_impl): per-head K/V, or attention over the latent
# with W_UK folded into the query and W_UV applied after it
MLA_MODES = ("naive", "absorbed")


class ConfigError(ValueError):
    """An invalid model config; the message names the field and what was expected."""


def _check_types(obj: Any, prefix: str) -> None:
    """Check each dataclass field against its annotation (int, float, bool, str); ints are accepted as floats."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        where = f"{prefix}{f.name}"
        if hint is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            object.__setattr__(obj, f.name, float(value))
        if hint is str and not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")


def _positive(where: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}: expected a positive value, got {value!r}")


def _non_negative(where: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{where}: expected a value >= 0, got {value!r}")


def _one_of(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """Attention block: MHA/GQA/MQA use `num_kv_heads` x `head_dim`; MLA uses the low-rank and head-dim fields."""

    kind: str
    num_heads: int
    num_kv_heads: int = 0  # mha: = num_heads, mqa: 1, gqa: required; unused by mla
    head_dim: int = 0  # mha/gqa/mqa; 0 = hidden_size / num_heads (filled in by ModelConfig)
    qkv_bias: bool = False
    q_lora_rank: int = 0  # mla: 0 = a single full-rank wq (DeepSeek-V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        p = "attention."
        _check_types(self, p)
        _one_of(p + "kind", self.kind, ATTENTION_KINDS)
        _positive(p + "num_heads", self.num_heads)
        for name in ("num_kv_heads", "head_dim", "q_lora_rank"):
            _non_negative(p + name, getattr(self, name))
        if self.kind == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive(p + name, getattr(self, name))
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"{p}qk_rope_head_dim: expected an even number (RoPE rotates pairs), "
                                  f"got {self.qk_rope_head_dim}")
            return
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name):
                raise ConfigError(f"{p}{name}: only used by kind 'mla', expected 0 for kind {self.kind!r}")
        implied = {"mha": self.num_heads, "mqa": 1}.get(self.kind)
        if implied is not None and self.num_kv_heads not in (0, implied):
            raise ConfigError(f"{p}num_kv_heads: kind {self.kind!r} implies {implied}, got {self.num_kv_heads}")
        if self.num_kv_heads == 0:
            if implied is None:
                raise ConfigError(f"{p}num_kv_heads: required for kind 'gqa' (a positive divisor of num_heads)")
            object.__setattr__(self, "num_kv_heads", implied)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{p}num_kv_heads: expected a divisor of num_heads {self.num_heads}, "
                              f"got {self.num_kv_heads}")

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width: nope + rope for MLA, head_dim otherwise."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.kind == "mla" else self.head_dim

    @property
    def v_dim(self) -> int:
        """Per-head value width."""
        return self.v_head_dim if self.kind == "mla" else self.head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + routed SwiGLU experts, group-limited top-k routing, first k layers dense."""

    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    norm_topk_prob: bool = True
    bias: bool = False  # aux-loss-free per-expert selection bias ("noaux_tc")

    def __post_init__(self) -> None:
        p = "moe."
        _check_types(self, p)
        for name in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group",
                     "route_scale"):
            _positive(p + name, getattr(self, name))
        _non_negative(p + "n_shared_experts", self.n_shared_experts)
        _non_negative(p + "first_k_dense_replace", self.first_k_dense_replace)
        _one_of(p + "score_func", self.score_func, SCORE_FUNCS)
        if self.n_routed_experts % self.n_group:
            raise ConfigError(f"{p}n_group: expected a divisor of n_routed_experts {self.n_routed_experts}, "
                              f"got {self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"{p}topk_group: expected <= n_group {self.n_group}, got {self.topk_group}")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > reachable:
            raise ConfigError(f"{p}num_experts_per_tok: expected <= {reachable} (experts in the topk_group "
                              f"selected groups), got {self.num_experts_per_tok}")
        if self.bias and self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ConfigError(f"{p}n_group: with a selection bias the group score is a top-2 sum, so each group "
                              f"needs >= 2 experts; got {self.n_routed_experts // self.n_group}")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base theta plus YaRN (DeepSeek) or Llama-3 frequency scaling."""

    kind: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float = 1.0  # yarn
    mscale_all_dim: float = 1.0  # yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self) -> None:
        p = "rope."
        _check_types(self, p)
        _one_of(p + "kind", self.kind, ROPE_KINDS)
        for name in ("theta", "factor", "original_max_position_embeddings"):
            _positive(p + name, getattr(self, name))
        if self.kind == "yarn" and self.beta_fast <= self.beta_slow:
            raise ConfigError(f"{p}beta_fast: expected > beta_slow {self.beta_slow}, got {self.beta_fast}")


@dataclass(frozen=True)
class ModelConfig:
    """A whole model. Layers `< moe.first_k_dense_replace` (all layers without `moe`) use a dense SwiGLU FFN."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention: AttentionConfig
    intermediate_size: int = 0  # dense FFN width
    moe: MoEConfig | None = None
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_seq_len: int = 4096
    mtp_depth: int = 0
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    source: str = ""

    def __post_init__(self) -> None:
        for name, kind in (("attention", AttentionConfig), ("rope", RopeConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name}: expected a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ConfigError(f"moe: expected a MoEConfig or None, got {type(self.moe).__name__}")
        _check_types(self, "")
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len", "rms_norm_eps"):
            _positive(name, getattr(self, name))
        _non_negative("mtp_depth", self.mtp_depth)
        _non_negative("intermediate_size", self.intermediate_size)
        if self.num_dense_layers and self.intermediate_size == 0:
            raise ConfigError(f"intermediate_size: expected a positive value ({self.num_dense_layers} dense FFN "
                              "layers need it), got 0")
        if self.moe is not None and self.moe.first_k_dense_replace > self.num_layers:
            raise ConfigError(f"moe.first_k_dense_replace: expected <= num_layers {self.num_layers}, "
                              f"got {self.moe.first_k_dense_replace}")
        att = self.attention
        if att.kind != "mla" and att.head_dim == 0:
            if self.hidden_size % att.num_heads:
                raise ConfigError(f"attention.num_heads: expected a divisor of hidden_size {self.hidden_size} "
                                  f"(or give attention.head_dim), got {att.num_heads}")
            object.__setattr__(self, "attention",
                               dataclasses.replace(att, head_dim=self.hidden_size // att.num_heads))

    # --- derived layout -------------------------------------------------------------------------------------
    @property
    def num_dense_layers(self) -> int:
        """Layers with a dense FFN."""
        return self.num_layers if self.moe is None else self.moe.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        """Layers with a DeepSeekMoE FFN."""
        return self.num_layers - self.num_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer `layer_id` (0-based) uses the MoE FFN."""
        if not 0 <= layer_id < self.num_layers:
            raise ConfigError(f"layer_id: expected 0 <= layer_id < {self.num_layers}, got {layer_id}")
        return layer_id >= self.num_dense_layers

    @property
    def yarn_active(self) -> bool:
        """YaRN applies only when the context exceeds the original length (the official code's gate)."""
        return self.rope.kind == "yarn" and self.max_seq_len > self.rope.original_max_position_embeddings

    # --- construction ---------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some top-level fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Our nested schema (what `from_dict` reads)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from our nested schema; unknown keys are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a table/object, got {type(data).__name__}")
        data = dict(data)
        sections = {"attention": AttentionConfig, "moe": MoEConfig, "rope": RopeConfig}
        for key, kind in sections.items():
            if key in data and data[key] is not None:
                data[key] = _build(kind, data[key], key + ".")
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Load a JSON or TOML file: our schema, a Hugging Face config.json (recognised by `model_type`) or the official
        inference code's ModelArgs JSON (recognised by `dim` and `n_layers`)."""
        from dsv3ref.hf_config import is_official_args, model_config_from_official

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")  # JSON and TOML are UTF-8 by specification
        except OSError as e:
            raise ConfigError(f"{path}: cannot read model config ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: cannot read model config (not UTF-8 text: byte {e.start})") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: malformed {path.suffix.lstrip('.') or 'json'} ({e})") from None
        try:
            if isinstance(data, dict) and "model_type" in data:
                data.setdefault("_name_or_path", path.stem)
                return cls.from_hf(data)
            if isinstance(data, dict) and is_official_args(data):
                return model_config_from_official(data, path.stem)
            if isinstance(data, dict):
                data.setdefault("name", path.stem)
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Map a Hugging Face config.json (deepseek_v3, deepseek_v2, qwen2, llama) onto ModelConfig."""
        from dsv3ref.hf_config import model_config_from_hf

        return model_config_from_hf(hf)

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named preset from `dsv3ref/presets/` (see `preset_names()`)."""
        names = preset_names()
        if name not in names:
            raise ConfigError(f"preset: unknown model {name!r}; known: {', '.join(names)}")
        text = resources.files("dsv3ref.presets").joinpath(f"{name}.toml").read_text()
        return cls.from_dict(tomllib.loads(text))


def preset_names() -> list[str]:
    """Names of the shipped model presets."""
    files = resources.files("dsv3ref.presets").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


def _build(kind: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `kind` from a dict, naming unknown and missing keys with their full path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table/object, got {data!r}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; expected one of {', '.join(sorted(names))}")
    required = [f.name for f in dataclasses.fields(kind)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: missing required key")
    return kind(**data)
