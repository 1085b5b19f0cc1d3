"""pytest-benchmark over the suite's cases: `pytest benchmarks/ --benchmark-only` on a GPU times the core
cases (each call synchronised, so the clock sees the kernels, not their launch); CPU CI runs the same
functions once each with `--benchmark-disable` on tiny shapes, so they keep working. Without a GPU our Triton
providers run under the interpreter, as in tests/: their step runs (and fails the case if it raises), but
their time means nothing, so they are never timed.

The bench_*.py files are collected as test modules here (pytest's default pattern is test_*.py)."""

import pytest
import torch

from tfm_kernels import backends
from tfm_kernels.bench.interpreter import use_triton_interpreter_without_gpu
from tfm_kernels.bench.suite import Unavailable

# Before the bench_*.py modules are collected: their cases import the Triton kernels.
use_triton_interpreter_without_gpu()

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ROUNDS, WARMUP_ROUNDS = (20, 3) if ON_GPU else (3, 1)


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest's own python plugin whatever its name; adding
    # it here too would run each of its cases twice.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture
def time_provider(benchmark):
    """time_provider(provider): prepares the provider (skipping only where it cannot run here: no such
    backend, no GPU) and times its step with pytest-benchmark, synchronising after each call. A provider whose
    time means nothing here (provider.untimed) still runs its step: with --benchmark-disable that is the whole
    case, as for every provider; when timing is on it runs once and the case is a skip saying why."""

    def run(provider):
        try:
            step = provider.prepare()
        except Unavailable as why:
            pytest.skip(f"{provider.name}: {str(why).splitlines()[0]}")
        except NotImplementedError as why:  # our backend refused: a skip only for a missing environment
            if not backends.missing_environment([str(why)]):
                raise
            pytest.skip(f"{provider.name}: {str(why).splitlines()[0]}")

        def synchronised():
            result = step()
            if ON_GPU:
                torch.cuda.synchronize()
            return result

        if benchmark.enabled:
            synchronised()  # compilation and autotuning stay out of the rounds
            if provider.untimed:  # it ran; only its time is left out
                pytest.skip(f"{provider.name}: ran once, not timed: {provider.untimed}")
        # With --benchmark-disable, pedantic is one plain call: the step runs once, and its failure fails the case.
        benchmark.extra_info["provider"] = provider.name
        return benchmark.pedantic(synchronised, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    return run
