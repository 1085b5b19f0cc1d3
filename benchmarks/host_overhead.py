"""Host time per call of the Triton paths, measured without a GPU.

A call's host time is what the CPU spends before its kernels are queued. It bounds the speed of every call
whose kernels are short: the benchmark's timer counts the time the GPU waits for a call's Python
(tfm_kernels/bench/timing.py), and so does a training step of small layers. This script measures it on any
machine, all but the last step of each launch. Launches run as on a Hopper GPU, a fingerprint's first through
Triton's launch path (binding and specialising the arguments, the cache lookup of the compiled kernel) and
later ones as replays (tfm_kernels/triton/replay.py), up to the compiled launcher's call, which does nothing:
a stand-in driver names an sm_90 target, and the compiled kernel is a stand-in whose launch returns at once
(the autotuner's timings return a constant). The launchers run on CPU tensors as they would on a Hopper GPU:
autotuned launch path, tensor descriptors built. Left out: the launch call itself (packing the
arguments, cuLaunchKernel), a few microseconds a launch. torch's modules run for real on the same tiny CPU
tensors as the reference: their host time plus a few microseconds of arithmetic.

    PYTHONPATH=. python benchmarks/host_overhead.py             # the table, microseconds per call
    PYTHONPATH=. python benchmarks/host_overhead.py --profile "ours MultiheadAttention fwd+bwd"
    PYTHONPATH=. python benchmarks/host_overhead.py --cpu-time --rounds 30 --case "ours fused_linear gelu fwd+bwd"

The numbers are for the CPU it runs on; compare rows of one run, not runs on different machines.
"""

import argparse
import contextlib
import cProfile
import functools
import itertools
import pstats
import time
from unittest import mock

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import tfm_kernels
from tfm_kernels import backends
from tfm_kernels.models.baseline import build_torch_lm
from tfm_kernels.models.config import LMConfig
from tfm_kernels.models.lm import TransformerLM
from tfm_kernels.triton import attention, mlp, tuning

# Tiny bfloat16 problems (the benchmarks' dtype): torch's own kernels take microseconds, our stubbed ones none.
BATCH, HEADS, SEQ, HEAD_DIM = 2, 2, 16, 16
DTYPE = torch.bfloat16
# The training step of a language model as deep as GPT-2 small, its layers tiny; a step takes as long as about
# 100 single-operator calls, so it is timed over 30 times fewer calls (10 a round at the default --repeat).
LM_LAYERS = 12
STEP_CALLS_SHARE = 1 / 30
# A decoding step's attention: one query against the first S positions of a key/value cache, S one longer at each
# call, cycling through this many lengths past SEQ.
DECODE_LENGTHS = 256


# The device number the stand-in driver answers: no real device has it, so the stand-in kernels Triton caches
# per device never serve a real launch, and the context below removes them on exit.
STAND_IN_DEVICE = -1


class _StandInDriver:
    """The driver calls of Triton's launch path, answered for a stand-in device that is an sm_90 GPU."""

    def get_current_device(self):
        return STAND_IN_DEVICE

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _StandInKernel:
    """A compiled kernel whose launch does nothing."""

    function = None
    packed_metadata = None

    def launch_metadata(self, *args):
        return None

    def run(self, *args):
        return None


def _stand_in_compiler(compiled):
    """JITFunction._do_compile without a compiler: caches a stand-in kernel under the launch's key and adds
    the JITFunction to `compiled`."""

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        # A real compile hashes the kernel's source and dependencies (cache_key), which records the globals it
        # reads; Triton compares those with their values at every launch, a cost this script is to include.
        _ = self.cache_key
        compiled.add(self)
        kernel_cache = self.device_caches[device][0]
        kernel_cache[key] = _StandInKernel()
        return kernel_cache[key]

    return do_compile


TUNED_KERNELS = (attention._FORWARD, attention._BACKWARD_KV, attention._BACKWARD_Q, mlp._GEMM)
# Every kernel's replayed launches (tfm_kernels/triton/replay.py).
REPLAY_CACHES = (*(kernel.replays for kernel in TUNED_KERNELS), attention._DELTA, mlp._GRAD_PREACT)


@contextlib.contextmanager
def stubbed_launches():
    """Triton's launch path up to the driver's launch call, which does nothing, and the launchers taking the
    GPU's path on CPU tensors: the autotuned launch of every size, tensor descriptors where a GPU of compute
    capability 9 would get them."""
    compiled = set()
    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        stack.callback(lambda: [fn.device_caches.pop(STAND_IN_DEVICE, None) for fn in compiled])
        enter(mock.patch.object(driver, "_active", _StandInDriver()))
        enter(mock.patch.object(JITFunction, "_do_compile", _stand_in_compiler(compiled)))
        enter(mock.patch.object(Autotuner, "_bench", lambda self, *args, **kwargs: [1.0, 1.0, 1.0]))
        enter(mock.patch.object(backends, "_triton_reasons", lambda t: []))
        # backend="auto" runs attention on Triton, as on a Hopper GPU; MLPs stay on the C++ operator, as the
        # cuda backend runs them there
        enter(mock.patch.dict(backends.AUTO_ORDER, {"cpu": backends.HOPPER_AUTO_ORDER}))
        enter(mock.patch.object(tuning, "triton_interpreting", lambda: False))
        for module in (attention, mlp):
            enter(mock.patch.object(module, "tensor_descriptors_supported", lambda device: True))
        for kernel in TUNED_KERNELS:  # every size autotuned; the stubs' choices forgotten on exit
            enter(mock.patch.object(kernel, "min_work", 0))
            enter(mock.patch.object(kernel, "_tuned", {}))
            enter(mock.patch.object(kernel, "_tuners", {}))
        for replays in REPLAY_CACHES:  # no stand-in kernel kept for replays
            enter(mock.patch.object(replays, "_entries", {}))
            enter(mock.patch.object(replays, "_families", {}))
        yield


def per_call_us(fn, repeat, rounds=3, clock=time.perf_counter):
    """Best of `rounds` runs of the mean host microseconds of `repeat` calls, after a warm-up, on `clock`."""
    repeat = max(round(repeat), 1)
    for _ in range(max(repeat // 10, 1)):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        for _ in range(repeat):
            fn()
        best = min(best, (clock() - start) / repeat * 1e6)
    return best


def _no_grad(fn):
    def call():
        with torch.no_grad():
            fn()

    return call


def cases():
    """name -> (a callable doing one call, the share of --repeat calls that time it)."""
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

    cache_k, cache_v = (torch.randn(BATCH, HEADS, SEQ + DECODE_LENGTHS, HEAD_DIM, dtype=DTYPE) for _ in range(2))
    step_q = torch.randn(BATCH, HEADS, 1, HEAD_DIM, dtype=DTYPE)
    lengths = itertools.cycle(range(SEQ + 1, SEQ + DECODE_LENGTHS + 1))

    def decode_step(attend):
        S = next(lengths)
        return attend(step_q, cache_k[:, :, :S], cache_v[:, :, :S])

    attend = {"ours": functools.partial(tfm_kernels.scaled_dot_product_attention, backend="triton"),
              "torch": torch.nn.functional.scaled_dot_product_attention}

    found = {}
    for who, sdpa, linear in (("ours", ours_sdpa, ours_linear), ("torch", torch_sdpa, torch_linear)):
        found[f"{who} scaled_dot_product_attention fwd"] = (_no_grad(sdpa), 1)
        found[f"{who} scaled_dot_product_attention decode step"] = (
            _no_grad(functools.partial(decode_step, attend[who])), 1)
        found[f"{who} scaled_dot_product_attention fwd+bwd"] = (
            lambda sdpa=sdpa: torch.autograd.grad(sdpa(), leaves, grad), 1)
        found[f"{who} fused_linear gelu fwd+bwd"] = (
            lambda linear=linear: torch.autograd.grad(linear(), (x_leaf, weight, bias), grad_hidden), 1)
    mha_classes = {"ours": functools.partial(tfm_kernels.nn.MultiheadAttention, backend="triton"),
                   "torch": torch.nn.MultiheadAttention}
    for who, cls in mha_classes.items():
        evaluating = cls(embed, HEADS, batch_first=True, dtype=DTYPE).eval()
        found[f"{who} MultiheadAttention fwd (eval)"] = (
            _no_grad(lambda m=evaluating: m(x, x, x, need_weights=False)), 1)
        training = cls(embed, HEADS, batch_first=True, dtype=DTYPE)
        params = list(training.parameters())
        found[f"{who} MultiheadAttention fwd+bwd"] = (
            lambda m=training, params=params: torch.autograd.grad(m(x, x, x, need_weights=False)[0], params,
                                                                  grad_x), 1)
    config = LMConfig.preset("tiny", d_model=embed, n_heads=HEADS, n_layers=LM_LAYERS, dropout=0.1)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))  # (B, T)

    def training_step(model):
        logits = model(tokens)  # (B, T, vocab)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

    for who, model in (("ours", TransformerLM(config)), ("torch", build_torch_lm(config))):
        found[f"{who} LM training step ({LM_LAYERS} layers)"] = (
            functools.partial(training_step, model.to(DTYPE)), STEP_CALLS_SHARE)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=300, help="calls per timing (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="timings of which the best is shown (default 3)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU time, not wall-clock time: steadier on a shared machine, "
                        "where other work delays a run")
    parser.add_argument("--case", action="append", metavar="CASE", help="time only this case (repeatable)")
    parser.add_argument("--profile", metavar="CASE", help="print cProfile's top functions for one case")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.rounds < 1:
        parser.error(f"--repeat and --rounds must be >= 1; got {args.repeat} and {args.rounds}")
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with stubbed_launches():
        found = cases()
        for option, names in (("--profile", [args.profile] if args.profile else []), ("--case", args.case or [])):
            unknown = [n for n in names if n not in found]
            if unknown:
                parser.error(f"{option} must name one of {sorted(found)}; got {unknown}")
        if args.profile:
            fn, share = found[args.profile]
            per_call_us(fn, args.repeat * share)
            profile = cProfile.Profile()
            profile.runcall(lambda: [fn() for _ in range(max(round(args.repeat * share), 1))])
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
            return
        print(f"host us per call, {BATCH}x{HEADS}x{SEQ}x{HEAD_DIM} {str(DTYPE).removeprefix('torch.')}, "
              f"torch {torch.__version__}, 1 thread, {'process CPU' if args.cpu_time else 'wall-clock'} time, best of "
              f"{args.rounds} rounds; ours: Triton's launch path up to a stand-in driver")
        print("| case | us |\n|---|---:|")
        for name, (fn, share) in found.items():
            if not args.case or name in args.case:
                print(f"| {name} | {per_call_us(fn, args.repeat * share, args.rounds, clock):.1f} |")


if __name__ == "__main__":
    main()
