"""The tolerance rule (DESIGN.md, FlashAttention's): a kernel's error against the float64 oracle is at most
twice the error of plain PyTorch in the same dtype against that oracle, plus the oracle's own rounding noise.
Used by the test suite and by `python -m tfm_kernels bench`'s self-check.

The rounding noise is measured as FlashAttention's tests measure it: the oracle rounded to the result's dtype,
shifted by 0.3 and back, i.e. about two units in the last place of that dtype at the oracle's magnitude.
A kernel stores its output in that dtype and its backward reads it back (rowsum(dO * O)), so it carries at
least this much error whatever the arithmetic inside. Every result gets at least RELATIVE_NOISE of the
oracle's magnitude, about 8 float32 units in the last place: where torch's float32 error is near 0 (one key,
a head dim of 1, gradients that cancel), a kernel that sums in another order still rounds. Where the result or
the oracle is NaN or infinite, the other must be the same; torch's error counts only where torch's own result
is finite (where it overflows, the kernel keeps the bound of torch's finite elements).
"""

import torch

RELATIVE_NOISE = 1e-6  # float32-accumulation noise, relative to the largest oracle value
ROUNDING_SHIFT = 0.3


def rounding_noise(oracle, dtype) -> float:
    """Twice the largest rounding error of the oracle's values expressed in `dtype` (shifted by 0.3)."""
    if not oracle.numel():
        return 0.0
    rounded = oracle.to(dtype)
    shifted = (rounded + ROUNDING_SHIFT) - ROUNDING_SHIFT  # computed in `dtype`
    return 2 * (shifted.double() - rounded.double()).abs().max().item()


def max_error(x, oracle):
    return (x.double() - oracle.double()).abs().max().item() if x.numel() else 0.0


def _same_non_finite(x, reference):
    """Elementwise: x is NaN where `reference` is, or the same infinity."""
    x, reference = x.double(), reference.double()
    return (x.isnan() & reference.isnan()) | (x.isinf() & (x == reference))


def tolerance_failure(name, result, baseline, oracle) -> str | None:
    """Why `result` breaks the rule against `oracle` with `baseline` (plain PyTorch in result's dtype), or
    None when it keeps it."""
    if result.shape != oracle.shape:
        return f"{name}: shape {tuple(result.shape)} != oracle {tuple(oracle.shape)}"
    if result.dtype != baseline.dtype:
        return f"{name}: dtype {result.dtype} != torch's {baseline.dtype}"
    non_finite = ~torch.isfinite(oracle) | ~torch.isfinite(result)
    if non_finite.any():  # NaN and +-inf exactly where the oracle has them; the rule for the rest
        differing = int((non_finite & ~_same_non_finite(result, oracle)).sum())
        if differing:
            return f"{name}: {differing} elements NaN or infinite in the result or the oracle but not in both alike"
        finite = ~non_finite
        result, baseline, oracle = result[finite], baseline[finite], oracle[finite]
    noise = max(RELATIVE_NOISE * max(1.0, oracle.abs().max().item() if oracle.numel() else 0.0),
                rounding_noise(oracle, result.dtype))
    torch_finite = torch.isfinite(baseline)
    err, base_err = max_error(result, oracle), max_error(baseline[torch_finite], oracle[torch_finite])
    if err > 2 * base_err + noise:
        return f"{name}: error {err:.3e} exceeds 2 x torch's {base_err:.3e} + noise {noise:.1e}"
    return None
