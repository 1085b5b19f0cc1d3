"""The tolerance rule (DESIGN.md): a kernel's error against the float64 oracle is at most twice the error of
plain PyTorch in the same dtype against that oracle, plus the oracle's own rounding noise."""

import torch

RELATIVE_NOISE = 1e-5  # float32-accumulation noise, relative to the largest oracle value


def max_error(x, oracle):
    return (x.double() - oracle.double()).abs().max().item() if x.numel() else 0.0


def assert_within_tolerance(name, result, baseline, oracle):
    """result: the kernel's tensor; baseline: plain PyTorch in the same dtype; oracle: float64."""
    assert result.shape == oracle.shape, f"{name}: shape {tuple(result.shape)} != oracle {tuple(oracle.shape)}"
    assert torch.isfinite(result).all(), f"{name}: non-finite values where the oracle has numbers"
    noise = RELATIVE_NOISE * max(1.0, oracle.abs().max().item() if oracle.numel() else 0.0)
    err, base_err = max_error(result, oracle), max_error(baseline, oracle)
    assert err <= 2 * base_err + noise, (f"{name}: error {err:.3e} exceeds 2 x torch's {base_err:.3e} + noise "
                                         f"{noise:.1e}")


def poison_allocator(device, nbytes=1 << 24):
    """Leaves NaN-filled memory in the allocator, so an output a kernel fails to write shows up as NaN."""
    torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
