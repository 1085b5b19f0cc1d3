"""The tolerance rule (DESIGN.md): a kernel's error against the float64 oracle is at most twice the error of
plain PyTorch in the same dtype against that oracle, plus the oracle's own rounding noise. Used by the test
suite and by `python -m tfm_kernels bench`'s self-check."""

import torch

RELATIVE_NOISE = 1e-5  # float32-accumulation noise, relative to the largest oracle value


def max_error(x, oracle):
    return (x.double() - oracle.double()).abs().max().item() if x.numel() else 0.0


def tolerance_failure(name, result, baseline, oracle) -> str | None:
    """Why `result` breaks the rule against `oracle` with `baseline` (plain PyTorch in result's dtype), or
    None when it keeps it."""
    if result.shape != oracle.shape:
        return f"{name}: shape {tuple(result.shape)} != oracle {tuple(oracle.shape)}"
    if not torch.isfinite(result).all():
        return f"{name}: non-finite values where the oracle has numbers"
    noise = RELATIVE_NOISE * max(1.0, oracle.abs().max().item() if oracle.numel() else 0.0)
    err, base_err = max_error(result, oracle), max_error(baseline, oracle)
    if err > 2 * base_err + noise:
        return f"{name}: error {err:.3e} exceeds 2 x torch's {base_err:.3e} + noise {noise:.1e}"
    return None
