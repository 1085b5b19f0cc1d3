"""One intra-op thread for tests of tiny models: on the 2 shared CI cores, oversubscribed OpenMP makes a
64-wide model's matmuls ~40x slower than a single thread does."""

import pytest
import torch


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
