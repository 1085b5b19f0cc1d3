"""What each backend supports, and the automatic choice between them.

`not_supported_reasons(...)` returns the reasons a backend cannot run some inputs (empty: it can). An explicit
`backend=` runs or raises with these reasons; `backend="auto"` takes the first supporting backend in the
preference order below.
"""

import importlib.metadata
import importlib.util
import os

import torch
from torch.autograd import forward_ad

from . import ops
from .op_checks import KERNEL_DTYPES, TRITON_MAX_HEAD_DIM

ATTENTION_BACKENDS = ("cuda", "triton", "cpu", "torch")
BACKEND_CHOICES = ("auto",) + ATTENTION_BACKENDS  # the MLP's are the same (MLP_BACKENDS)


def check_backend(backend):
    """ValueError unless `backend` is one of BACKEND_CHOICES: the modules check it when built or set, before a
    forward would."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}; got {backend!r}")
LOW_PRECISION = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)  # csrc/generate_kernels.py can build these

# Preference of backend="auto" per device type. CPU: the C++ kernel; torch's reference path is the last resort.
# The Triton interpreter on CPU is never chosen automatically. GPUs: our CUDA C++ kernels are FlashAttention-2
# class (mma.sync), our Triton kernels compile to Hopper's wgmma (benchmarks/compile_triton.py). On an H200
# (benchmarks/RESULTS.md, 2026-11-28; bf16, d64 and d128, s1024 and s4096, causal and full) our Triton kernels
# beat our CUDA kernels in 14 of the 16 forward and backward rows (d128 s4096 full: 459 / 340 against 216 / 147
# TFLOP/s); CUDA led only the d128 s1024 forwards. So Hopper and newer try Triton first. Ampere tries the
# CUDA kernels first, unmeasured: there mma.sync is what both compile to.
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
HOPPER_AUTO_ORDER = ("triton", "cuda", "torch")


def auto_order(device) -> tuple[str, ...]:
    """The backends backend="auto" tries for attention on `device`, in order."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return HOPPER_AUTO_ORDER
    return AUTO_ORDER.get(device.type, ("torch",))


# Read once at import: importlib's lookup cannot be traced by torch.compile.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _installed_version(package):
    """(major, minor) of an installed distribution, or None."""
    try:
        return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _interpreter_numpy_clash(triton_version, numpy_version) -> bool:
    """Whether Triton's CPU interpreter fails with this numpy: triton 3.6's turns one-element arrays into
    Python ints, which numpy 2.4 and newer refuse, so every kernel with a loop fails (triton 3.7 squeezes them
    first)."""
    return None not in (triton_version, numpy_version) and triton_version < (3, 7) and numpy_version >= (2, 4)


_TRITON_VERSION, _NUMPY_VERSION = _installed_version("triton"), _installed_version("numpy")


# Words of the reasons that name a missing environment (no build, no GPU, no triton, an older GPU, the CPU
# interpreter's limits), not a limit of the inputs: tests skip, and the self-check says "n/a", only on these.
MISSING_ENVIRONMENT = ("not built", "needs CUDA", "built without CUDA", "not installed", "CPU interpreter",
                       "compute capability", "this device allows")


def missing_environment(reasons) -> list[str]:
    """The reasons among `reasons` that name a missing environment (MISSING_ENVIRONMENT)."""
    return [r for r in reasons if any(marker in r for marker in MISSING_ENVIRONMENT)]


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET turns Triton's interpreter on, read with the values Triton takes as true."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def _triton_reasons(t) -> list[str]:
    """Why the Triton kernels cannot run on tensors of `t`'s device and dtype."""
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed")
    if t.device.type != "cuda" and not (t.device.type == "cpu" and triton_interpreting()):
        reasons.append(f"triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {t.device.type}")
    if t.device.type == "cpu" and _interpreter_numpy_clash(_TRITON_VERSION, _NUMPY_VERSION):
        triton_version, numpy_version = (".".join(map(str, v)) for v in (_TRITON_VERSION, _NUMPY_VERSION))
        reasons.append(f"triton {triton_version}'s CPU interpreter fails with numpy {numpy_version}; it needs "
                       f"numpy < 2.4 (or triton >= 3.7)")
    if t.dtype not in KERNEL_DTYPES:
        reasons.append(f"triton supports float16, bfloat16, float32; got {t.dtype}")
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        reasons.append("triton's CPU interpreter computes tl.dot wrongly in bfloat16")
    if t.device.type == "cuda" and torch.cuda.get_device_capability(t.device) < (8, 0):
        reasons.append(f"the triton kernels need compute capability >= 8.0; got "
                       f"{torch.cuda.get_device_capability(t.device)}")
    return reasons


def _extension_reasons(with_cuda=False) -> list[str]:
    """Why the compiled extension cannot serve a backend: missing, or (with_cuda) built without CUDA kernels."""
    if ops._C is None:
        state = "fails to import" if ops.C_FILE_EXISTS else "is not built"
        return [f"the compiled extension tfm_kernels._C {state} ({ops.C_IMPORT_ERROR})"]
    if with_cuda and not ops.has_compiled_cuda():
        return ["tfm_kernels._C was built without CUDA kernels"]
    return []


def _cpu_reasons(t) -> list[str]:
    """Why the C++ CPU kernels cannot run on tensors of `t`'s device and dtype."""
    reasons = _extension_reasons()
    if t.device.type != "cpu":
        reasons.append(f"the cpu backend needs CPU tensors; got {t.device.type}")
    if t.dtype not in KERNEL_DTYPES:
        reasons.append(f"the cpu backend supports float16, bfloat16, float32; got {t.dtype}")
    return reasons


def _runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("80", "90a", "100f") runs on a device of `capability`: same major and a
    minor at least as high, as also for family-specific ("f") builds; exactly that device for arch-specific
    ("a") builds. The build embeds no PTX."""
    digits = arch.rstrip("af")
    major, minor = int(digits[:-1]), int(digits[-1])
    if arch.endswith("a"):
        return capability == (major, minor)
    return capability[0] == major and capability[1] >= minor


def _cuda_arch_reasons(device) -> list[str]:
    """Why the extension's CUDA code cannot run on `device` (its archs; the build embeds no PTX)."""
    capability = torch.cuda.get_device_capability(device)
    archs = ops.compiled_cuda_archs()
    if any(_runs_on(a, capability) for a in archs):
        return []
    return [f"tfm_kernels._C has CUDA code for archs {archs}, none of which runs on compute capability {capability}"]


def _cuda_device_reasons(device, head_dim) -> list[str]:
    reasons = _cuda_arch_reasons(device)
    # sm_86/89 allow 101376 bytes per block, sm_80 166912, sm_90 232448
    needed = ops.attention_shared_memory_bytes().get(head_dim, 0)
    available = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", needed)
    if available < needed:
        reasons.append(f"the cuda backend needs {needed} bytes of shared memory per block at head dim "
                       f"{head_dim}; this device allows {available}")
    return reasons


def _cuda_reasons(q, k, v, mask) -> list[str]:
    reasons = _extension_reasons(with_cuda=True)
    if q.device.type != "cuda":
        reasons.append(f"the cuda backend needs CUDA tensors; got {q.device.type}")
    elif torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons.append(f"the cuda backend needs compute capability >= 8.0; got "
                       f"{torch.cuda.get_device_capability(q.device)}")
    elif ops.has_compiled_cuda():
        reasons += _cuda_device_reasons(q.device, q.shape[-1])
    if q.dtype not in LOW_PRECISION:
        reasons.append(f"the cuda backend supports float16 and bfloat16; got {q.dtype}")
    E, Ev = q.shape[-1], v.shape[-1]
    if E != Ev or E not in CUDA_HEAD_DIMS:
        reasons.append(f"the cuda backend supports head dims {CUDA_HEAD_DIMS} with Ev == E; got E={E}, "
                       f"Ev={Ev}")
    elif ops.has_compiled_cuda():
        head_dims = ops.compiled_head_dims()
        if E not in head_dims:  # a build choice, not a limit of the kernels
            wanted = ",".join(map(str, sorted(set(head_dims) | {E})))
            reasons.append(f"the cuda backend was not built for head dim {E} (built: {head_dims}; rebuild "
                           f"with TFM_KERNELS_HEAD_DIMS={wanted})")
    if mask is not None:
        reasons.append("the cuda backend takes no attn_mask (key_lengths and is_causal are supported)")
    if q.shape[0] > ops.CUDA_MAX_GRID_YZ or q.shape[1] > ops.CUDA_MAX_GRID_YZ:
        reasons.append(f"the cuda backend takes batch and heads up to {ops.CUDA_MAX_GRID_YZ} (grid limits); got "
                       f"batch {q.shape[0]}, heads {q.shape[1]}")
    return reasons


def _forward_mode_reasons() -> list[str]:
    if forward_ad._current_level < 0:
        return []
    return ["forward-mode AD is on (torch.func.jvp, jacfwd, hessian or a forward_ad.dual_level), and only the "
            "torch backend has forward-mode derivatives"]


def not_supported_reasons(backend, q, k, v, mask=None, key_lengths=None, dropout_p=0.0, is_causal=False) -> list[str]:
    """Why `backend` cannot run attention on these normalised inputs: q (B, Hq, L, E), k (B, Hk, S, E),
    v (B, Hk, S, Ev), mask (B, Hq, L, S) or None. An empty list means it can."""
    if backend == "torch":
        return []
    if backend == "triton":
        reasons = _triton_reasons(q)
        if max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
            reasons.append(f"triton supports head dims up to {TRITON_MAX_HEAD_DIM}; got E={q.shape[-1]}, "
                           f"Ev={v.shape[-1]}")
    elif backend == "cpu":
        reasons = _cpu_reasons(q)
    elif backend == "cuda":
        reasons = _cuda_reasons(q, k, v, mask)
    else:
        raise ValueError(f"backend must be one of {('auto',) + ATTENTION_BACKENDS}; got {backend!r}")
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        reasons.append("attn_mask requires grad, and only the torch backend computes the mask's gradient")
    return reasons + _forward_mode_reasons()


def choose(q, k, v, mask=None, key_lengths=None, dropout_p=0.0, is_causal=False) -> str:
    """The backend `backend="auto"` runs for these inputs."""
    for backend in auto_order(q.device):
        if not not_supported_reasons(backend, q, k, v, mask, key_lengths, dropout_p, is_causal):
            return backend
    return "torch"


# ---------------------------------------------------------------------------------------------------------
# MLP (tfm_kernels/mlp.py): the same backends and rules as attention.

MLP_BACKENDS = ("cuda", "triton", "cpu", "torch")
# GPUs: cuBLASLt (cuda) first, on every architecture, Triton next. On an H200 (benchmarks/RESULTS.md,
# 2026-11-28; 16384 x 4096 -> 16384 GELU, bf16) forward+backward ran 605 (cuda) against 590 (triton) TFLOP/s and
# the forward alone 590 against 627; eager torch ran 648 and 649 in that run (one shape, no dropout).
# CPU: the C++ operators run at 0.86-1.0x the torch path's speed without dropout and 1.1-1.6x with it, whose
# Philox mask the C++ loop draws vectorised (fused_linear GELU / gated_linear SiLU forward+backward, 512 tokens,
# d 256, float32, 2-core x86, p = 0.1: 6.9-7.6 / 8.6-10.0 ms against 9.0-12.3 / 9.6-13.1 ms;
# benchmarks/RESULTS.md, 2026-11-29), so "auto" runs them first.
MLP_AUTO_ORDER = {"cuda": AUTO_ORDER["cuda"], "cpu": ("cpu", "torch")}


def _mlp_cuda_reasons(x) -> list[str]:
    reasons = _extension_reasons(with_cuda=True)
    if x.device.type != "cuda":
        reasons.append(f"the cuda backend needs CUDA tensors; got {x.device.type}")
    elif ops.has_compiled_cuda():
        reasons += _cuda_arch_reasons(x.device)
    if x.dtype not in KERNEL_DTYPES:
        reasons.append(f"the cuda backend supports float16, bfloat16, float32; got {x.dtype}")
    return reasons


def mlp_not_supported_reasons(backend, x, weight) -> list[str]:
    """Why `backend` cannot run a fused linear / gated linear on validated x (M, K) and weight (N, K).
    An empty list means it can."""
    if backend == "torch":
        return []
    if backend == "triton":
        reasons = _triton_reasons(x)
    elif backend == "cpu":
        reasons = _cpu_reasons(x)
    elif backend == "cuda":
        reasons = _mlp_cuda_reasons(x)
    else:
        raise ValueError(f"backend must be one of {('auto',) + MLP_BACKENDS}; got {backend!r}")
    return reasons + _forward_mode_reasons()


def choose_mlp(x, weight) -> str:
    """The backend `backend="auto"` runs for a fused linear on these inputs."""
    for backend in MLP_AUTO_ORDER.get(x.device.type, ("torch",)):
        if not mlp_not_supported_reasons(backend, x, weight):
            return backend
    return "torch"
