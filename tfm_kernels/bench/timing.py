"""The one timing helper of the benchmark suite.

On CUDA: `triton.testing.do_bench` (median with the 0.2 and 0.8 quantiles, after warm-up; do_bench also
flushes L2 before each timed call) and the peak memory one call allocates beyond what was live before it, and
the host time to issue one call: do_bench's events also count the time the GPU waits for a call's Python to
launch its kernels, so a call whose host time reaches its median is bound by the CPU, not by its kernels.
On CPU: a `time.perf_counter` timer with the same warm-up and statistics.

Inputs are the caller's, drawn with `randn` (never zeros: kernels that skip zero tiles or hit denormal paths
would be flattered). When one set of inputs fits in the last-level cache, `rotating` builds enough copies
that consecutive calls read cold memory.
"""

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median first, then the band reported beside it
MAX_ROTATION = 64  # copies of one input set at most; 64 sets of a few MB cover any L2 of today's GPUs
MIN_TIMED_CALLS = 3  # the CPU timer's floor, so a slow call still gives a median of several runs
ISSUE_CALLS = 5  # calls whose host time gives issue_ms's median


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20%/80% quantiles; peak_bytes: the most memory one call
    allocated beyond what was live before it (CUDA only, else None); calls: how many calls were timed;
    host_ms: the host time to issue one call (CUDA only: on CPU the median is host time)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_bytes: int | None
    calls: int | None = None
    host_ms: float | None = None


def quantile(values, q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values`, interpolating linearly between order statistics."""
    if not values:
        raise ValueError("quantile needs at least one value; got none")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1]; got {q}")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False) -> torch.Tensor:
    """Standard normal values times `scale`: benchmark inputs are never zeros or constants."""
    t = torch.randn(shape, dtype=torch.float32, device=device).mul_(scale).to(dtype)  # shape (): a scalar
    return t.requires_grad_(requires_grad)


def random_inputs(*shapes, dtype, device):
    """make(requires_grad) -> a fresh tuple of `randn` tensors of `shapes`: the input factory of a case."""

    def make(requires_grad):
        return tuple(randn(*s, dtype=dtype, device=device, requires_grad=requires_grad) for s in shapes)

    return make


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors inside `obj` (a tensor or nested tuples/lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def cache_bytes(device) -> int:
    """The last-level cache that rotation must defeat: the GPU's L2; 0 on CPU, where the table measures
    warm-cache throughput as torch's own CPU benchmarks do."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    return 0


def rotation_count(set_bytes: int, cache: int) -> int:
    """How many copies of an input set of `set_bytes` make consecutive calls miss a cache of `cache` bytes:
    enough to span twice the cache (one copy when one set alone exceeds it), at most MAX_ROTATION."""
    if set_bytes <= 0 or set_bytes >= cache:
        return 1
    return min(MAX_ROTATION, math.ceil(2 * cache / set_bytes))


def rotating(make_inputs: Callable[[], tuple], run: Callable[..., Any], cache: int) -> Callable[[], Any]:
    """A zero-argument callable that runs `run(*inputs)` on the next of several input sets in turn.

    make_inputs() returns one fresh tuple of arguments; it is called rotation_count(...) times up front."""
    first = make_inputs()
    sets = [first] + [make_inputs() for _ in range(rotation_count(tensor_bytes(first), cache) - 1)]
    turn = itertools.cycle(sets)

    def step():
        return run(*next(turn))

    step.sets = sets  # exposed for tests and for memory accounting
    return step


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], Any], device) -> int | None:
    """The most memory one call of fn allocates beyond what is live before it (CUDA), else None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    _synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def issue_ms(fn: Callable[[], Any], device, calls: int = ISSUE_CALLS) -> float:
    """Median host milliseconds from calling fn to its return, each call starting with the device idle (so
    the launch queue never fills and blocks it): the CPU's cost of issuing one call, unless fn synchronizes."""
    device = torch.device(device)
    times = []
    for _ in range(calls):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    _synchronize(device)
    return quantile(times, 0.5)


def cpu_timing(
    fn: Callable[[], Any], warmup_ms: float = 25.0, rep_ms: float = 100.0, max_calls: int = 1000
) -> Timing:
    """Times fn on the host clock: warm-up for about warmup_ms (at least one call), then about rep_ms of
    individually timed calls (at least MIN_TIMED_CALLS, at most max_calls)."""
    start = time.perf_counter()
    fn()
    first_ms = (time.perf_counter() - start) * 1e3
    warmup_calls = max(0, math.ceil(warmup_ms / max(first_ms, 1e-3)) - 1)
    for _ in range(min(warmup_calls, max_calls)):
        fn()
    estimate_ms = first_ms
    if warmup_calls:
        start = time.perf_counter()
        fn()
        estimate_ms = (time.perf_counter() - start) * 1e3
    calls = min(max_calls, max(MIN_TIMED_CALLS, math.ceil(rep_ms / max(estimate_ms, 1e-3))))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = (quantile(times, q) for q in QUANTILES)
    return Timing(median, p20, p80, None, calls)


def measure(fn: Callable[[], Any], device, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """Median and quantile milliseconds of fn() on `device`, plus its peak memory on CUDA. fn runs once
    before timing (compilation, autotuning, lazy initialisation happen there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu_timing(fn, warmup_ms, rep_ms)
    import triton.testing

    fn()
    _synchronize(device)
    peak = peak_bytes(fn, device)
    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return Timing(median, p20, p80, peak, host_ms=issue_ms(fn, device))
