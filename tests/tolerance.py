"""The tolerance rule (DESIGN.md), as test assertions; the rule itself lives in tfm_kernels.tolerance."""

import contextlib

import torch

from tfm_kernels.tolerance import tolerance_failure


def assert_within_tolerance(name, result, baseline, oracle):
    """result: the kernel's tensor; baseline: plain PyTorch in the same dtype; oracle: float64."""
    failure = tolerance_failure(name, result, baseline, oracle)
    assert failure is None, failure


@contextlib.contextmanager
def poisoned_memory(device, nbytes=1 << 24):
    """Within it, memory the kernels take for their outputs holds NaN, so an output element a kernel fails to
    write shows up as NaN. On a GPU, NaN left in the caching allocator's free blocks. On a CPU freed memory
    goes back to the system and comes back zeroed or stale, so torch fills every new tensor with NaN instead:
    it does under deterministic algorithms (warn-only here), in Python and C++ allocations alike."""
    device = torch.device(device)
    if device.type != "cpu":
        torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
