"""Linear layers for low-precision training: all three GEMMs (fprop, dgrad, wgrad) with fp32 accumulation.

Recipe "fp8" (DeepSeek-V3):
  fprop  y  = x W^T      x in 1x128 tiles, W in 128x128 blocks
  dgrad  dx = dy W       dy in 1x128 tiles, W^T in 128x128 blocks (the forward's blocks, transposed)
  wgrad  dW = dy^T x     dy^T and x^T in 1x128 tiles along tokens
Recipe "bf16": the same three GEMMs with operands rounded to BF16 (what a BF16 tensor-core GEMM computes), so
that a BF16 baseline differs from the FP8 run only in the operand format.

Activation cache: the x that wgrad quantizes along tokens is, with `cache="fp8"` (DeepSeek-V3 caches a linear's
input in FP8 for the backward), the forward's 1x128-quantized x dequantized, so it is quantized twice; with
`cache="input"`, x itself (`convert_linears` gives the attention output projection `wo` this one: V3 stores that
input in E5M6, whose 6 mantissa bits are closer to the input's precision than to E4M3's 3).
The weight stays an fp32 master parameter (the optimizer updates it) and dW is fp32. Under autocast the output
has the autocast dtype (BF16 component I/O, as in the paper), otherwise the input's dtype; dx has x's dtype.
A module quantizes its weight once per weight version (an optimizer step bumps it) and reuses the operands until
the weight changes: once per training step, once for a whole evaluation.

Backends (`dsv3ref.backends` kind "fp8_linear": how FP8 operands are held and multiplied): "torch" (here: the
reference quantizers of `quant.py` and the block-scaled GEMM of `gemm.py`), "triton" (that GEMM as a Triton kernel)
and "fused" (`dsv3ref.fp8.fused`: CPU fast path). The BF16 recipe has one implementation.

`convert_linears` swaps the nn.Linear modules of a model, keeping chosen ones (embedding, head, router gate) in
high precision. Only modules whose forward runs are affected: code that reads `.weight` directly (MLA's absorbed
path reads wkv_b, the MoE grouped paths stack the experts' weights) keeps computing in its own precision. The FP8
recipe quantizes a module's input in 1x128 tiles along in_features, which must be a multiple of 128 (as V3's
activation quantizer requires); out_features may end in a partial block (V3's wkv_a has 576 = 4.5 x 128 rows).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from dsv3ref import backends
from dsv3ref.config import ConfigError
from dsv3ref.fp8 import gemm
from dsv3ref.fp8.quant import (
    BLOCK,
    FP8Error,
    dequant_1x128,
    quant_1x128,
    quant_1x128_of_transpose,
    quant_128x128,
    transpose_128x128,
)

RECIPES = ("fp8", "bf16")
CACHES = ("fp8", "input")
DEFAULT_KEEP = ("embed", "head", "gate")
DEFAULT_INPUT_CACHE = ("wo",)
Operand = tuple[torch.Tensor, ...]


class LinearOps(Protocol):
    """How a recipe holds GEMM operands (a tuple of tensors) and multiplies them; shapes in the comments."""

    def act(self, x: torch.Tensor) -> Operand:
        """x [T, K] in 1x128 tiles along K (fprop's and dgrad's left operand)."""

    def act_t(self, x: torch.Tensor) -> Operand:
        """x^T [K, T] in 1x128 tiles along T, from x [T, K] (wgrad's operands)."""

    def weight(self, w: torch.Tensor) -> Operand:
        """w [N, K] in 128x128 blocks."""

    def weight_t(self, w: Operand) -> Operand:
        """W^T [K, N] in 128x128 blocks, from W's operand (blocks are transpose-invariant)."""

    def cached(self, a: Operand) -> torch.Tensor:
        """x [T, K] as an FP8 activation cache holds it: the values of act(x), dequantized."""

    def gemm(self, a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
        """A [M, K] B [N, K]^T -> [M, N] in out_dtype, fp32 accumulation."""


@backends.register("fp8_linear", "torch")
class TorchFP8:
    """The reference: FP8 data with fp32 scales (quant.py) and the block-scaled GEMM (gemm.py)."""

    act = staticmethod(quant_1x128)
    act_t = staticmethod(quant_1x128_of_transpose)
    weight = staticmethod(quant_128x128)

    @staticmethod
    def weight_t(w: Operand) -> Operand:
        return transpose_128x128(*w)

    @staticmethod
    def cached(a: Operand) -> torch.Tensor:
        return dequant_1x128(*a)

    @staticmethod
    def gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
        return gemm.fp8_gemm(*a, *b, out_dtype)


@backends.register("fp8_linear", "triton")
class TritonFP8(TorchFP8):
    """The reference quantizers with the Triton block-scaled GEMM (native on CUDA, interpreted on the CPU)."""

    @staticmethod
    def gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
        from dsv3ref.fp8 import triton_kernels

        return triton_kernels.fp8_gemm(*a, *b, out_dtype)


class BF16Ops:
    """The BF16 recipe: operands rounded to bfloat16, exact products, fp32 accumulation."""

    @staticmethod
    def act(x: torch.Tensor) -> Operand:
        return (x.bfloat16(),)

    @staticmethod
    def act_t(x: torch.Tensor) -> Operand:
        return (x.mT.bfloat16(),)

    weight = act

    @staticmethod
    def weight_t(w: Operand) -> Operand:
        return (w[0].mT,)

    @staticmethod
    def cached(a: Operand) -> torch.Tensor:
        return a[0]

    @staticmethod
    def gemm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast(a[0].device.type, enabled=False):
            return (a[0].float() @ b[0].float().mT).to(out_dtype)


def linear_ops(recipe: str, backend: str = "torch") -> LinearOps:
    """The operand ops of `recipe` ('fp8' through `backend`, or 'bf16'); FP8Error naming a bad one."""
    if recipe not in RECIPES:
        raise FP8Error(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    try:
        ops = backends.get("fp8_linear", backend)
    except ConfigError as e:
        raise FP8Error(str(e)) from None
    return ops if recipe == "fp8" else BF16Ops


class QuantizedWeight:
    """One version of a weight as a GEMM operand, and its transpose's (made on first use, by dgrad)."""

    def __init__(self, ops: LinearOps, w: torch.Tensor) -> None:
        self.ops, self.op, self._t = ops, ops.weight(w.detach()), None

    def transposed(self) -> Operand:
        if self._t is None:
            self._t = self.ops.weight_t(self.op)
        return self._t


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LowPrecisionLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, ops: LinearOps, w: QuantizedWeight, cache: str,
                out_dtype: torch.dtype) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        a = ops.act(x2)
        y = ops.gemm(a, w.op, out_dtype)  # [T, N]
        ctx.ops, ctx.w, ctx.x_shape, ctx.x_dtype = ops, w, x.shape, x.dtype
        ctx.cache = (a, True) if cache == "fp8" else (x2.detach(), False)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [T, N]
        ops, grad_x, grad_w = ctx.ops, None, None
        if ctx.needs_input_grad[0]:
            grad_x = ops.gemm(ops.act(g2), ctx.w.transposed(), ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            held, quantized = ctx.cache
            x2 = ops.cached(held) if quantized else held
            grad_w = ops.gemm(ops.act_t(g2), ops.act_t(x2), torch.float32)  # [N, K]
        return grad_x, grad_w, None, None, None, None


def _check_x(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not x.is_floating_point() or x.shape[-1] != weight.shape[-1]:
        raise FP8Error(f"x: expected a float tensor [..., {weight.shape[-1]}], got {x.dtype} {tuple(x.shape)}")


def _check_cache(cache: str) -> None:
    if cache not in CACHES:
        raise FP8Error(f"cache: expected one of {', '.join(CACHES)}, got {cache!r}")


def low_precision_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str = "fp8", backend: str = "torch",
                         cache: str = "fp8") -> torch.Tensor:
    """y = x W^T with fprop/dgrad/wgrad in `recipe` (differentiable in x and W); the weight is quantized per call,
    and any in_features is accepted (a partial last tile is zero-padded for its scale)."""
    ops = linear_ops(recipe, backend)
    _check_cache(cache)
    _check_x(x, weight)
    return _LowPrecisionLinear.apply(x, weight, ops, QuantizedWeight(ops, weight), cache, _output_dtype(x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "torch", cache: str = "fp8") -> torch.Tensor:
    """y = x W^T with FP8 fprop/dgrad/wgrad."""
    return low_precision_linear(x, weight, "fp8", backend, cache)


class LowPrecisionLinear(nn.Linear):
    """nn.Linear (no bias) whose forward and backward GEMMs run in `recipe`; the weight is the fp32 master, and
    its operands are made once per weight version."""

    def __init__(self, in_features: int, out_features: int, recipe: str = "fp8", backend: str = "torch",
                 cache: str = "fp8", device=None, dtype=None) -> None:
        self.ops = linear_ops(recipe, backend)
        _check_cache(cache)
        if recipe == "fp8" and in_features % BLOCK:
            raise FP8Error(f"in_features: expected a multiple of {BLOCK} for the FP8 recipe (1x128 activation tiles "
                           f"along it), got {in_features}")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.recipe, self.backend, self.cache = recipe, backend, cache
        self._weight_key: tuple | None = None
        self._weight_op: QuantizedWeight | None = None

    def quantized_weight(self) -> QuantizedWeight:
        """The weight's operands, remade when the weight changed (storage or version) since the last call."""
        w = self.weight
        version = -1 if w.is_inference() else w._version  # inference tensors keep no version counter
        key = (w.data_ptr(), version, w.dtype, w.device)
        if self._weight_key != key:
            self._weight_op, self._weight_key = QuantizedWeight(self.ops, w), key
        return self._weight_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_x(x, self.weight)
        return _LowPrecisionLinear.apply(x, self.weight, self.ops, self.quantized_weight(), self.cache,
                                         _output_dtype(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}, backend={self.backend}, cache={self.cache}"


def convert_linears(model: nn.Module, recipe: str = "fp8", keep: tuple[str, ...] = DEFAULT_KEEP,
                    backend: str = "torch", input_cache: tuple[str, ...] = DEFAULT_INPUT_CACHE) -> list[str]:
    """Replace every bias-free nn.Linear of `model` whose own name is not in `keep` by a LowPrecisionLinear
    sharing its weight (same state-dict names); those named in `input_cache` keep their input for wgrad, the others
    an FP8 copy. Returns the qualified names of the swapped modules. Every module is checked before any is
    swapped: an FP8Error names the first whose in_features the recipe cannot tile."""
    linear_ops(recipe, backend)
    found = [(parent_name, parent, name, child) for parent_name, parent in model.named_modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and child.bias is None and name not in keep]
    for parent_name, _, name, child in found:
        if recipe == "fp8" and child.in_features % BLOCK:
            qualified = f"{parent_name}.{name}" if parent_name else name
            raise FP8Error(f"{qualified}: in_features {child.in_features} is not a multiple of {BLOCK} (the FP8 "
                           f"recipe's 1x128 activation tiles); keep it in high precision (keep=...) or choose a "
                           f"multiple of {BLOCK}")
    swapped = []
    for parent_name, parent, name, child in found:
        cache = "input" if name in input_cache else "fp8"
        new = LowPrecisionLinear(child.in_features, child.out_features, recipe, backend, cache, device="meta")
        new.weight = child.weight
        setattr(parent, name, new)
        swapped.append(f"{parent_name}.{name}" if parent_name else name)
    return swapped
