import os
import zlib

import pytest
import torch

from tfm_kernels.bench.interpreter import use_triton_interpreter_without_gpu

# Without a GPU the Triton kernels run on CPU tensors under the interpreter, set up before triton is imported,
# with dots summed as a GPU sums them, in one order whatever the block shapes (interpreter_dots.py).
use_triton_interpreter_without_gpu()
if os.environ.get("TRITON_INTERPRET") == "1":
    from interpreter_dots import model_gpu_dots

    model_gpu_dots()
# Autotuning would compile and time each kernel's whole config list for every test shape (thousands of
# compiles on a GPU); tests run the first config that fits, and test_tuning.py checks every config by name.
os.environ.setdefault("TFM_KERNELS_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    # The slow tests first: under pytest-xdist (-n) the others then fill the workers' time around them, rather
    # than a slow one left for last running alone.
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in benchmarks/device_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs in every test, reproducible from the test's name."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def tf32_by_new_api():
    """float32 matmuls on CUDA allowed to use TF32 through torch's fp32_precision API; the legacy flag
    (torch.backends.cuda.matmul.allow_tf32) then raises when read, until the setting is put back."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision = previous
