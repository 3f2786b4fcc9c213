"""Model checkpoints: load and save a directory of safetensors files in the official or the Hugging Face layout.

Layouts:
- "official": the names of this model (`embed.weight`, `layers.{i}.attn.wq_a.weight`, ...; an FP8 weight's
  dequantization multiplier as `{module}.scale`), as the official convert.py writes them, in files
  `model{rank}-mp{n}.safetensors`. With n > 1 the official model-parallel split is undone: `embed`, `head`, `wq`,
  `wq_b`, `wkv_b`, `w1`, `w3` are concatenated along their rows, `wo` and `w2` along their columns (FP8 scales
  the same way), each routed expert lives whole in one rank, the rest is replicated. The config is a `config.json`
  beside the files (ours, the official ModelArgs JSON, or a Hugging Face one) or passed in.
- "hf": Hugging Face names (`model.layers.{i}.self_attn.q_a_proj.weight`, `mlp.experts.{j}.gate_proj`,
  `lm_head.weight`; an FP8 weight's multiplier as `weight_scale_inv`) in `model.safetensors` or shards listed by
  `model.safetensors.index.json`, with a Hugging Face `config.json`.

MTP modules: DeepSeek-V3's checkpoint stores its MTP module as layer `num_layers + k` (`enorm`, `hnorm`,
`eh_proj`, a decoder layer, `shared_head.norm`, `shared_head.head`, `embed_tokens`), which transformers' model
drops. They are kept here under our names `mtp.{k}.` (`enorm`, `hnorm`, `eh_proj`, the block's `attn_norm`,
`attn.*`, `ffn_norm`, `ffn.*`, then `norm`, `head`, `embed`) and returned beside the model; the MTP block's FFN
is that of the main model's last layer (DeepSeekMoE in V3).

Loading is strict and all-or-nothing: only safetensors files are read (pickle checkpoints never are); every
tensor's name, shape and dtype is checked against the model the config describes before any data is read, and
the missing, unexpected and mis-shaped tensors are listed in one `CheckpointError`; a model is returned only when
everything loaded. FP8 weights (float8_e4m3fn with 128x128 block scales) are dequantized into the model's dtype
(`fp8="dequantize"`, default) or kept as `dsv3ref.fp8.inference.FP8Linear` modules (`fp8="keep"`). Values are
not inspected (NaN weights load as they are).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.fp8.quant import BLOCK, FP8, dequant_128x128
from dsv3ref.hf_config import hf_config_dict
from dsv3ref.model import Block, Transformer

LAYOUTS = ("official", "hf")
FP8_MODES = ("dequantize", "keep")
# official model-parallel split (convert.py): module name -> the dim its tensors are split along
SHARD_DIMS = {"embed": 0, "head": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0}
_HF_MODULES = {"embed_tokens": "embed", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn": "attn", "mlp": "ffn", "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm",
               "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm",
               "kv_b_proj": "wkv_b", "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
               "e_score_correction_bias": "bias", "weight_scale_inv": "scale"}
_OUR_MODULES = {ours: hf for hf, ours in _HF_MODULES.items()}
_MP_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FP8_DTYPE = "F8_E4M3"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LISTED = 8  # names shown per category in an error


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or saved; the message lists every problem found."""


# --- names ---------------------------------------------------------------------------------------------------------


def hf_to_ours(name: str, num_layers: int) -> str | None:
    """Our name of a Hugging Face tensor name (layers >= num_layers are MTP modules); None for a foreign name."""
    parts = name.split(".")
    if parts[0] == "lm_head":
        return ".".join(["head"] + [_HF_MODULES.get(p, p) for p in parts[1:]])
    if parts[0] != "model" or len(parts) < 3:
        return None
    parts = parts[1:]
    if parts[0] != "layers":
        return ".".join(_HF_MODULES.get(p, p) for p in parts)
    if not parts[1].isdigit():
        return None
    layer, rest = int(parts[1]), parts[2:]
    prefix = ["layers", str(layer)]
    if layer >= num_layers:
        prefix = ["mtp", str(layer - num_layers)]
        rest = rest[1:] if rest[:1] == ["shared_head"] else rest
    return ".".join(prefix + [_HF_MODULES.get(p, p) for p in rest])


def ours_to_hf(name: str, num_layers: int) -> str:
    """The Hugging Face name of one of our tensor names (the inverse of `hf_to_ours`)."""
    parts = name.split(".")
    if parts[0] == "head":
        return ".".join(["lm_head"] + [_OUR_MODULES.get(p, p) for p in parts[1:]])
    if parts[0] == "mtp":
        rest = parts[2:]
        rest = ["shared_head", *rest] if rest[0] in ("norm", "head") else rest
        parts = ["layers", str(num_layers + int(parts[1])), *rest]
    return ".".join(["model"] + [_OUR_MODULES.get(p, p) for p in parts])


# --- what a config's model holds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """The tensors a config's model holds: shape by our name, and which of them may be stored in FP8 (linear
    weights other than the head; each then needs a `.scale` of its 128x128 blocks)."""

    shapes: dict[str, tuple[int, ...]]
    fp8_allowed: frozenset[str]
    mtp_names: frozenset[str]


def _linear_weights(module: nn.Module, prefix: str = "") -> set[str]:
    return {f"{prefix}{name}.weight" for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("head")}


def expected_tensors(cfg: ModelConfig, mtp_depth: int | None = None) -> Expected:
    """The tensors of `cfg`'s model plus `mtp_depth` MTP modules (default cfg.mtp_depth); built on the meta device."""
    depth = cfg.mtp_depth if mtp_depth is None else mtp_depth
    with torch.device("meta"):
        model = Transformer(cfg)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        fp8 = _linear_weights(model)
        if cfg.tie_word_embeddings:
            shapes.pop("head.weight")
        mtp: dict[str, tuple[int, ...]] = {}
        if depth:
            block = Block(cfg.num_layers - 1, cfg)  # the MTP block's FFN: that of the last layer
            d, vocab = cfg.hidden_size, cfg.vocab_size
            for k in range(depth):
                p = f"mtp.{k}."
                mtp.update({p + n: tuple(v.shape) for n, v in block.state_dict().items()})
                mtp.update({p + "enorm.weight": (d,), p + "hnorm.weight": (d,), p + "eh_proj.weight": (d, 2 * d),
                            p + "norm.weight": (d,), p + "head.weight": (vocab, d), p + "embed.weight": (vocab, d)})
                fp8 |= _linear_weights(block, p) | {p + "eh_proj.weight"}
    return Expected({**shapes, **mtp}, frozenset(fp8), frozenset(mtp))


def scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 128x128-block scale shape of a weight [out, in]."""
    return math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)


# --- reading headers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One tensor as stored: file, name in the file, shape, safetensors dtype string, model-parallel rank."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str
    rank: int = 0


@dataclass
class Scan:
    """What a checkpoint directory holds, by our names (several entries: official model-parallel shards)."""

    layout: str
    ranks: int
    tensors: dict[str, list[Stored]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)  # names that map to nothing of ours


def _headers(file: Path) -> Iterator[tuple[str, tuple[int, ...], str]]:
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                sl = f.get_slice(key)
                yield key, tuple(sl.get_shape()), sl.get_dtype()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _safetensors_files(path: Path) -> list[Path]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" ({', '.join(pickles[:3])} are pickle files, which are never loaded)" if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    return files


def _hf_files(path: Path, files: list[Path]) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return files
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        listed = sorted({path / f for f in weight_map.values()})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e!r})") from None
    absent = [f.name for f in listed if not f.exists()]
    if absent:
        raise CheckpointError(f"{index}: lists shards that are not there: {', '.join(absent[:_LISTED])}")
    return listed


def scan(path: Path, num_layers: int) -> Scan:
    """Read every file's header (names, shapes, dtypes; no data) and map the names to ours."""
    files = _safetensors_files(path)
    headers = {f: list(_headers(f)) for f in files}
    names = [k for entries in headers.values() for k, _, _ in entries]
    hf = any(n.startswith(("model.", "lm_head.")) for n in names)
    ranks = {f: _MP_FILE.fullmatch(f.name) for f in files}
    if hf:
        out = Scan("hf", 1)
        files = _hf_files(path, files)
    elif all(ranks.values()):
        counts = {int(m.group(2)) for m in ranks.values()}
        have = sorted(int(m.group(1)) for m in ranks.values())
        if len(counts) != 1 or have != list(range(counts.pop())):
            raise CheckpointError(f"{path}: official shards must be model0-mpN ... model(N-1)-mpN.safetensors for "
                                  f"one N, got {', '.join(f.name for f in files)}")
        out = Scan("official", len(have))
    else:
        out = Scan("official", 1)
    for file in files:
        rank = int(ranks[file].group(1)) if out.ranks > 1 else 0
        for key, shape, dtype in headers[file]:
            ours = hf_to_ours(key, num_layers) if hf else key
            if ours is None:
                out.foreign.append(f"{key} ({file.name})")
                continue
            out.tensors.setdefault(ours, []).append(Stored(file, key, shape, dtype, rank))
    return out


# --- checking --------------------------------------------------------------------------------------------------


def _is_routed_expert(name: str) -> bool:
    return ".experts." in name


def _merged_shape(name: str, stored: list[Stored], ranks: int, problems: list[str]) -> tuple[int, ...] | None:
    """The shape of `name` once the official model-parallel shards are merged; None (a problem noted) when the
    shards are inconsistent."""
    where = ", ".join(s.file.name for s in stored)
    if ranks == 1 or _is_routed_expert(name):
        if len(stored) > 1:
            problems.append(f"{name}: stored more than once ({where})")
            return None
        return stored[0].shape
    if len(stored) != ranks or len({s.rank for s in stored}) != ranks:
        problems.append(f"{name}: expected in all {ranks} model-parallel shards, found in {where}")
        return None
    dim = SHARD_DIMS.get(name.split(".")[-2])
    shapes = [s.shape for s in sorted(stored, key=lambda s: s.rank)]
    if dim is None or len(shapes[0]) <= dim:
        if len(set(shapes)) != 1:
            problems.append(f"{name}: replicated tensor with different shapes across shards ({shapes})")
            return None
        return shapes[0]
    rest = {s[:dim] + s[dim + 1:] for s in shapes}
    if len(rest) != 1:
        problems.append(f"{name}: shards differ outside the split dim {dim} ({shapes})")
        return None
    first = shapes[0]
    return first[:dim] + (sum(s[dim] for s in shapes),) + first[dim + 1:]


@dataclass
class Plan:
    """What will be loaded: each of our names with its stored entries, which weights are FP8, the layout."""

    tensors: dict[str, list[Stored]]
    fp8: set[str]
    layout: str


def check(found: Scan, cfg: ModelConfig, mtp: bool | None, where: str) -> Plan:
    """Compare a scanned checkpoint with `cfg`'s model; raise one CheckpointError listing every problem."""
    stored_mtp = {n for n in found.tensors if n.startswith("mtp.")}
    load_mtp = bool(stored_mtp) if mtp is None else mtp
    expected = expected_tensors(cfg, cfg.mtp_depth if load_mtp else 0)
    problems: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name, stored in found.tensors.items():
        if name in stored_mtp and not load_mtp:
            continue
        shape = _merged_shape(name, stored, found.ranks, problems)
        if shape is not None:
            shapes[name] = shape
    if cfg.tie_word_embeddings and "head.weight" in shapes:
        problems.append("head.weight: the config ties the head to the embedding; expected no separate head")
    fp8 = {n for n in shapes if found.tensors[n][0].dtype == _FP8_DTYPE}
    missing = sorted(set(expected.shapes) - set(shapes))
    scales = {n.removesuffix(".weight") + ".scale": n for n in fp8}
    unexpected = sorted(n for n in shapes if n not in expected.shapes and n not in scales)
    unexpected += found.foreign
    misshaped = [f"{n} (expected {expected.shapes[n]}, got {shapes[n]})" for n in sorted(shapes)
                 if n in expected.shapes and shapes[n] != expected.shapes[n]]
    for name in sorted(set(shapes) & set(expected.shapes)):
        dtype = found.tensors[name][0].dtype
        if name in fp8 and name not in expected.fp8_allowed:
            problems.append(f"{name}: stored in FP8, expected a float dtype (only linear weights may be FP8)")
        elif name not in fp8 and dtype not in _FLOAT_DTYPES:
            problems.append(f"{name}: expected a float dtype ({', '.join(_FLOAT_DTYPES)}), got {dtype}")
    for scale, weight in sorted(scales.items()):
        if scale not in shapes:
            missing.append(f"{scale} (the block scales of FP8 {weight})")
        elif weight in expected.shapes and shapes[scale] != scale_shape(expected.shapes[weight]):
            misshaped.append(f"{scale} (expected {scale_shape(expected.shapes[weight])}, got {shapes[scale]})")
        elif found.tensors[scale][0].dtype != "F32":
            problems.append(f"{scale}: expected F32 block scales, got {found.tensors[scale][0].dtype}")
    if missing or unexpected or misshaped or problems:
        raise CheckpointError(_report(where, cfg, missing, unexpected, misshaped, problems))
    return Plan({n: found.tensors[n] for n in shapes}, fp8, found.layout)


def _listing(label: str, names: list[str]) -> str:
    more = f", and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return f"{len(names)} {label}: {', '.join(names[:_LISTED])}{more}"


def _report(where: str, cfg: ModelConfig, missing: list[str], unexpected: list[str], misshaped: list[str],
            problems: list[str]) -> str:
    parts = [_listing(label, names) for label, names in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped), ("other", problems))
             if names]
    return (f"{where}: checkpoint does not match the config {cfg.name!r} ({cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, vocab {cfg.vocab_size}, mtp_depth {cfg.mtp_depth}); nothing was loaded. "
            + "; ".join(parts))


# --- loading -------------------------------------------------------------------------------------------------------


class _Reader:
    """Reads stored tensors, each file opened once; official model-parallel shards concatenated along their split
    dim (a replicated tensor is taken from rank 0)."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack, self.handles = stack, {}

    def __call__(self, stored: list[Stored], name: str) -> torch.Tensor:
        parts = []
        for s in sorted(stored, key=lambda s: s.rank):
            if s.file not in self.handles:
                self.handles[s.file] = self.stack.enter_context(safe_open(str(s.file), framework="pt"))
            parts.append(self.handles[s.file].get_tensor(s.key))
        dim = SHARD_DIMS.get(name.split(".")[-2])
        return parts[0] if len(parts) == 1 or dim is None else torch.cat(parts, dim=dim)


def _tensor_state(plan: Plan, dtype: torch.dtype, fp8: str) -> dict[str, torch.Tensor]:
    """Read every planned tensor; FP8 weights dequantized into `dtype` or kept with their scales; the routing
    bias stays at least fp32."""
    state: dict[str, torch.Tensor] = {}
    scales = {n.removesuffix(".weight") + ".scale" for n in plan.fp8}
    with contextlib.ExitStack() as stack:
        read = _Reader(stack)
        for name, stored in plan.tensors.items():
            if name not in scales:
                _put(state, name, read(stored, name), plan, read, dtype, fp8)
    return state


def _put(state: dict[str, torch.Tensor], name: str, t: torch.Tensor, plan: Plan, read: _Reader,
         dtype: torch.dtype, fp8: str) -> None:
    if name in plan.fp8:
        scale = name.removesuffix(".weight") + ".scale"
        s = read(plan.tensors[scale], scale)
        if fp8 == "keep":
            state[name], state[scale] = t, s
            return
        t = dequant_128x128(t, s, dtype)
    keep32 = name.endswith("gate.bias")
    state[name] = t.to(torch.promote_types(dtype, torch.float32) if keep32 else dtype)


def _checkpoint_dtype(plan: Plan) -> torch.dtype:
    """The dtype the checkpoint stores its non-FP8 tensors in (that of the embedding)."""
    return _FLOAT_DTYPES.get(plan.tensors["embed.weight"][0].dtype, torch.float32)


def _config(path: Path, config: ModelConfig | str | Path | None) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    file = Path(config) if config is not None else path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json; pass the model config (a ModelConfig or a config file)")
    cfg = ModelConfig.load(file)
    if config is None and cfg.name == file.stem:  # a config.json names no model: call it after its directory
        cfg = cfg.replace(name=path.resolve().name)
    quant = json.loads(file.read_text()).get("quantization_config") if file.suffix == ".json" else None
    if isinstance(quant, dict) and list(quant.get("weight_block_size", [BLOCK, BLOCK])) != [BLOCK, BLOCK]:
        raise CheckpointError(f"{file}: quantization_config.weight_block_size: expected [{BLOCK}, {BLOCK}], got "
                              f"{quant['weight_block_size']}")
    return cfg


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode), its config, the layout read, and the MTP modules' tensors by our
    names (`mtp.{k}.…`; empty when none were loaded)."""

    model: Transformer
    config: ModelConfig
    layout: str
    mtp: dict[str, torch.Tensor]


def load_checkpoint(path: str | Path, config: ModelConfig | str | Path | None = None, *,
                    dtype: torch.dtype | None = None, device: torch.device | str = "cpu", fp8: str = "dequantize",
                    fp8_gemm: str = "dequant", mtp: bool | None = None, attn_mode: str = "absorbed",
                    moe_backend: str = "auto") -> Checkpoint:
    """Load a checkpoint directory (layout detected from its names) into a Transformer.

    config: a ModelConfig, a config file, or None for the directory's config.json. dtype: the model's dtype
    (default: the checkpoint's). fp8: "dequantize" or "keep" (FP8Linear running `fp8_gemm`: "dequant" or "fp8").
    mtp: load the MTP modules (True: required; False: ignored, as transformers does; None: when stored).
    """
    path = Path(path)
    if fp8 not in FP8_MODES:
        raise CheckpointError(f"fp8: expected one of {', '.join(FP8_MODES)}, got {fp8!r}")
    try:
        cfg = _config(path, config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: config: {e}") from None
    plan = check(scan(path, cfg.num_layers), cfg, mtp, str(path))
    dtype = dtype or _checkpoint_dtype(plan)
    state = _tensor_state(plan, dtype, fp8)
    mtp_state = {n: state.pop(n).to(device) for n in [n for n in state if n.startswith("mtp.")]}
    model = Transformer.from_state_dict(cfg, state, attn_mode=attn_mode, moe_backend=moe_backend,
                                        fp8_gemm=fp8_gemm, device=device)
    return Checkpoint(model, cfg, plan.layout, mtp_state)


# --- saving --------------------------------------------------------------------------------------------------------


def _state_to_save(model: Transformer, mtp: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("head.weight")
    state.update({k: v.detach() for k, v in (mtp or {}).items()})
    depth = model.cfg.mtp_depth if mtp else 0
    expected = expected_tensors(model.cfg, depth)
    unexpected = sorted(n for n in state if n not in expected.shapes and not n.endswith(".scale"))
    missing = sorted(n for n in expected.shapes if n not in state)
    misshaped = [f"{n} (expected {expected.shapes[n]}, got {tuple(state[n].shape)})" for n in sorted(state)
                 if n in expected.shapes and tuple(state[n].shape) != expected.shapes[n]]
    if missing or unexpected or misshaped:
        raise CheckpointError(_report("save_checkpoint", model.cfg, missing, unexpected, misshaped, []))
    return state


def _split_official(state: dict[str, torch.Tensor], cfg: ModelConfig, mp: int) -> list[dict[str, torch.Tensor]]:
    """The official model-parallel split of a state dict into `mp` ranks (convert.py's rules)."""
    n_routed = cfg.moe.n_routed_experts if cfg.moe else 0
    if mp > 1 and n_routed % mp:
        raise CheckpointError(f"mp: expected a divisor of n_routed_experts {n_routed}, got {mp}")
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for name, t in state.items():
        dim = SHARD_DIMS.get(name.split(".")[-2])
        for r in range(mp):
            if _is_routed_expert(name):
                if int(name.split(".")[-3]) // (n_routed // mp) == r:
                    ranks[r][name] = t
            elif dim is not None and mp > 1 and t.dim() > dim:
                if t.shape[dim] % mp:
                    raise CheckpointError(f"{name}: dim {dim} of size {t.shape[dim]} does not split into mp {mp}")
                ranks[r][name] = t.chunk(mp, dim=dim)[r]
            else:
                ranks[r][name] = t
    return ranks


def _hf_shards(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    return shards


def _write(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def save_checkpoint(model: Transformer, path: str | Path, layout: str = "official", *,
                    mtp: dict[str, torch.Tensor] | None = None, mp: int = 1,
                    max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write `model` (and MTP tensors by our names) as a checkpoint directory in `layout`; returns the directory.

    The directory is written whole or not at all (built beside `path`, then renamed; `path` must not exist or be
    empty). official: `model{r}-mp{mp}.safetensors` and our config.json; hf: shards of at most max_shard_bytes
    (with model.safetensors.index.json when there are several) and a Hugging Face config.json.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(mp, bool) or not isinstance(mp, int) or mp < 1 or (layout == "hf" and mp != 1):
        raise CheckpointError(f"mp: expected a positive integer (1 for the hf layout), got {mp!r}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CheckpointError(f"{path}: exists and is not an empty directory; expected a new path")
    cfg, state = model.cfg, _state_to_save(model, mtp)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        if layout == "official":
            for r, tensors in enumerate(_split_official(state, cfg, mp)):
                _write(tensors, work / f"model{r}-mp{mp}.safetensors")
            (work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        else:
            _write_hf(state, cfg, work, max_shard_bytes)
        if path.exists():
            path.rmdir()
        os.replace(work, path)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return path


def _write_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, work: Path, max_shard_bytes: int) -> None:
    hf_state = {ours_to_hf(k, cfg.num_layers): v for k, v in state.items()}
    shards = _hf_shards(hf_state, max_shard_bytes)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write(tensors, work / name)
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        total = sum(t.nbytes for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config_dict(cfg)
    if any(t.dtype == FP8 for t in state.values()):
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [BLOCK, BLOCK]}
    (work / "config.json").write_text(json.dumps(config, indent=2))
