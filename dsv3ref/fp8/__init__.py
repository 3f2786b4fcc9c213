"""FP8 fine-grained mixed precision: quantizers, block-scaled GEMM, accumulation emulation, FP8 linear, LogFMT.

The torch reference lives in `quant.py` and `gemm.py`; `triton_kernels.py` holds bit-exact Triton versions
(imported on demand, since importing it may select the Triton interpreter; see its docstring).
"""

from dsv3ref.fp8.gemm import fp8_gemm
from dsv3ref.fp8.quant import (
    BLOCK,
    E4M3_MAX,
    FP8Error,
    dequant_1x128,
    dequant_128x128,
    quant_1x128,
    quant_1x128_of_transpose,
    quant_128x128,
    transpose_128x128,
)

__all__ = ["BLOCK", "E4M3_MAX", "FP8Error", "dequant_1x128", "dequant_128x128", "fp8_gemm",
           "quant_1x128", "quant_1x128_of_transpose", "quant_128x128", "transpose_128x128"]
