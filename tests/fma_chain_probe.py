"""Prints, as JSON, the float32 fused multiply-add chains of the Triton attention backward's kernels compiled for
sm_90 without a GPU: for the delta pass and the dq and dk/dv kernels (their fallback configs), with exact float32
dots at head dims E = 32 and Ev = 64, how many chains of each length start from 0.

A chain is a sequence of llvm.fmuladd calls in the kernel's LLVM IR, each adding into the one before. A dot of
exact float32 operands lowers to one such chain per output element, over k in order. Run by
tests/test_triton_compile.py in a subprocess, outside the Triton interpreter."""

import collections
import json
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))

from compile_triton import ATTENTION_KERNELS, attention_argument_types, compiled_kernel, jit_function  # noqa: E402

from tfm_kernels.triton import attention  # noqa: E402

E, EV = 32, 64
FMULADD = re.compile(r"(%\S+) = (?:tail )?call (?:\w+ )*float @llvm\.fmuladd\.f32\(float \S+, float \S+, "
                     r"float ([^)\s]+)\)")
ZERO = {"0.000000e+00", "0x0000000000000000"}  # LLVM's spellings of a float constant 0


def chains_from_zero(llir):
    """{chain length: how many chains of that length start from the constant 0}."""
    accumulator_of = dict(FMULADD.findall(llir))  # result -> the value it adds into
    extended = set(accumulator_of.values())
    lengths = collections.Counter()
    for end in accumulator_of.keys() - extended:
        length, value = 0, end
        while value in accumulator_of:
            length, value = length + 1, accumulator_of[value]
        if value in ZERO:
            lengths[length] += 1
    return dict(lengths)


def main():
    features = dict(HEAD_DIM=E, HEAD_DIM_V=EV, BLOCK_D=E, BLOCK_DV=EV, IS_CAUSAL=True, MASK_KIND=attention.MASK_NONE,
                    HAS_KEY_LENGTHS=False, HAS_DROPOUT=False, DOT_PRECISION="ieee")
    delta = attention._backward_delta_kernel
    delta_constexprs = dict(HEAD_DIM_V=EV, BLOCK_DV=EV, BLOCK_M=attention.DELTA_BLOCK_M, DOT_PRECISION="ieee")
    report = {"delta": chains_from_zero(compiled_kernel(
        delta, attention_argument_types(delta, "fp32", attention.MASK_NONE), delta_constexprs, (), 90, 4,
        1).asm["llir"])}
    for name in ("dq", "dk_dv"):
        tuned, descriptors = ATTENTION_KERNELS[name]
        fn = jit_function(tuned.kernel)
        config = tuned.fallback
        layouts = {flag: False for _, _, flag in descriptors.values()}  # descriptors over (B, H, N, D) memory
        kernel = compiled_kernel(fn, attention_argument_types(fn, "fp32", attention.MASK_NONE),
                                 {**features, **config.kwargs, **layouts}, (), 90, config.num_warps, config.num_stages)
        report[name] = chains_from_zero(kernel.asm["llir"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
