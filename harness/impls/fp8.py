"""The `fp8` component: fine-grained FP8 quantizers and the block-scaled GEMM under test.

Protocol (the signatures of dsv3ref.fp8):
- `quant_1x128(x [..., K], ue8m0=False) -> (q [..., K] float8_e4m3fn, s [..., ceil(K/128)] fp32)`
- `quant_128x128(w [M, N], ue8m0=False) -> (q [M, N], s [ceil(M/128), ceil(N/128)])`
- `dequant_1x128(q, s, dtype=float32)`, `dequant_128x128(q, s, dtype=float32)` -> values of `dtype`
- `fp8_gemm(a [M, K], a_s [M, Kb], b [N, K], b_s [ceil(N/128), Kb] or [N, Kb], out_dtype=bfloat16) -> [M, N]`
Bad input raises a ValueError subclass naming the argument.

Registered: `reference` (torch, dsv3ref.fp8.quant/gemm) and `triton` (dsv3ref.fp8.triton_kernels: native on CUDA,
through the Triton interpreter on the CPU). A user kernel declares `component = "fp8"` and may list properties
it does not support in `not_applicable`.
"""

from __future__ import annotations

from types import SimpleNamespace

from harness.registry import UsageError, register_component, register_impl

REQUIRED = ("quant_1x128", "quant_128x128", "dequant_1x128", "dequant_128x128", "fp8_gemm")
PROPERTIES = (
    "ue8m0",  # power-of-two (UE8M0) scales
    "unaligned",  # last dims that are not multiples of 128 (zero-padded scale computation)
    "nonfinite",  # the documented NaN/Inf result: a non-finite value poisons only its own tile
    "row_scaled_b",  # GEMM with 1x128-scaled B [N, Kb] (the weight-gradient GEMM)
    "input_errors",  # bad dtypes/shapes raise a ValueError subclass (not an assertion or a crash)
)

register_component("fp8", "FP8 1x128 / 128x128 quantizers, dequantizers and the block-scaled FP8 GEMM",
                   required=REQUIRED, properties=PROPERTIES)


def _namespace(module: object) -> SimpleNamespace:
    return SimpleNamespace(component="fp8", **{name: getattr(module, name) for name in REQUIRED})


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


register_impl("fp8", "reference", reference, "torch reference quantizers and block-scaled GEMM (dsv3ref.fp8)")
register_impl("fp8", "triton", triton, "Triton kernels (native on CUDA, the Triton interpreter on the CPU)",
              requires=("triton",))
