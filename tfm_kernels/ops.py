"""Operator registration: loads the compiled extension `_C`, defines the Triton operators, and gives every
operator a fake (meta) kernel, autograd and a vmap rule (batching.py). The public functions in attention.py
and mlp.py call the forward ops through `DIFFERENTIABLE_FORWARD`; kernels themselves live in csrc/ and
tfm_kernels/triton/.

Every op keeps one autograd boundary: forward op -> (outputs, saved state), backward op -> gradients.
"""

import glob
import importlib.machinery
import inspect
import os

import torch
from torch._C._functorch import TransformType, get_interpreter_stack

from . import batching
from .layout import empty_heads_inner, last_dim_contiguous


def extension_file_exists(package_dir) -> bool:
    """Whether `package_dir` holds a compiled _C extension file (for this Python)."""
    return any(glob.glob(os.path.join(package_dir, f"_C{suffix}")) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


try:
    from . import _C  # registers the C++ operators (TORCH_LIBRARY) and their CPU/CUDA kernels
except ImportError as error:  # a source checkout without a build: the Triton and torch backends still work
    _C = None
    # Built but not importable (an undefined symbol after a torch upgrade) is a fault, not a missing build;
    # without the file Python blames a circular import, so say what is missing instead.
    C_FILE_EXISTS = extension_file_exists(os.path.dirname(__file__))
    C_IMPORT_ERROR = str(error) if C_FILE_EXISTS else "no tfm_kernels/_C extension file; `pip install -e .` builds it"
else:
    C_FILE_EXISTS, C_IMPORT_ERROR = True, ""


# Read once at import: a call into the pybind11 module inside a torch.compile'd region would break the graph,
# and the backend checks run inside compiled regions.
_BUILD_INFO = {"built": False, "error": C_IMPORT_ERROR, "cuda": False} if _C is None else {"built": True,
                                                                                         **_C.build_info()}


def build_info() -> dict:
    """How the compiled extension was built (version, CUDA archs, head dims), or why it is missing."""
    return dict(_BUILD_INFO)


def has_compiled_cuda() -> bool:
    return bool(_BUILD_INFO["cuda"])


def compiled_cuda_archs() -> list[str]:
    """The archs the CUDA kernels were built for, e.g. ["80", "90a"]; empty without CUDA kernels."""
    return [a for a in _BUILD_INFO.get("cuda_archs", "").split(";") if a]


def compiled_head_dims() -> list[int]:
    """The head dims the CUDA attention kernels were built for; empty without CUDA kernels."""
    return [int(d) for d in _BUILD_INFO.get("head_dims", "").split(",") if d]


CUDA_MAX_GRID_YZ = 65535  # the CUDA attention kernels put heads on gridDim.y and batch on gridDim.z


def attention_shared_memory_bytes() -> dict[int, int]:
    """Per compiled head dim, the shared memory per block its CUDA attention kernels need (the most any of them
    asks for: csrc/cuda/attention/kernel_traits.h); empty without CUDA kernels."""
    entries = (entry.split(":") for entry in _BUILD_INFO.get("attention_shared_memory_bytes", "").split(",") if entry)
    return {int(head_dim): int(size) for head_dim, size in entries}


# ---------------------------------------------------------------------------------------------------------
# Autograd, from one (setup_context, backward) pair per forward op: registered on the op, and again as an
# autograd.Function for the torch.func transforms that differentiate (grad, vjp, jacrev, vmap over grad), which
# refuse the registered autograd: the Function torch generates for it has no separate setup_context. The public
# API calls the op through DIFFERENTIABLE_FORWARD, which takes the Function only under such a transform (it
# costs more to enter). Under vmap alone the op runs itself, through its vmap rule (batching.py).

DIFFERENTIABLE_FORWARD = {}  # forward op name -> callable with the op's arguments and outputs

# Whether a torch.compile'd region under a transform calls the op itself (and its vmap rule) rather than the
# Function. Dynamo cannot trace an autograd.Function under vmap. torch 2.14's dynamo hands the transforms it
# cannot trace with the op (grad, vjp, jacrev) back to eager, where the Function runs; before 2.14 (seen on 2.11)
# it traces grad into the op's registered autograd, which functorch refuses, so there the Function stays.
_COMPILED_TRANSFORMS_CALL_THE_OP = torch.torch_version.TorchVersion(torch.__version__) >= "2.14.0.dev0"


def _takes_function() -> bool:
    """Whether a call now takes the Function rather than the op: under a torch.func transform other than vmap."""
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():
        return not _COMPILED_TRANSFORMS_CALL_THE_OP
    return any(level.key() != TransformType.Vmap for level in get_interpreter_stack())


class _Undifferentiable(torch.autograd.Function):
    """Passes the first `count` tensors (gradients) through; differentiating them raises. The tensors after
    them, the backward's own inputs, take no part but make the outputs tracked exactly when one of them is."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, count, *tensors):
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _first_order(forward_name, backward):
    """`backward`, run without recording a graph: a transform records one (and the Triton backward ops, custom
    ops without autograd, cannot run under it). Where one is recorded, the gradients come out of a node that
    raises when they are differentiated in turn, instead of acting as constants."""
    message = (f"the backward of tfm_kernels::{forward_name} cannot be differentiated: its kernels give first "
               f"derivatives only (backend='torch' gives higher-order gradients)")

    def run(ctx, *grads):
        with torch.no_grad():
            gradients = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return gradients
        computed = [g for g in gradients if g is not None]
        marked = iter(_Undifferentiable.apply(message, len(computed), *computed, *ctx.saved_tensors, *grads))
        return tuple(None if g is None else next(marked) for g in gradients)

    return run


def _register_autograd(forward_name, backward, setup_context):
    torch.library.register_autograd(f"tfm_kernels::{forward_name}", backward, setup_context=setup_context)
    forward_op = getattr(torch.ops.tfm_kernels, forward_name)

    def forward(*args):
        return forward_op(*args)

    forward.__signature__ = inspect.signature(forward)  # apply() binds arguments to it at every call
    function = type(f"{forward_name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(_first_order(forward_name, backward)), "generate_vmap_rule": True})

    def call(*args):
        if _takes_function():
            return function.apply(*args)
        return forward_op(*args)

    DIFFERENTIABLE_FORWARD[forward_name] = call


# ---------------------------------------------------------------------------------------------------------
# Attention: tfm_kernels::attention_forward/backward (C++, CPU and CUDA) and
# tfm_kernels::triton_attention_forward/backward (Triton). Layout contract: csrc/ops.cpp.


@torch.library.custom_op("tfm_kernels::triton_attention_forward", mutates_args=())
def triton_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             key_lengths: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float,
                             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.attention import attention_forward

    return attention_forward(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed)


@torch.library.custom_op("tfm_kernels::triton_attention_backward", mutates_args=())
def triton_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                              key_lengths: torch.Tensor | None, dropout_p: float, is_causal: bool,
                              scale: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, mask, key_lengths, dropout_p, is_causal, scale, seed)


def _attention_forward_fake(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed):
    B, H, L, _ = q.shape
    out = empty_heads_inner(q, B, H, L, v.shape[-1])  # (B, H, L, Dv), stored (B, L, H, Dv)
    lse = q.new_empty(B, H, L, dtype=torch.float32)
    return out, lse


def _attention_backward_fake(grad_out, q, k, v, out, lse, mask, key_lengths, dropout_p, is_causal, scale, seed):
    def like(t):  # (B, H, N, D) logical, stored (B, N, H, D)
        return empty_heads_inner(t, *t.shape)

    return like(q), like(k), like(v)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient stays None instead of a zero-filled tensor
    ctx.save_for_backward(q, k, v, out, lse, mask, key_lengths, seed)
    ctx.attention_args = (dropout_p, is_causal, scale)


def _make_attention_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:  # the output took no part in what is differentiated
            return (None,) * 9
        q, k, v, out, lse, mask, key_lengths, seed = ctx.saved_tensors
        dropout_p, is_causal, scale = ctx.attention_args
        dq, dk, dv = backward_op(last_dim_contiguous(grad_out), q, k, v, out, lse, mask, key_lengths, dropout_p,
                                 is_causal, scale, seed)
        return dq, dk, dv, None, None, None, None, None, None

    return backward


def _register_attention(forward_name, backward_name, max_batch=None):
    backward_op = getattr(torch.ops.tfm_kernels, backward_name)
    torch.library.register_fake(f"tfm_kernels::{forward_name}")(_attention_forward_fake)
    torch.library.register_fake(f"tfm_kernels::{backward_name}")(_attention_backward_fake)
    _register_autograd(forward_name, _make_attention_backward(backward_op), _attention_setup_context)
    batching.register_attention(forward_name, backward_name, max_batch)


_register_attention("triton_attention_forward", "triton_attention_backward")
if _C is not None:
    _register_attention("attention_forward", "attention_backward", max_batch=CUDA_MAX_GRID_YZ)


# ---------------------------------------------------------------------------------------------------------
# MLP: tfm_kernels::mlp_{linear,gated}_{forward,backward} (C++, CPU and CUDA) and
# tfm_kernels::triton_mlp_{linear,gated}_{forward,backward} (Triton). Layout contract: csrc/ops.cpp.


@torch.library.custom_op("tfm_kernels::triton_mlp_linear_forward", mutates_args=())
def triton_mlp_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              activation: str, dropout_p: float,
                              seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.mlp import linear_forward

    return linear_forward(x, weight, bias, activation, dropout_p, seed)


@torch.library.custom_op("tfm_kernels::triton_mlp_linear_backward", mutates_args=())
def triton_mlp_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               preact: torch.Tensor, activation: str, dropout_p: float,
                               seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.mlp import linear_backward

    return linear_backward(grad_out, x, weight, preact, activation, dropout_p, seed)


@torch.library.custom_op("tfm_kernels::triton_mlp_gated_forward", mutates_args=())
def triton_mlp_gated_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             activation: str, dropout_p: float,
                             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.mlp import gated_forward

    return gated_forward(x, weight, bias, activation, dropout_p, seed)


@torch.library.custom_op("tfm_kernels::triton_mlp_gated_backward", mutates_args=())
def triton_mlp_gated_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              gate_up: torch.Tensor, activation: str, dropout_p: float,
                              seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.mlp import gated_backward

    return gated_backward(grad_out, x, weight, gate_up, activation, dropout_p, seed)


def _mlp_linear_forward_fake(x, weight, bias, activation, dropout_p, seed):
    M, N = x.shape[0], weight.shape[0]
    preact = x.new_empty(M, N) if activation != "none" else x.new_empty(0)
    return x.new_empty(M, N), preact


def _mlp_gated_forward_fake(x, weight, bias, activation, dropout_p, seed):
    M, N2 = x.shape[0], weight.shape[0]
    return x.new_empty(M, N2 // 2), x.new_empty(M, N2)


def _mlp_backward_fake(grad_out, x, weight, saved, activation, dropout_p, seed):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _mlp_setup_context(ctx, inputs, output):
    x, weight, bias, activation, dropout_p, seed = inputs
    _, saved = output  # the pre-activation (linear) or [gate, up] (gated)
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # its gradient stays None instead of a zero-filled (M, N) tensor
    ctx.save_for_backward(x, weight, saved, seed)
    ctx.mlp_args = (activation, dropout_p)


def _make_mlp_backward(backward_op):
    def backward(ctx, grad_out, _grad_saved):
        if grad_out is None:
            return (None,) * 6
        x, weight, saved, seed = ctx.saved_tensors
        activation, dropout_p = ctx.mlp_args
        grad_x, grad_weight, grad_bias = backward_op(grad_out.contiguous(), x, weight, saved, activation,
                                                     dropout_p, seed)
        return grad_x, grad_weight, grad_bias if ctx.needs_input_grad[2] else None, None, None, None

    return backward


def _register_mlp(prefix):
    for kind, forward_fake in (("linear", _mlp_linear_forward_fake), ("gated", _mlp_gated_forward_fake)):
        forward_name, backward_name = f"{prefix}mlp_{kind}_forward", f"{prefix}mlp_{kind}_backward"
        torch.library.register_fake(f"tfm_kernels::{forward_name}")(forward_fake)
        torch.library.register_fake(f"tfm_kernels::{backward_name}")(_mlp_backward_fake)
        _register_autograd(forward_name, _make_mlp_backward(getattr(torch.ops.tfm_kernels, backward_name)),
                           _mlp_setup_context)
        batching.register_mlp(forward_name, backward_name, weights=2)  # weight, bias


def _mlp_block_forward_fake(x, w1, b1, w2, b2, activation, dropout_p, seed):
    M, F = x.shape[0], w1.shape[0]
    preact = x.new_empty(M, F) if activation != "none" else x.new_empty(0)
    return x.new_empty(M, w2.shape[0]), preact, x.new_empty(M, F)


def _mlp_block_backward_fake(grad_out, x, w1, preact, hidden, w2, activation, dropout_p, seed):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w1.new_empty(w1.shape[0]), w2.new_empty(w2.shape),
            w2.new_empty(w2.shape[0]))


def _mlp_block_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, dropout_p, seed = inputs
    _, preact, hidden = output
    ctx.mark_non_differentiable(preact, hidden)
    ctx.set_materialize_grads(False)  # their gradients stay None instead of zero-filled (M, F) tensors
    ctx.save_for_backward(x, w1, preact, hidden, w2, seed)
    ctx.mlp_args = (activation, dropout_p)


def _mlp_block_backward(ctx, grad_out, _grad_preact, _grad_hidden):
    if grad_out is None:
        return (None,) * 8
    x, w1, preact, hidden, w2, seed = ctx.saved_tensors
    activation, dropout_p = ctx.mlp_args
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = torch.ops.tfm_kernels.mlp_block_backward(
        grad_out.contiguous(), x, w1, preact, hidden, w2, activation, dropout_p, seed)
    needs = ctx.needs_input_grad
    return (grad_x, grad_w1, grad_b1 if needs[2] else None, grad_w2, grad_b2 if needs[4] else None,
            None, None, None)


_register_mlp("triton_")
if _C is not None:
    _register_mlp("")
    torch.library.register_fake("tfm_kernels::mlp_block_forward")(_mlp_block_forward_fake)
    torch.library.register_fake("tfm_kernels::mlp_block_backward")(_mlp_block_backward_fake)
    _register_autograd("mlp_block_forward", _mlp_block_backward, _mlp_block_setup_context)
    batching.register_mlp("mlp_block_forward", "mlp_block_backward", weights=4)  # w1, b1, w2, b2
