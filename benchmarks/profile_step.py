"""Where the time of a benchmarked call goes: the same callables the bench times for nn.MultiheadAttention and
the language model (ours and torch's, eager), run under torch.profiler.

For each it prints one summary line, torch.profiler's table of the operators and kernels that take the most
device time (CPU time without a GPU), and cProfile's table of the Python functions that take the most host time
(the launchers' own Python included, which benchmarks/host_overhead.py leaves out):
  host ms   the Python of one call, until its last kernel is queued (calls issued back to back, no sync);
  wall ms   one call from issue to the end of its kernels (a sync after the calls);
  device ms the kernels' own time in one call (the profiler's sum over kernels).
A call whose host ms reaches its wall ms keeps the GPU waiting on Python; one whose device ms is short of its
wall ms has gaps between kernels; otherwise the kernels themselves are the time, and the table says which.

    python benchmarks/profile_step.py                  # GPU: the bench's MHA shape and GPT-2-small LM
    python benchmarks/profile_step.py --suite mha      # only nn.MultiheadAttention
"""

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tfm_kernels.bench import configs
from tfm_kernels.bench.attention import mha_cases
from tfm_kernels.bench.model import model_cases
from tfm_kernels.bench.suite import Unavailable

WARMUP_CALLS = 3  # compiles, autotunes and fills the caching allocator before anything is measured
TABLE_ROWS = 12
PYTHON_ROWS = 20
LM_PRESET = "gpt2-small"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_ms(events, calls):
    """Milliseconds of device (kernel) time per call in the profiler's averaged events."""
    total_us = sum(e.self_device_time_total for e in events if e.device_type != torch.autograd.DeviceType.CPU)
    return total_us / 1e3 / calls


def python_profile(fn, device, calls):
    """cProfile's table of the functions with the most host time over `calls` calls (own time, not callees')."""
    profiler = cProfile.Profile()
    profiler.runcall(lambda: [fn() for _ in range(calls)])
    _sync(device)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(PYTHON_ROWS)
    return text.getvalue()


def profile_call(fn, device, calls):
    """(host ms, wall ms, device ms) per call, the profiler's table and cProfile's."""
    for _ in range(WARMUP_CALLS):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    _sync(device)
    done = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=60)
    per_call = 1e3 / calls
    return (issued - start) * per_call, (done - start) * per_call, _device_ms(events, calls), table, \
        python_profile(fn, device, calls)


def cases(suites, device):
    """The model's cases first: a run cut short by device_check.sh's cap (the H200 run of 2026-11-30 finished
    only the MHA rows) still profiles the language model, whose host time sets its speed there."""
    found = []
    if "model" in suites:
        if device.type == "cuda":
            found += model_cases((), ("fwd+bwd",), device, lm_presets=[LM_PRESET], with_compile=False)
        else:
            found += model_cases(configs.CPU_ENCODER_SHAPES, ("fwd+bwd",), device, with_compile=False)
    if "mha" in suites:
        shapes = configs.MHA_SHAPES[:1] if device.type == "cuda" else configs.CPU_MHA_SHAPES[:1]
        found += mha_cases(shapes, ("fwd", "fwd+bwd"), device)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="mha,model", help="comma-separated: mha, model (default both)")
    parser.add_argument("--calls", type=int, default=5, help="calls timed and profiled per provider (default 5)")
    args = parser.parse_args(argv)
    suites = set(args.suite.split(","))
    if not suites <= {"mha", "model"}:
        parser.error(f"--suite takes mha and model; got {args.suite!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for case in cases(suites, device):
        for provider in case.providers:
            title = f"{case.config} {case.mode} | {provider.name}"
            try:
                fn = provider.prepare()
            except Unavailable as reason:
                print(f"### {title}: n/a ({reason})\n")
                continue
            host, wall, device_ms, table, python_table = profile_call(fn, device, args.calls)
            print(f"### {title}: host {host:.3f} ms, wall {wall:.3f} ms, device {device_ms:.3f} ms per call\n")
            print(table)
            print(python_table)
            del fn
            _sync(device)


if __name__ == "__main__":
    main()
