"""Roofline prediction of one decode step (time per output token), operator by operator, from a hardware profile.

A decode step runs one new token per sequence through the whole model. Each operator reads its weights once per
step (whatever the batch), reads the KV cache rows of every sequence, and runs matmuls. Its time is the larger of
memory time (bytes / memory bandwidth) and compute time (FLOPs / dense matmul throughput in the operator's
dtype); the step is the sum over operators. Operators (one row per kind, repeated over the layers it occurs in):

  embed       the batch's embedding rows (no FLOPs)
  attention   attn_norm + the MLA projections (absorption included): attention_params, projection FLOPs
  attn.cache  the cached rows each sequence attends (context + 1 tokens) and the score / weighted-sum FLOPs
  ffn.dense   ffn_norm + the dense SwiGLU MLP of the first layers
  moe.router  ffn_norm + the gate (weight and selection bias)
  moe.shared  the shared experts
  moe.routed  the routed experts the batch touches: k per token, distinct experts counted once
  head        the final norm + the output head

Formulas come from `harness.analytic.{params,flops,kv_cache}`; this module only adds them up per operator. Left
out by design (the docs say so): kernel launch and framework dispatch per operator, activation traffic, overlap of
operators with each other, routing imbalance beyond the expected distinct experts, and any cache reuse of weights
across steps. `deployment_step` predicts DeepSeek-V3 on a multi-GPU decode unit (expert parallelism, data-parallel
attention, the EP all-to-all of `harness.analytic.tpot`, overlapped with compute as the paper's dual micro-batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dsv3ref.config import MLA_MODES, ConfigError, ModelConfig
from dsv3ref.fp8.quant import BLOCK
from hardware.profile import Profile
from hardware.roofline import Roofline, roofline
from harness.analytic.flops import (
    attention_cache_read_bytes,
    attention_projection_flops,
    attention_score_flops,
    tiled_format_bits,
)
from harness.analytic.kv_cache import DTYPE_BYTES, dtype_bytes
from harness.analytic.params import attention_params, router_params, swiglu_params
from harness.analytic.tpot import EPCommBound, ep_comm_bound, ep_link

COMPUTE_DTYPES = ("fp32", "bf16", "fp8")  # matmul throughput fields of a profile


def weight_width(dtype: str) -> float:
    """Bytes per weight element: fp32/bf16/fp16 as is; fp8 = 1 B plus one fp32 scale per 128x128 block."""
    if dtype == "fp8":
        return tiled_format_bits(8, 32, BLOCK * BLOCK) / 8
    return dtype_bytes(dtype, "weight dtype")


def expected_distinct_experts(cfg: ModelConfig, tokens: int) -> float:
    """Routed experts `tokens` tokens touch in one MoE layer, in expectation under uniform routing:
    E (1 - (1 - k/E)^tokens)."""
    moe = cfg.moe
    if moe is None:
        return 0.0
    return moe.n_routed_experts * (1 - (1 - moe.num_experts_per_tok / moe.n_routed_experts) ** tokens)


@dataclass(frozen=True)
class Op:
    """One operator kind of the step: its totals over the `layers` it repeats in (bytes and FLOPs per step)."""

    name: str
    layers: int
    weight_bytes: float
    cache_bytes: float
    flops: float
    dtype: str  # the matmul dtype its compute term uses

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.cache_bytes

    def roofline(self, profile: Profile) -> Roofline:
        """Memory and compute time of this operator on `profile`."""
        return roofline(profile, self.flops, self.bytes, self.dtype)


@dataclass(frozen=True)
class DecodeStep:
    """One decode step: `batch` sequences, each with `context` tokens cached before the new one.

    weights: dtype of the projection / expert / dense-FFN weights (fp8: e4m3 with 128x128 block scales);
    dense: dtype of the activations, embedding, head, router and norms (and the compute dtype of matmuls whose
    weights are not FP8); kv: the cache dtype; fp8_compute: FP8 weights multiply at the FP8 matmul rate
    (DeepGEMM) instead of being dequantized to `dense`; mla_mode: absorbed (latent cache) or naive (per-head
    K/V); routed_experts: distinct routed experts touched per MoE layer (default: `expected_distinct_experts`).
    """

    cfg: ModelConfig
    batch: int
    context: int
    weights: str = "bf16"
    dense: str = "bf16"
    kv: str = "bf16"
    fp8_compute: bool = True
    mla_mode: str = "absorbed"
    routed_experts: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch", "context"):
            value, low = getattr(self, name), 1 if name == "batch" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")
        if self.cfg.attention.kind != "mla":
            raise ConfigError(f"{self.cfg.name}: attention.kind: the decode predictor models MLA, got "
                              f"{self.cfg.attention.kind!r}")
        for name in ("weights", "dense", "kv"):
            dtype_bytes(getattr(self, name), name)
        if self.dense not in COMPUTE_DTYPES[:2]:
            raise ConfigError(f"dense: expected fp32 or bf16, got {self.dense!r}")
        if self.mla_mode not in MLA_MODES:
            raise ConfigError(f"mla_mode: expected one of {', '.join(MLA_MODES)}, got {self.mla_mode!r}")

    @property
    def matmul_dtype(self) -> str:
        """The compute dtype of matmuls with `weights`-dtype weights."""
        return "fp8" if self.weights == "fp8" and self.fp8_compute else self.dense

    def touched_experts(self) -> float:
        return expected_distinct_experts(self.cfg, self.batch) if self.routed_experts is None else self.routed_experts

    def ops(self) -> list[Op]:
        """The step's operators (see the module docstring)."""
        cfg, b = self.cfg, self.batch
        d, w, dense = cfg.hidden_size, weight_width(self.weights), DTYPE_BYTES[self.dense]
        layers = cfg.num_layers
        ops = [
            Op("embed", 1, b * d * dense, 0.0, 0.0, self.dense),
            Op("attention", layers, layers * (attention_params(cfg) * w + d * dense), 0.0,
               layers * attention_projection_flops(cfg, b), self.matmul_dtype),
            Op("attn.cache", layers, 0.0,
               layers * attention_cache_read_bytes(cfg, self.context, b, self.mla_mode, self.kv),
               layers * attention_score_flops(cfg, 1, self.context, b, self.mla_mode), self.dense),
        ]
        if cfg.num_dense_layers:
            mlp = swiglu_params(cfg, cfg.intermediate_size)
            n = cfg.num_dense_layers
            ops.append(Op("ffn.dense", n, n * (mlp * w + d * dense), 0.0, n * 2.0 * b * mlp, self.matmul_dtype))
        if cfg.num_moe_layers:
            ops += self._moe_ops(cfg.num_moe_layers, w, dense)
        ops.append(Op("head", 1, (d + cfg.vocab_size * d) * dense, 0.0, 2.0 * b * cfg.vocab_size * d, self.dense))
        return ops

    def _moe_ops(self, n: int, w: float, dense: int) -> list[Op]:
        cfg, b, moe = self.cfg, self.batch, self.cfg.moe
        d, expert = cfg.hidden_size, swiglu_params(cfg, moe.moe_intermediate_size)
        gate = moe.n_routed_experts * d
        ops = [Op("moe.router", n, n * (router_params(cfg) * dense + d * dense), 0.0, n * 2.0 * b * gate,
                  self.dense)]
        if moe.n_shared_experts:
            shared = moe.n_shared_experts * expert
            ops.append(Op("moe.shared", n, n * shared * w, 0.0, n * 2.0 * b * shared, self.matmul_dtype))
        ops.append(Op("moe.routed", n, n * self.touched_experts() * expert * w, 0.0,
                      n * 2.0 * b * moe.num_experts_per_tok * expert, self.matmul_dtype))
        return ops


@dataclass(frozen=True)
class Prediction:
    """A step's operators with their rooflines on one profile, and the step's time (the sum of the larger terms)."""

    ops: tuple[Op, ...]
    rooflines: tuple[Roofline, ...]

    @property
    def time_s(self) -> float:
        return sum(r.time_s for r in self.rooflines)

    @property
    def memory_s(self) -> float:
        """Time of the operators whose memory term is the larger."""
        return sum(r.time_s for r in self.rooflines if r.bound == "memory")

    @property
    def compute_s(self) -> float:
        """Time of the operators whose compute term is the larger."""
        return sum(r.time_s for r in self.rooflines if r.bound == "compute")

    @property
    def bound(self) -> str:
        """The term that takes most of the step: memory or compute."""
        return "memory" if self.memory_s >= self.compute_s else "compute"

    @property
    def bytes(self) -> float:
        return sum(op.bytes for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)

    def dominant_op(self) -> str:
        """The operator with the largest time."""
        return max(zip(self.ops, self.rooflines, strict=True), key=lambda p: p[1].time_s)[0].name


def predict(step: DecodeStep, profile: Profile) -> Prediction:
    """The roofline of every operator of `step` on `profile`."""
    ops = tuple(step.ops())
    return Prediction(ops, tuple(op.roofline(profile) for op in ops))


# --- a DeepSeek-V3 decode unit: expert parallelism over many GPUs ---------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """How a decode unit serves the model (defaults: DeepSeek-V3's 320-GPU decode unit, T1 §3.4).

    ep: GPUs of the unit; every MoE layer's experts are spread over them, the shared expert counted as one more
      always-selected expert (k + 1 = 9 per token), extra GPUs holding redundant copies; a GPU holds
      ceil((routed + shared) / ep) experts. Attention, the dense layers, router, embedding and head are data
      parallel (replicated; each GPU runs its own sequences).
    batch_per_gpu: sequences per GPU per micro-batch; micro_batches: 2 = dual micro-batch overlap (one
      micro-batch computes while the other's dispatch/combine is on the network).
    context: cached tokens per sequence; weights / kv: FP8 weights (e4m3, 128x128 scales; embedding, head,
      router and norms BF16) and a BF16 latent cache.
    """

    ep: int = 320
    batch_per_gpu: int = 32
    micro_batches: int = 2
    context: int = 4096
    weights: str = "fp8"
    kv: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("ep", "batch_per_gpu", "micro_batches", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "context" else 1):
                raise ConfigError(f"{name}: expected a positive integer, got {value!r}")

    def for_profile(self, profile: Profile) -> Deployment:
        """The unit on `profile`: EP stays inside a rack-scale NVLink domain when the profile has one (GB200 NVL72:
        EP72), and is a single GPU when the profile declares no link between GPUs."""
        link = ep_link(profile)
        if link is None:
            return replace(self, ep=1)
        return replace(self, ep=min(self.ep, profile.scaleup_domain_gpus)) if link[0] == "scale-up" else self


@dataclass(frozen=True)
class UnitPrediction:
    """A decode unit's per-GPU step: compute of one micro-batch (per operator), the EP all-to-all of one
    micro-batch per MoE layer, and the resulting TPOT with compute and communication overlapped per layer."""

    cfg: ModelConfig
    deployment: Deployment
    profile: Profile
    compute: Prediction  # one micro-batch, every layer
    comm: EPCommBound | None  # None without a network (one GPU)
    link: str
    memory_bytes: float

    @property
    def experts_per_gpu(self) -> int:
        moe = self.cfg.moe
        return math.ceil((moe.n_routed_experts + moe.n_shared_experts) / self.deployment.ep)

    @property
    def comm_s(self) -> float:
        """All-to-all time of one micro-batch in one MoE layer (dispatch + combine)."""
        return 0.0 if self.comm is None else self.comm.comm_time_s

    def _moe_layer_compute_s(self) -> float:
        """Compute of one micro-batch in one MoE layer: its attention share plus its MoE operators."""
        total = 0.0
        for op, r in zip(self.compute.ops, self.compute.rooflines, strict=True):
            if op.name.startswith("moe.") or op.name in ("attention", "attn.cache"):
                total += r.time_s / op.layers
        return total

    @property
    def tpot_s(self) -> float:
        """micro_batches x (every layer's compute, each MoE layer taking max(compute, all-to-all))."""
        d, n_moe = self.deployment, self.cfg.num_moe_layers
        per_moe_layer = self._moe_layer_compute_s()
        hidden = n_moe * (max(per_moe_layer, self.comm_s) - per_moe_layer)
        return d.micro_batches * (self.compute.time_s + hidden)

    @property
    def tpot_serial_s(self) -> float:
        """Without overlap: micro_batches x (compute + every MoE layer's all-to-all)."""
        return self.deployment.micro_batches * (self.compute.time_s + self.cfg.num_moe_layers * self.comm_s)

    @property
    def comm_only_s(self) -> float:
        """The all-to-all alone: micro_batches x MoE layers x comm (the paper's bound counts all 61 layers)."""
        return self.deployment.micro_batches * self.cfg.num_moe_layers * self.comm_s

    @property
    def tokens_per_s(self) -> float:
        """Per sequence: 1 / TPOT."""
        return 1.0 / self.tpot_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.deployment.micro_batches * self.deployment.batch_per_gpu / self.tpot_s

    @property
    def bound(self) -> str:
        """communication when the all-to-all exceeds a MoE layer's compute, else the compute step's bound."""
        return "communication" if self.comm_s > self._moe_layer_compute_s() else self.compute.bound

    @property
    def fits(self) -> bool:
        return self.memory_bytes <= self.profile.hbm_capacity_GB * 1e9


def deployment_step(cfg: ModelConfig, deployment: Deployment, profile: Profile) -> UnitPrediction:
    """Predict one GPU of `deployment` (adapted to `profile`, see Deployment.for_profile) serving `cfg`."""
    if cfg.moe is None:
        raise ConfigError(f"{cfg.name}: moe: the decode-unit prediction needs a MoE model")
    d = deployment.for_profile(profile)
    moe = cfg.moe
    per_gpu = math.ceil((moe.n_routed_experts + moe.n_shared_experts) / d.ep)
    # The shared expert is one more routed expert every token selects (k + 1 per token): in a balanced unit each
    # GPU's experts run B x (k + shared) token-expert pairs and all of its experts are hit.
    unit = replace(cfg, moe=replace(moe, num_experts_per_tok=moe.num_experts_per_tok + moe.n_shared_experts,
                                    n_shared_experts=0))
    step = DecodeStep(unit, d.batch_per_gpu, d.context, weights=d.weights, dense="bf16", kv=d.kv,
                      routed_experts=float(per_gpu))
    compute = predict(step, profile)
    link = ep_link(profile)
    comm = None if link is None or d.ep == 1 else ep_comm_bound(cfg, link[1], "config-exact", d.batch_per_gpu,
                                                                micro_batches=d.micro_batches)
    return UnitPrediction(cfg, d, profile, compute, comm, "none" if comm is None else link[0],
                          _memory_per_gpu(step, d))


def _memory_per_gpu(step: DecodeStep, d: Deployment) -> float:
    """Weights held (the replicated parts, this GPU's experts, the whole embedding table) plus every micro-batch's
    cache at `context` tokens."""
    ops = step.ops()
    held = sum(op.weight_bytes for op in ops if op.name != "embed")
    embed = step.cfg.vocab_size * step.cfg.hidden_size * DTYPE_BYTES[step.dense]
    return held + embed + d.micro_batches * sum(op.cache_bytes for op in ops)
