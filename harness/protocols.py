"""What an implementation under test provides, one typed Protocol per component (the single place; the docs'
protocol table and `check_protocol` read these).

An implementation is built by a zero-argument factory (`--dsv3-impl module:factory`) returning an object with a
`component` attribute naming the component, the methods (or attributes) of its protocol, and optionally
`not_applicable`: the component's property names it legitimately lacks, as a dict name -> reason (or a plain set),
each test of such a property being reported "not applicable" with the reason. Members needed only for one
property (`Component.property_members`, e.g. MLA's `paged_pool` for `paged_cache`) may be left out when that
property is declared not applicable. The factory is called and the object checked once, when `--dsv3-impl` is
resolved. State dicts use the official DeepSeek-V3 checkpoint names; shapes are written [B, S, D] = batch,
sequence, hidden; N = tokens, k = experts per token, E = routed experts, I = moe_intermediate_size.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from dsv3ref.config import ModelConfig

State = dict[str, torch.Tensor]


@runtime_checkable
class CostModelImpl(Protocol):
    """Component `costmodel`: analytic sizes of a model config (integers or floats; no tensors)."""

    component: str

    def kv_cache_bytes_per_token(self, cfg: ModelConfig, dtype: str = "bf16") -> int:
        """Cache bytes one token leaves in every layer, for cache element type `dtype` (fp32, bf16, fp16, fp8)."""

    def params_total(self, cfg: ModelConfig) -> int:
        """Every parameter of the model, MTP modules excluded."""

    def params_activated(self, cfg: ModelConfig) -> int:
        """Parameters one token touches (embedding and head in full, routed experts: only the top-k)."""

    def train_flops_per_token(self, cfg: ModelConfig, seq_len: int = 4096) -> float:
        """Forward + backward FLOPs per token at sequence length `seq_len` (causal attention)."""

    def ep_tpot_s(self, cfg: ModelConfig, bandwidth_GBps: float, hidden_rounding: bool = True) -> float:
        """The paper's EP-communication bound on time per output token, seconds; hidden rounded to thousands
        when `hidden_rounding` (the paper's "7K")."""


@runtime_checkable
class MLAImpl(Protocol):
    """Component `mla`: one Multi-head Latent Attention layer.

    `state` holds wq (or wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo (`.weight`, [out, in]) in `dtype`.
    The layer is called under torch.no_grad() as `layer(x [B, S, D], start_pos=0, cache=None, seqlens=None)
    -> [B, S, D]` in `dtype`: cache=None is one causal pass over positions start_pos..; with a cache, the chunk
    is appended and attends to everything cached before it in its row. `start_pos` is an int or a [B] int64
    tensor (per-row positions, e.g. `cache.lengths`); `seqlens` [B] counts each row's valid tokens (right
    padding: not cached, output rows exactly zero). The cache exposes `lengths` ([B] int64, tokens held per row).

    Dtypes: the tests comparing with the float64 ground truth, and the float64 variants of the cache tests, run
    in float64 unless `fp64_exact` is declared not applicable; every cache test also runs in the working dtype
    (optional attribute `working_dtype`, default torch.bfloat16) against the ground truth by the flash-attention
    rule, and the working-dtype tests run float32 and bfloat16 (one of them at V3's head widths).
    """

    component: str
    cache_mode: str  # "absorbed" (the cache holds kv_norm(c) and the roped k_pe) or "naive" (per-head K and V)

    def build(self, cfg: ModelConfig, state_dict: State, dtype: torch.dtype, device: str) -> Any:
        """The layer holding `state_dict`, computing in `dtype` on `device`."""

    def new_cache(self, layer: Any, batch: int, max_len: int, **options: Any) -> Any:
        """An empty cache of `batch` rows x `max_len` tokens in the layer's dtype. Options (each only if
        supported): paged=True with block_size (tokens per block), num_blocks (pool size) and block_table
        ([B, ceil(max_len / block_size)] int32 physical block ids: row b's token p lives in block
        block_table[b, p // block_size] at slot p % block_size); fp8=True (an e4m3 latent with one fp32 scale
        per token)."""

    def cache_bytes_per_token(self, cache: Any) -> float:
        """The cache's payload bytes (data and scales) per token slot."""

    def paged_pool(self, cache: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The storage of a paged cache, not a copy: one tensor (or a tuple) [num_blocks, block_size, ...] per
        cached quantity. The suite fills it with NaN and then checks where tokens were written. Needed only for
        the `paged_cache` property."""


@runtime_checkable
class MoEImpl(Protocol):
    """Component `moe`: the DeepSeekMoE router and layer, stateless (weights passed per call).

    `state` holds gate.weight [E, D], gate.bias [E] (fp32-representable values; present when cfg.moe.bias),
    experts.{i}.w1/w3.weight [I, D] and .w2.weight [D, I], and, when n_shared_experts > 0,
    shared_experts.w1/w3.weight [n_shared x I, D] and .w2.weight [D, n_shared x I] (one MLP of width
    n_shared x I). Tensors arrive in the dtype of `x`: float64 in every property but the working-dtype one
    (bfloat16, with the bias in fp32). Every flag of cfg.moe (score_func, norm_topk_prob, bias, groups,
    route_scale, shared experts) is drawn independently.
    """

    component: str

    def route(self, cfg: ModelConfig, state: State, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] (2-D) -> (weights [N, k] in x's dtype, indices [N, k] int64); the order of a token's k slots
        is free. Selection: top-k of the biased scores within the top topk_group groups (group score: the sum of
        the top-2 biased scores with a bias, the max without). Weights: the unbiased scores (sigmoid, or softmax
        over all experts) of the selected experts, divided by their plain sum (no epsilon) when
        cfg.moe.norm_topk_prob, whatever the score function, then times route_scale."""

    def forward(self, cfg: ModelConfig, state: State, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> y [..., D] = shared(x) + sum_k w_k expert_{i_k}(x), in x's dtype."""


@runtime_checkable
class FP8Impl(Protocol):
    """Component `fp8`: fine-grained FP8 quantizers and the block-scaled GEMM (signatures of `dsv3ref.fp8`).

    Inputs are fp32/bf16/fp16; data is float8_e4m3fn, scales fp32; a 1x128 tile covers 128 consecutive elements
    of the last dim, a 128x128 block a block of a 2-D weight; shapes need not be multiples of 128 (the scale is
    computed over the zero-padded tile). Bad input raises a ValueError subclass naming the argument.
    """

    component: str

    def quant_1x128(self, x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., K] -> (q [..., K] e4m3, s [..., ceil(K/128)] fp32), s = max(amax, 1e-4) / 448 per tile
        (rounded up to a power of two with ue8m0)."""

    def quant_128x128(self, w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """w [M, N] -> (q [M, N] e4m3, s [ceil(M/128), ceil(N/128)] fp32)."""

    def dequant_1x128(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """q * s per tile, the product in fp32, then `dtype`."""

    def dequant_128x128(self, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """q * s per block, the product in fp32, then `dtype`."""

    def fp8_gemm(self, a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """C [M, N] = A B^T: a [M, K] with a_s [M, ceil(K/128)]; b [N, K] with b_s [ceil(N/128), ceil(K/128)]
        (128x128 blocks) or [N, ceil(K/128)] (1x128 tiles, the weight-gradient GEMM); partial sums in fp32,
        scales applied per 128-wide K block."""


@runtime_checkable
class EPImpl(Protocol):
    """Component `ep`: expert-parallel dispatch and combine over torch.distributed, called on every rank of a world
    the suites start (gloo on CPU, NCCL on CUDA), with the signatures of `dsv3ref.comms.ep.AllToAll`.

    `ep` is a `dsv3ref.comms.ep.EPGroup`: rank, world_size, gpus_per_node, device, and the process groups of the
    world (`world`, None = the default group), of this rank's node and of its plane. Experts are placed
    contiguously, E / R per rank. Formats: dispatch "native" (x's dtype), "bf16" or "fp8" (e4m3 data with fp32
    1x128 scales, `dsv3ref.fp8.quant.quant_1x128`); combine "native" or "bf16". Optional properties (declare the
    ones an implementation lacks in `not_applicable`): `link_bytes` (adds to `counter`, a
    `dsv3ref.comms.ep.LinkBytes`, the payload bytes each call sends per scale-out plane and over scale-up, as
    `LinkBytes` documents), `node_dedup` (a token crosses scale-out once per destination node, not per rank),
    `input_checks` (bad input or ranks that disagree raise a ValueError on every rank), `fp8_dispatch`, `fp64`
    (float64 activations travel exactly).
    """

    component: str

    def dispatch(self, ep: Any, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 n_experts: int, fmt: str = "native", counter: Any = None) -> Any:
        """x [N, D], topk_idx [N, k] int64 (-1: no expert), topk_weights [N, k] -> a
        `dsv3ref.comms.ep.Dispatched`: the tokens this rank holds experts of, once each, ordered by source rank
        then token index; x in the wire dtype (scales [T, ceil(D/128)] fp32 for fp8), topk_idx this rank's local
        expert ids or -1, topk_weights as sent, src_rank / src_token [T], and a handle for combine."""

    def combine(self, ep: Any, y: torch.Tensor, handle: Any, fmt: str = "native", counter: Any = None) -> torch.Tensor:
        """y [T, D] (one row per received token, in dispatch order) -> [N, D] in y's dtype: each source token's
        rows from all its destination ranks, summed."""


@runtime_checkable
class ModelImpl(Protocol):
    """Component `model`: an assembled DeepSeek-V3 model with cached decoding.

    `state` holds every tensor by the official checkpoint names (embed.weight; layers.{i}.attn_norm, .attn.*
    (MLAImpl's names), .ffn_norm, .ffn.* (dense w1/w2/w3, or MoEImpl's gate/experts/shared_experts); norm.weight;
    head.weight) in `dtype` (gate.bias fp32 values). tokens are int64 [B, S] with ids in [0, vocab).
    """

    component: str

    def build(self, cfg: ModelConfig, state_dict: State, dtype: torch.dtype, device: str) -> Any:
        """The model holding `state_dict`, computing in `dtype` on `device`."""

    def new_cache(self, model: Any, batch: int, max_len: int, **options: Any) -> Any:
        """Empty caches of every layer for `batch` rows x `max_len` tokens; options as MLAImpl.new_cache
        (paged=True with block_size; fp8=True)."""

    def forward(self, model: Any, tokens: torch.Tensor, cache: Any = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, vocab] of every position of tokens [B, S]. cache=None: one causal pass from position 0;
        with a cache: the tokens are appended after each row's cached tokens and attend to them. seqlens [B]
        (with a cache only): real tokens per row, the rest right padding, not cached (their logits are free)."""


def members(protocol: type) -> tuple[str, ...]:
    """The attributes and methods a protocol requires, in declaration order."""
    names = list(getattr(protocol, "__annotations__", {}))
    names += [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return tuple(dict.fromkeys(names))
