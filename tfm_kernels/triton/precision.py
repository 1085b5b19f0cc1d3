"""The precision of the Triton kernels' float32 dot products, following torch's setting for float32 matmuls on
CUDA. torch has two APIs for it: the legacy one (torch.backends.cuda.matmul.allow_tf32,
torch.set_float32_matmul_precision) and fp32_precision ("ieee" / "tf32" / "none" = inherit the generic
torch.backends.fp32_precision). The legacy setters keep fp32_precision in step, but reading allow_tf32 raises
once the new API has set a value the legacy one cannot express, so only fp32_precision is read."""

import torch


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
