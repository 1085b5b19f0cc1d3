"""Host time per call of the Triton paths, measured without a GPU.

A call's host time is what the CPU spends before its kernels are queued. It bounds the speed of every call
whose kernels are short: the benchmark's timer counts the time the GPU waits for a call's Python
(tfm_kernels/bench/timing.py), and so does a training step of small layers. This script measures our part of
it on any machine. Triton's kernel launches become no-ops (JITFunction.run; the autotuner's timings return
a constant), and the launchers run on CPU tensors as they would on a Hopper GPU: autotuned launch path,
tensor descriptors built. What remains is everything up to Triton's own launcher, whose cost (about 15-40 us
a launch on an H100 host, more with tensor descriptors) comes on top on a GPU. torch's modules run for real
on the same tiny CPU tensors as the reference: their host time plus a few microseconds of arithmetic.

    PYTHONPATH=. python benchmarks/host_overhead.py             # the table, microseconds per call
    PYTHONPATH=. python benchmarks/host_overhead.py --profile "ours MultiheadAttention fwd+bwd"

The numbers are for the CPU it runs on; compare rows of one run, not runs on different machines.
"""

import argparse
import contextlib
import cProfile
import functools
import pstats
import time
from unittest import mock

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

import tfm_kernels
from tfm_kernels import backends
from tfm_kernels.triton import attention, mlp, tuning

# Tiny bfloat16 problems (the benchmarks' dtype): torch's own kernels take microseconds, our stubbed ones none.
BATCH, HEADS, SEQ, HEAD_DIM = 2, 2, 16, 16
DTYPE = torch.bfloat16


@contextlib.contextmanager
def stubbed_launches():
    """Triton's launches as no-ops, and the launchers taking the GPU's path on CPU tensors: the autotuned
    launch of every size, tensor descriptors where a GPU of compute capability 9 would get them."""
    tuned = (attention._FORWARD, attention._BACKWARD_KV, attention._BACKWARD_Q, mlp._GEMM)
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        enter(mock.patch.object(JITFunction, "run", lambda self, *args, **kwargs: None))
        enter(mock.patch.object(JITFunction, "warmup", lambda self, *args, **kwargs: None))
        enter(mock.patch.object(Autotuner, "_bench", lambda self, *args, **kwargs: [1.0, 1.0, 1.0]))
        enter(mock.patch.object(backends, "_triton_reasons", lambda t: []))
        enter(mock.patch.object(tuning, "triton_interpreting", lambda: False))
        for module in (attention, mlp):
            enter(mock.patch.object(module, "tensor_descriptors_supported", lambda device: True))
        for kernel in tuned:  # every size autotuned; the stubs' choices forgotten on exit
            enter(mock.patch.object(kernel, "min_work", 0))
            enter(mock.patch.object(kernel, "_tuned", {}))
            enter(mock.patch.object(kernel, "_tuners", {}))
        yield


def per_call_us(fn, repeat):
    """Best of three runs of the mean host microseconds of `repeat` calls, after a warm-up."""
    for _ in range(max(repeat // 10, 1)):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat * 1e6)
    return best


def _no_grad(fn):
    def call():
        with torch.no_grad():
            fn()

    return call


def cases():
    """name -> a callable doing one call."""
    q, k, v = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, dtype=DTYPE) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def ours_sdpa():
        return tfm_kernels.scaled_dot_product_attention(*leaves, is_causal=True, backend="triton")

    def torch_sdpa():
        return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)

    embed = HEADS * HEAD_DIM
    x = torch.randn(BATCH, SEQ, embed, dtype=DTYPE)
    grad_x = torch.randn_like(x)
    weight = torch.randn(4 * embed, embed, dtype=DTYPE, requires_grad=True)
    bias = torch.randn(4 * embed, dtype=DTYPE, requires_grad=True)
    x_leaf = x.clone().requires_grad_()
    grad_hidden = torch.randn(BATCH, SEQ, 4 * embed, dtype=DTYPE)

    def ours_linear():
        return tfm_kernels.fused_linear(x_leaf, weight, bias, "gelu", backend="triton")

    def torch_linear():
        return torch.nn.functional.gelu(torch.nn.functional.linear(x_leaf, weight, bias))

    found = {}
    for who, sdpa, linear in (("ours", ours_sdpa, ours_linear), ("torch", torch_sdpa, torch_linear)):
        found[f"{who} scaled_dot_product_attention fwd"] = _no_grad(sdpa)
        found[f"{who} scaled_dot_product_attention fwd+bwd"] = (
            lambda sdpa=sdpa: torch.autograd.grad(sdpa(), leaves, grad))
        found[f"{who} fused_linear gelu fwd+bwd"] = (
            lambda linear=linear: torch.autograd.grad(linear(), (x_leaf, weight, bias), grad_hidden))
    mha_classes = {"ours": functools.partial(tfm_kernels.nn.MultiheadAttention, backend="triton"),
                   "torch": torch.nn.MultiheadAttention}
    for who, cls in mha_classes.items():
        evaluating = cls(embed, HEADS, batch_first=True, dtype=DTYPE).eval()
        found[f"{who} MultiheadAttention fwd (eval)"] = _no_grad(
            lambda m=evaluating: m(x, x, x, need_weights=False))
        training = cls(embed, HEADS, batch_first=True, dtype=DTYPE)
        params = list(training.parameters())
        found[f"{who} MultiheadAttention fwd+bwd"] = (
            lambda m=training, params=params: torch.autograd.grad(m(x, x, x, need_weights=False)[0], params,
                                                                  grad_x))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=300, help="calls per timing (default 300)")
    parser.add_argument("--profile", metavar="CASE", help="print cProfile's top functions for one case")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with stubbed_launches():
        found = cases()
        if args.profile:
            if args.profile not in found:
                parser.error(f"--profile must name one of {sorted(found)}; got {args.profile!r}")
            per_call_us(found[args.profile], args.repeat)
            profile = cProfile.Profile()
            profile.runcall(lambda: [found[args.profile]() for _ in range(args.repeat)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            return
        print(f"host us per call, {BATCH}x{HEADS}x{SEQ}x{HEAD_DIM} {str(DTYPE).removeprefix('torch.')}, "
              f"torch {torch.__version__}, 1 thread; ours: Triton launches stubbed")
        print("| case | us |\n|---|---:|")
        for name, fn in found.items():
            print(f"| {name} | {per_call_us(fn, args.repeat):.1f} |")


if __name__ == "__main__":
    main()
