"""Linear layers for low-precision training: all three GEMMs (fprop, dgrad, wgrad) with fp32 accumulation.

Recipe "fp8" (DeepSeek-V3):
  fprop  y  = x W^T      x in 1x128 tiles, W in 128x128 blocks
  dgrad  dx = dy W       dy in 1x128 tiles, W^T in 128x128 blocks (the forward's blocks, transposed)
  wgrad  dW = dy^T x     dy^T and x^T in 1x128 tiles along tokens, quantized from the high-precision tensors
Recipe "bf16": the same three GEMMs with operands rounded to BF16 (what a BF16 tensor-core GEMM computes), so
that a BF16 baseline differs from the FP8 run only in the operand format.
The weight stays an fp32 master parameter (the optimizer updates it) and dW is fp32. Under autocast the output
has the autocast dtype (BF16 component I/O, as in the paper), otherwise the input's dtype; dx has x's dtype.
`convert_linears` swaps the nn.Linear modules of a model, keeping chosen ones (embedding, head, router gate) in
high precision. Only modules whose forward runs are affected: code that reads `.weight` directly (MLA's absorbed
path reads wkv_b, the MoE grouped path stacks the experts' weights) keeps computing in its own precision.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv3ref.fp8 import gemm
from dsv3ref.fp8.quant import FP8Error, quant_1x128, quant_1x128_of_transpose, quant_128x128, transpose_128x128

RECIPES = ("fp8", "bf16")
DEFAULT_KEEP = ("embed", "head", "gate")
Gemm = Callable[..., torch.Tensor]


def _gemm_backend(name: str) -> Gemm:
    if name == "torch":
        return gemm.fp8_gemm
    if name == "triton":
        from dsv3ref.fp8 import triton_kernels

        return triton_kernels.fp8_gemm
    raise FP8Error(f"backend: expected 'torch' or 'triton', got {name!r}")


def _check_recipe(recipe: str, backend: str) -> None:
    if recipe not in RECIPES:
        raise FP8Error(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
    _gemm_backend(backend)


def _bf16_gemm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T of BF16 operands with exact products and fp32 accumulation."""
    with torch.autocast(a.device.type, enabled=False):
        return (a.float() @ b.float().mT).to(out_dtype)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _LowPrecisionLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: str, backend: str,
                out_dtype: torch.dtype) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        if recipe == "fp8":
            wq, ws = quant_128x128(weight.detach())
            y = _gemm_backend(backend)(*quant_1x128(x2), wq, ws, out_dtype)  # [T, N]
            ctx.save_for_backward(x2, wq, ws)
        else:
            xb, wb = x2.detach().bfloat16(), weight.detach().bfloat16()
            y = _bf16_gemm(xb, wb, out_dtype)
            ctx.save_for_backward(xb, wb)
        ctx.recipe, ctx.backend, ctx.x_shape, ctx.x_dtype = recipe, backend, x.shape, x.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g2 = grad_out.reshape(-1, grad_out.shape[-1])  # [T, N]
        grad_x = grad_w = None
        if ctx.recipe == "fp8":
            fp8_gemm = _gemm_backend(ctx.backend)
            x2, wq, ws = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                grad_x = fp8_gemm(*quant_1x128(g2), *transpose_128x128(wq, ws), ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = fp8_gemm(*quant_1x128_of_transpose(g2), *quant_1x128_of_transpose(x2), torch.float32)
        else:
            xb, wb = ctx.saved_tensors
            gb = g2.bfloat16()
            if ctx.needs_input_grad[0]:
                grad_x = _bf16_gemm(gb, wb.mT, ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = _bf16_gemm(gb.mT, xb.mT, torch.float32)  # [N, K]
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, grad_w, None, None, None


def low_precision_linear(x: torch.Tensor, weight: torch.Tensor, recipe: str = "fp8",
                         backend: str = "torch") -> torch.Tensor:
    """y = x W^T with fprop/dgrad/wgrad in `recipe` (differentiable in x and W)."""
    _check_recipe(recipe, backend)
    if not x.is_floating_point() or x.shape[-1] != weight.shape[-1]:
        raise FP8Error(f"x: expected a float tensor [..., {weight.shape[-1]}], got {x.dtype} {tuple(x.shape)}")
    return _LowPrecisionLinear.apply(x, weight, recipe, backend, _output_dtype(x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """y = x W^T with FP8 fprop/dgrad/wgrad."""
    return low_precision_linear(x, weight, "fp8", backend)


class LowPrecisionLinear(nn.Linear):
    """nn.Linear (no bias) whose forward and backward GEMMs run in `recipe`; the weight is the fp32 master."""

    def __init__(self, in_features: int, out_features: int, recipe: str = "fp8", backend: str = "torch",
                 device=None, dtype=None) -> None:
        _check_recipe(recipe, backend)
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.recipe, self.backend = recipe, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_precision_linear(x, self.weight, self.recipe, self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


def convert_linears(model: nn.Module, recipe: str = "fp8", keep: tuple[str, ...] = DEFAULT_KEEP,
                    backend: str = "torch") -> list[str]:
    """Replace every bias-free nn.Linear of `model` whose own name is not in `keep` by a LowPrecisionLinear
    sharing its weight (same state-dict names); returns the qualified names of the swapped modules."""
    _check_recipe(recipe, backend)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or child.bias is not None or name in keep:
                continue
            new = LowPrecisionLinear(child.in_features, child.out_features, recipe, backend, device="meta")
            new.weight = child.weight
            setattr(parent, name, new)
            swapped.append(f"{parent_name}.{name}" if parent_name else name)
    return swapped
