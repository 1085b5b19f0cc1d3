"""Compiles the Triton attention and MLP kernels ahead of time for a GPU target, without a GPU.

For every config of the kernels' autotune lists (and the fallback), it runs Triton's compiler
(triton.compile on an ASTSource, target GPUTarget("cuda", arch, 32)) down to a cubin and prints, per
config: compile success or the error, registers and spilled bytes (ptxas's own report), the number of SASS
instructions in the cubin (nvdisasm's listing: a static count of code size, not of executed work), shared
memory against the target's per-block limit, the tensor-core instruction its dots became (wgmma on Hopper,
mma.sync otherwise) and whether it loads through TMA. It catches what TRITON_INTERPRET=1 cannot: GPU-only
type and tl.dot constraints, shared-memory overflow and register spills. Arguments mirror a launch's specialisation
(16-byte aligned pointers, strides multiples of 16 where the head dims are).

Each line also gives the launcher's shared-memory estimate of the config and whether the launcher would run
the config on that target (its estimate within the target's limit less the kernel's margin, TMA only on sm_90;
else the fallback). A config that would run but compiles to more shared memory than the target has is
marked "FAILS TO LAUNCH": on a GPU it would raise OutOfResources. `--admitted` compiles only the configs
that would run, for sweeps over dtypes, head dims and features. The exit status is 1 when a config that
would run fails to compile or to fit, else 0.

    python benchmarks/compile_triton.py --arch 90 --dtype bf16 --head-dim 128 --mask additive --causal
    python benchmarks/compile_triton.py --arch 80 --dtype fp16 --mlp --activation gelu --gated --dropout
    python benchmarks/compile_triton.py --arch 80 --dtype fp32 --head-dim 256 --admitted --kernel dq

Needs only triton (with its bundled ptxas); slow on a small CPU (seconds per config).
"""

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tfm_kernels.triton import attention, mlp
from tfm_kernels.triton.precision import dot_precision
from tfm_kernels.triton.tuning import config_label, descriptor

# Bytes per block, opt-in: H100 227 KiB, A100 163 KiB, sm_86 (RTX 30xx, A10, A40; sm_89's RTX 40xx, L4 and
# L40S have the same) 99 KiB.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912, 86: 101376}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MASK_KINDS = {"none": attention.MASK_NONE, "bool": attention.MASK_BOOL, "additive": attention.MASK_ADDITIVE}
ATTENTION_KERNELS = {"forward": (attention._FORWARD, attention.FORWARD_DESCRIPTORS),
                     "dk_dv": (attention._BACKWARD_KV, attention.BACKWARD_KV_DESCRIPTORS),
                     "dq": (attention._BACKWARD_Q, attention.BACKWARD_Q_DESCRIPTORS)}


def jit_function(kernel):
    """The JITFunction under autotune / heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def sass_instructions(cubin: bytes):
    """The number of instructions in a cubin's SASS listing (Triton's bundled nvdisasm), or None without it."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        listing = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+\S", listing, re.MULTILINE))  # "/*0a10*/  IMAD ..." lines


def compiled_kernel(fn, types, constexprs, aligned, arch, num_warps, num_stages, log=None):
    """fn compiled for `arch` with runtime argument types `types` (name -> Triton type), `constexprs`, and the
    arguments in `aligned` (and every pointer) 16-byte divisible; raises the compiler's error. `log`: a text
    stream for ptxas's -v report."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        signature[name] = "constexpr" if name in constexprs else types[name]
        if name in types and (types[name].startswith("*") or name in aligned):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    triton.knobs.nvidia.dump_ptxas_log = log is not None  # ptxas -v output, printed by Triton
    triton.knobs.compilation.always_compile = True  # a cached kernel would come without that output
    with contextlib.redirect_stdout(log or io.StringIO()):
        return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})


def _compile(fn, types, constexprs, aligned, arch, num_warps, num_stages):
    """Compiles fn (compiled_kernel); returns (shared bytes, registers, spill-store bytes, SASS instructions,
    tensor-core instruction) or raises the compiler's error."""
    log = io.StringIO()
    kernel = compiled_kernel(fn, types, constexprs, aligned, arch, num_warps, num_stages, log)
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
    ptx = kernel.asm["ptx"]
    tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    tensor_core += ", TMA loads" if "cp.async.bulk.tensor" in ptx else ""
    return (kernel.metadata.shared, int(registers.group(1)), int(spills.group(1)),
            sass_instructions(kernel.asm["cubin"]), tensor_core)


def _report(name, fn, types, constexprs, aligned, arch, config, estimate, runs):
    """Compiles one config of fn and prints a line: its registers, spills and shared memory against the
    launcher's `estimate` and the target's limit, or the error. `runs`: whether the launcher would run it.
    Returns whether it would fail on the GPU: it runs and does not compile or does not fit."""
    kw = config.kwargs
    label = config_label(config)
    launched = "runs" if runs else "pruned"
    try:
        shared, registers, spilled, instructions, tensor_core = _compile(
            fn, types, {**constexprs, **kw}, aligned, arch, config.num_warps, config.num_stages)
    except Exception as error:  # any compiler failure is the result being reported
        print(f"{name:8s} {label:18s} {launched:6s} FAILED {type(error).__name__}: "
              f"{str(error).splitlines()[-1][:200]}")
        return runs
    fits = "ok" if shared <= SHARED_MEMORY_LIMIT[arch] else "FAILS TO LAUNCH" if runs else "over limit"
    print(f"{name:8s} {label:18s} {launched:6s} registers {registers:3d}  spilled {spilled:6d} B  "
          f"SASS {instructions if instructions is not None else 'n/a':>5}  "
          f"shared {shared:7d} B, estimate {estimate:7d} B ({fits})  {tensor_core}")
    return runs and shared > SHARED_MEMORY_LIMIT[arch]


def _launched_configs(tuned, args, arch, descriptor_tensors):
    """The configs `tuned` would run on an `arch` GPU for launches with these named arguments (TunedKernel.fitting
    against that target's budget). `descriptor_tensors`: descriptor argument -> a tensor of the launch's dtype
    and row length, passed as a tensor descriptor on sm_90 wherever tuning.descriptor makes one of it, as the
    launchers do, and as the tensor itself elsewhere."""
    stand_ins = {}
    for name, tensor in descriptor_tensors.items():
        readable = descriptor(tensor, tensor.shape, tensor.stride()) if arch >= 90 else None
        stand_ins[name] = tensor if readable is None else readable
    return tuned.fitting({**args, **stand_ins}, SHARED_MEMORY_LIMIT[arch] - tuned.margin)


def attention_argument_types(fn, dtype, mask_kind):
    """The Triton types of an attention kernel's runtime arguments, its tensors of `dtype` ("bf16", ...).
    Descriptor arguments are unread placeholders of that element type, unless a TMA config makes them
    descriptors."""
    element = "*" + dtype
    pointer_types = {"Lse": "*fp32", "Delta": "*fp32", "KeyLengths": "*i64", "Seed": "*i64",
                     "Mask": "*u8" if mask_kind == attention.MASK_BOOL else element}
    types = {}
    for arg in fn.arg_names:
        if arg in ("scale", "scale_log2", "inv_keep"):
            types[arg] = "fp32"
        elif arg in pointer_types or arg in ("Q", "K", "V", "Out", "GradOut", "GradQ", "GradK", "GradV"):
            types[arg] = pointer_types.get(arg, element)
        elif arg.endswith("Desc"):
            types[arg] = element
        else:
            types[arg] = "i32"
    return types


def attention_kernels(args):
    """Reports every config of the three attention kernels; yields, per config, whether it would fail."""
    element = "*" + args.dtype
    E, Ev = args.head_dim, args.head_dim_v or args.head_dim
    mask_kind = MASK_KINDS[args.mask]
    aligned_strides = E % 16 == 0 and Ev % 16 == 0
    features = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, BLOCK_D=attention._head_block(E), BLOCK_DV=attention._head_block(Ev),
                    IS_CAUSAL=args.causal, MASK_KIND=mask_kind, HAS_KEY_LENGTHS=args.key_lengths,
                    HAS_DROPOUT=args.dropout, DOT_PRECISION=dot_precision(TORCH_DTYPES[args.dtype]))
    dtype = TORCH_DTYPES[args.dtype]
    estimate_args = {"Q": torch.empty(0, dtype=dtype), **features}
    row_lengths = {"BLOCK_D": E, "BLOCK_DV": Ev}  # a descriptor's columns -> the head dim its rows hold
    for name, (tiled, descriptors) in ATTENTION_KERNELS.items():
        if args.kernel and name not in args.kernel:
            continue
        fn = jit_function(tiled.kernel)
        types = attention_argument_types(fn, args.dtype, mask_kind)
        aligned = {a for a in types if aligned_strides and a.startswith("stride") and not a.startswith("stride_m")}
        launched = _launched_configs(tiled, estimate_args, args.arch,
                                     {desc: torch.empty(16, row_lengths[cols], dtype=dtype)
                                      for desc, (_, cols, _) in descriptors.items()})
        for config in [*tiled.configs, tiled.fallback]:
            if args.admitted and config not in launched:
                continue
            sizes = {**features, **config.kwargs}
            layouts = {}  # every descriptor over (B, H, N, D) memory, or (B, N, H, D) with --heads-inner
            for desc, (rows, cols, heads_inner) in descriptors.items():  # placeholders unless a TMA config
                block = (f"[1, {sizes[rows]}, 1, {sizes[cols]}]" if args.heads_inner
                         else f"[1, 1, {sizes[rows]}, {sizes[cols]}]")
                types[desc] = f"tensordesc<{args.dtype}{block}>" if config.kwargs["TMA"] else element
                layouts[heads_inner] = args.heads_inner
            yield _report(name, fn, types, {**features, **layouts}, aligned, args.arch, config,
                          tiled.shared_bytes(config, estimate_args), config in launched)


def mlp_kernel(args):
    """Reports every config of the MLP GEMM; yields, per config, whether it would fail."""
    fn = jit_function(mlp._gemm_kernel)
    element = "*" + args.dtype
    types = {a: element for a in ("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "preact_ptr")}
    types.update(seed_ptr="*i64", keep_scale="fp32")
    types.update({a: "i32" for a in fn.arg_names if a not in types and not a.endswith("_desc")})
    # The forward layout: x (M, K) row-major, weight^T (K, N) column-major (read as weight (N, K) through a
    # descriptor, B_T), both unit strides specialised.
    features = dict(stride_ak=1, stride_bk=1, HAS_BIAS=args.bias, ACTIVATION=mlp.ACTIVATION_CODES[args.activation],
                    STORE_PREACT=args.activation != "none" or args.gated, DROPOUT=args.dropout, GATED=args.gated,
                    INPUT_PRECISION=dot_precision(TORCH_DTYPES[args.dtype]), A_T=False, B_T=True)
    aligned = {"M", "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_pm", "gate_offset"}
    dtype = TORCH_DTYPES[args.dtype]
    estimate_args = {"a_ptr": torch.empty(0, dtype=dtype), **features}
    launched = _launched_configs(mlp._GEMM, estimate_args, args.arch,
                                 {name: torch.empty(16, 16, dtype=dtype) for name in ("a_desc", "b_desc")})
    fallback = [] if mlp._GEMM.fallback is None else [mlp._GEMM.fallback]
    for config in [*mlp._GEMM.configs, *fallback]:
        if args.admitted and config not in launched:
            continue
        kw = config.kwargs
        if kw["TMA"]:  # descriptors of the config's tiles: a (BLOCK_M, BLOCK_K), weight (BLOCK_N, BLOCK_K)
            descriptors = {"a_desc": f"tensordesc<{args.dtype}[{kw['BLOCK_M']}, {kw['BLOCK_K']}]>",
                           "b_desc": f"tensordesc<{args.dtype}[{kw['BLOCK_N']}, {kw['BLOCK_K']}]>"}
        else:  # unread placeholders: the tensors themselves
            descriptors = {"a_desc": element, "b_desc": element}
        yield _report("gemm", fn, {**types, **descriptors}, features, aligned, args.arch, config,
                      mlp._GEMM.shared_bytes(config, estimate_args), config in launched)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(SHARED_MEMORY_LIMIT), default=90)
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="bf16")
    parser.add_argument("--tf32", action="store_true", help="fp32 with TF32 dot products (torch allowing TF32)")
    parser.add_argument("--mlp", action="store_true", help="the MLP GEMM instead of the attention kernels")
    parser.add_argument("--kernel", action="append", choices=list(ATTENTION_KERNELS),
                        help="attention: only this kernel (repeatable; default: all three)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--head-dim-v", type=int, help="value head dim (default: --head-dim)")
    parser.add_argument("--mask", choices=sorted(MASK_KINDS), default="none")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--key-lengths", action="store_true")
    parser.add_argument("--dropout", action="store_true")
    parser.add_argument("--heads-inner", action="store_true",
                        help="attention TMA configs: descriptors over (B, N, H, D) memory (projection layout)")
    parser.add_argument("--activation", choices=sorted(mlp.ACTIVATION_CODES), default="none")
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--bias", action="store_true")
    parser.add_argument("--admitted", action="store_true",
                        help="compile only the configs the launcher would run on this target")
    args = parser.parse_args(argv)
    if args.tf32:  # the setting the launchers read (precision.dot_precision)
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    failures = sum((mlp_kernel if args.mlp else attention_kernels)(args))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
