"""The tolerance rule (DESIGN.md), as test assertions; the rule itself lives in tfm_kernels.tolerance."""

import torch

from tfm_kernels.tolerance import tolerance_failure


def assert_within_tolerance(name, result, baseline, oracle):
    """result: the kernel's tensor; baseline: plain PyTorch in the same dtype; oracle: float64."""
    failure = tolerance_failure(name, result, baseline, oracle)
    assert failure is None, failure


def poison_allocator(device, nbytes=1 << 24):
    """Leaves NaN-filled memory in the allocator, so an output a kernel fails to write shows up as NaN."""
    torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
