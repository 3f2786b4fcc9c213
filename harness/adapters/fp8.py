"""Component `fp8` (protocol `harness.protocols.FP8Impl`): the built-in implementations, `reference` (torch,
dsv3ref.fp8.quant/gemm), `triton` (dsv3ref.fp8.triton_kernels: native on CUDA, through the Triton interpreter
on the CPU) and `fused` (dsv3ref.fp8.fused: the compiled CPU quantizers, with the reference's dequantizers and
GEMM).
"""

from __future__ import annotations

from types import SimpleNamespace

from harness.protocols import FP8Impl, members
from harness.registry import UsageError, register_component, register_impl

FUNCTIONS = tuple(m for m in members(FP8Impl) if m != "component")
PROPERTIES = (
    "ue8m0",  # power-of-two (UE8M0) scales
    "unaligned",  # last dims that are not multiples of 128 (zero-padded scale computation)
    "nonfinite",  # the documented NaN/Inf result: a non-finite value poisons only its own tile
    "row_scaled_b",  # GEMM with 1x128-scaled B [N, Kb] (the weight-gradient GEMM)
    "input_errors",  # bad dtypes/shapes raise a ValueError subclass (not an assertion or a crash)
)

register_component("fp8", "FP8 1x128 / 128x128 quantizers, dequantizers and the block-scaled FP8 GEMM", FP8Impl,
                   PROPERTIES)


def _namespace(module: object) -> SimpleNamespace:
    return SimpleNamespace(component="fp8", **{name: getattr(module, name) for name in FUNCTIONS})


def reference() -> SimpleNamespace:
    """The torch reference (dsv3ref.fp8.quant and dsv3ref.fp8.gemm)."""
    import dsv3ref.fp8

    return _namespace(dsv3ref.fp8)


def triton() -> SimpleNamespace:
    """The Triton kernels; fails with the reason when they cannot run in this process."""
    from dsv3ref.fp8 import triton_kernels

    reason = triton_kernels.unavailable()
    if reason:
        raise UsageError(f"fp8/triton: {reason}")
    return _namespace(triton_kernels)


def fused() -> SimpleNamespace:
    """The compiled CPU quantizers; fails with the reason when they cannot be built here."""
    import dsv3ref.fp8
    from dsv3ref.fp8 import fused as kernels

    reason = kernels.unavailable()
    if reason:
        raise UsageError(f"fp8/fused: {reason}")
    return SimpleNamespace(component="fp8", quant_1x128=kernels.quant_1x128, quant_128x128=kernels.quant_128x128,
                           dequant_1x128=dsv3ref.fp8.dequant_1x128, dequant_128x128=dsv3ref.fp8.dequant_128x128,
                           fp8_gemm=dsv3ref.fp8.fp8_gemm)


register_impl("fp8", "reference", reference, "torch reference quantizers and block-scaled GEMM (dsv3ref.fp8)")
register_impl("fp8", "triton", triton, "Triton kernels (native on CUDA, the Triton interpreter on the CPU)",
              requires=("triton",))
register_impl("fp8", "fused", fused, "compiled CPU quantizers (torch.compile), reference dequantizers and GEMM",
              devices=("cpu",))
