"""The one place that decides how Triton kernels run where no GPU is visible: on CPU tensors, under Triton's
interpreter. tests/conftest.py and benchmarks/conftest.py both call it, so `pytest tests` and `pytest benchmarks`
(each run alone) exercise the Triton kernels the same way."""

import os

import torch


def use_triton_interpreter_without_gpu() -> None:
    """Sets TRITON_INTERPRET=1 when CUDA is not available; on a GPU it changes nothing.

    Call it before any Triton kernel module is imported: triton.jit reads the variable when it decorates a
    kernel (importing tfm_kernels.bench imports no kernel module, so this module may be imported first). Forced,
    not defaulted: an inherited TRITON_INTERPRET=0 would turn every Triton test and benchmark case into a skip."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
