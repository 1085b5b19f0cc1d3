"""The precision of the Triton kernels' float32 dot products, following torch's setting for float32 matmuls on
CUDA. torch has two APIs for it: the legacy one (torch.backends.cuda.matmul.allow_tf32,
torch.set_float32_matmul_precision) and fp32_precision ("ieee" / "tf32" / "none" = inherit the generic
torch.backends.fp32_precision). The legacy setters keep fp32_precision in step, but reading allow_tf32 raises
once the new API has set a value the legacy one cannot express, so only fp32_precision is read.

Triton's TF32 dot hands the tensor cores float32 operands whose low 13 mantissa bits they ignore: truncation,
twice the worst-case operand error of torch's TF32 matmuls, which round to nearest. `dot` rounds float32
operands to TF32 first, as torch does. The CPU interpreter's dots are exact whatever the precision, so there it
leaves them as they are."""

import torch
import triton
import triton.language as tl


# Constants as constexpr functions, not constexpr globals: philox.py says why. float32 has 23 mantissa bits,
# TF32 10: rounding adds half of the 13 dropped bits' range, then clears them.
@triton.constexpr_function
def tf32_half_dropped():
    return 1 << 12


@triton.constexpr_function
def tf32_kept_bits():
    return 0xFFFFE000


@triton.constexpr_function
def round_operands_to_tf32():
    """Whether `dot` rounds float32 operands for TF32: in compiled kernels, not in the interpreter."""
    return not triton.knobs.runtime.interpret


def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls on CUDA run in TF32."""
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def dot_precision(dtype) -> str:
    """Triton's input_precision for tl.dot on `dtype` inputs: "ieee" (exact float32) unless torch allows TF32;
    16-bit inputs ignore it."""
    return "tf32" if dtype != torch.float32 or tf32_allowed() else "ieee"


@triton.jit
def round_to_tf32(x):
    """float32 x rounded to TF32's 10 mantissa bits: to nearest, ties away from zero (PTX cvt.rna.tf32.f32).
    Adding half of the dropped bits' range carries into the kept bits exactly when the dropped part is at least
    half; infinities keep their bits, NaNs with a payload bit among the kept ones (quiet NaNs) stay NaN, the
    largest finite values round to infinity."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + tf32_half_dropped()) & tf32_kept_bits()).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) in PRECISION (dot_precision), float32 operands rounded to TF32 when that is "tf32"."""
    if round_operands_to_tf32():
        if PRECISION == "tf32":
            if a.dtype == tl.float32:
                a = round_to_tf32(a)
            if b.dtype == tl.float32:
                b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)
