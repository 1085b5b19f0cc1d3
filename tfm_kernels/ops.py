"""Operator registration: loads the compiled extension `_C`, defines the Triton operators, and gives every
operator a fake (meta) kernel, autograd and a vmap rule (batching.py). The public functions in attention.py
and mlp.py call the forward ops through `DIFFERENTIABLE_FORWARD`; kernels themselves live in csrc/ and
tfm_kernels/triton/.

Every op keeps one autograd boundary: forward op -> (outputs, saved state), backward op -> gradients. The
gradients' own derivatives, where they are taken, come from the reference ops (tfm_kernels/reference.py).
"""

import contextlib
import functools
import glob
import importlib.machinery
import inspect
import os
import warnings
from typing import Callable, NamedTuple

import torch
from torch._C._functorch import TransformType, get_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch.autograd import forward_ad

from . import batching, flops, op_checks, reference
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
# Autograd, from one (setup_context, gradients) pair per forward op: registered on the op, and again as two
# autograd.Functions. One serves the torch.func transforms that differentiate (grad, vjp, jacrev, vmap over grad),
# which refuse the registered autograd: the Function torch generates for it has no separate setup_context. The other
# serves plain eager calls, where nothing would see the operator (no compiler, tracer, dispatch or function mode,
# tensor subclass or torch.func transform) and no tensor needs the dispatcher (see _plain_tensor): it runs the op's
# kernel (KERNELS) directly, as the backward does, without the dispatcher's and the registered autograd's Python
# around each op: an attention forward+backward on the Triton path took 481 host us with the ops and 397 without
# them, a forward without grad 118 and 93 (benchmarks/RESULTS.md, 2026-11-29). The public API calls the op through
# DIFFERENTIABLE_FORWARD, which picks one of the three. Under vmap alone the op runs itself, through its vmap rule
# (batching.py).

KERNELS = {}  # op name -> the op's kernel (CPU and CUDA alike): Triton launchers, C++ ops past their autograd
DIFFERENTIABLE_FORWARD = {}  # forward op name -> callable with the op's arguments and outputs

# Whether a torch.compile'd region under a torch.func transform may call the op (and its vmap rule). torch
# 2.14's dynamo traces grad, vjp and jacrev into the op's Autograd kernel, which records the call under the
# transform itself (_recorded_under_transforms). Before 2.14 (seen on 2.11) dynamo cannot trace the Function under
# vmap, and it traces the Function's backward without grad mode, so that an outer grad would take the inner
# gradients as constants (zeros). There the region breaks the graph, and dynamo runs the transform eagerly.
_COMPILED_TRANSFORMS_CALL_THE_OP = torch.torch_version.TorchVersion(torch.__version__) >= "2.14.0.dev0"


def _differentiating_transform_active() -> bool:
    """Whether a torch.func transform other than vmap (grad, vjp, jacrev) is active."""
    return torch._C._are_functorch_transforms_active() and any(
        level.key() != TransformType.Vmap for level in get_interpreter_stack())


def _takes_function() -> bool:
    """Whether a call now takes the Function rather than the op: under a torch.func transform other than vmap.
    Compiled under a transform before torch 2.14, it breaks dynamo's graph instead (dynamo then runs the
    transform eagerly, where this is asked again)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    if torch.compiler.is_compiling():
        if _COMPILED_TRANSFORMS_CALL_THE_OP:
            return False
        torch._dynamo.graph_break()
    return _differentiating_transform_active()


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _plain_tensor(t) -> bool:
    """Whether the kernels may read `t` as it is: not a subclass, nor a tensor whose dispatch keys make the
    dispatcher act first (a negative view, which it resolves; a ZeroTensor; autograd.grad's is_grads_batched
    batching)."""
    return type(t) in _PLAIN_TENSORS and not (t.is_neg() or t._is_zerotensor()
                                                or torch._C._functorch.is_legacy_batchedtensor(t))


def _plain_eager(args) -> bool:
    """Whether a call with these arguments may run an op's kernel without the op: plain eager execution, where
    no torch.compile or jit trace records the op, no dispatch or function mode (fake tensors, make_fx,
    FlopCounterMode, torch.device(...)) handles it, no torch.func transform wraps it, and every tensor is
    plain."""
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
            or torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()):
        return False
    return all(_plain_tensor(a) for a in args if isinstance(a, torch.Tensor))


def _records_graph(args) -> bool:
    """Whether autograd records a call with these arguments: grad mode on, outside inference mode (which drops
    the autograd keys, so that the op records nothing even under enable_grad), an input that requires grad."""
    return (torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            and any(a.requires_grad for a in args if isinstance(a, torch.Tensor)))


def _direct(name):
    """A callable with the arguments of op `name` that runs its kernel directly in plain eager execution, and
    the op otherwise."""
    op, kernel = getattr(torch.ops.tfm_kernels, name), KERNELS[name]

    def call(*args):
        return kernel(*args) if _plain_eager(args) else op(*args)

    return call


def _below_autograd(op):
    """The kernel of a C++ op, reached past its (registered, Python) autograd."""

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return call


@contextlib.contextmanager
def _saved_tensors_hooks_suspended():
    """The default saved-tensors hooks (torch.autograd.graph.save_on_cpu, saved_tensors_hooks) set aside for a
    torch.func transform, which refuses to run under them: the graphs recorded inside save plain tensors."""
    hooks = torch._C._autograd
    suspended = []
    while (top := hooks._top_saved_tensors_default_hooks(False)) is not None:
        suspended.append(top)
        hooks._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(suspended):
            hooks._push_saved_tensors_default_hooks(pack, unpack)


class RowBlocks(NamedTuple):
    """How an op's second derivatives recompute its gradients through the reference one block of query rows at a
    time, so that the reference holds one block's scores rather than all L x S (attention). inputs: positions
    of the backward's tensors that hold one row per query row (dim 2: query, mask, grad_out); outputs: the
    gradients (by forward input) that do (dq); rows(tensors): query rows per block."""

    inputs: tuple
    outputs: tuple
    rows: Callable


def _row_spans(row_blocks, tensors):
    """(first, last) query rows of each block, or [None]: no blocks (an op without RowBlocks, or one block
    holding every row)."""
    if row_blocks is None:
        return [None]
    length = tensors[row_blocks.inputs[0]].shape[2]
    rows = row_blocks.rows(tensors)
    if rows >= length:
        return [None]
    return [(first, min(first + rows, length)) for first in range(0, length, rows)]


def _upcast(t):
    """float16/bfloat16 -> float32, so that the blocks' parts of a gradient add up before it is rounded once."""
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


class _KernelGradients(torch.autograd.Function):
    """A forward op's gradients: kernel(*tensors), computed in forward by the kernels without a graph. Their
    own derivatives, taken only if they are differentiated in turn (a gradient penalty, a Hessian-vector
    product), are those of reference_gradients(*tensors), the same gradients from the reference ops
    (tfm_kernels.reference) recomputed with their graph, in float32, one block of query rows at a time where
    the op has row_blocks (reference_gradients(*block_tensors, first_row=first) then gives that block's part).
    Both return one gradient (or None) per forward input.

    tensors: what the backward reads (saved tensors, kept biases, incoming gradient); differentiable: the
    positions in it to differentiate by, where the tensor is not None (the others: outputs, masks, lengths,
    seeds)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kernel, reference_gradients, row_blocks, differentiable, *tensors):
        return kernel(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.reference_gradients, ctx.row_blocks, differentiable, *tensors = inputs
        ctx.differentiable = tuple(i for i in differentiable if tensors[i] is not None)
        ctx.computed = tuple(i for i, g in enumerate(output) if g is not None)
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx, *cotangents):
        tensors = ctx.saved_tensors
        sums, rows = {}, {}  # by position: a running sum, or each block's rows
        with _saved_tensors_hooks_suspended():  # one block's graph alive at a time
            for span in _row_spans(ctx.row_blocks, tensors):
                block = _block_second_derivatives(ctx, tensors, cotangents, span)
                for position, gradient in zip(ctx.differentiable, block):
                    if span is not None and position in ctx.row_blocks.inputs:
                        rows.setdefault(position, []).append(gradient)
                    else:
                        sums[position] = sums[position] + gradient if position in sums else gradient
        by_position = [None] * len(tensors)
        for position in ctx.differentiable:
            total = torch.cat(rows[position], dim=2) if position in rows else sums[position]
            by_position[position] = total.to(tensors[position].dtype)
        return (None, None, None, None, *by_position)


def _block_second_derivatives(ctx, tensors, cotangents, span):
    """The second derivatives (by the differentiable tensors, float32 where they are 16-bit) that one block of
    query rows gives, span = (first, last), or all rows for span None: rows-sized for the row inputs."""

    def block(t, by_rows):
        return t[:, :, span[0]:span[1]] if span is not None and by_rows and t is not None else t

    blocks = ctx.row_blocks
    row_inputs, row_outputs = (blocks.inputs, blocks.outputs) if blocks is not None else ((), ())
    block_tensors = [block(t, i in row_inputs) for i, t in enumerate(tensors)]
    options = {} if span is None else {"first_row": span[0]}

    def computed_gradients(*primals):
        arguments = list(block_tensors)
        for position, primal in zip(ctx.differentiable, primals):
            arguments[position] = primal
        every = ctx.reference_gradients(*arguments, **options)
        return tuple(every[i] for i in ctx.computed)

    primals = [_upcast(block_tensors[i]) for i in ctx.differentiable]
    _, vjp = torch.func.vjp(computed_gradients, *primals)
    return vjp(tuple(_upcast(block(cotangents[i], i in row_outputs)) for i in ctx.computed))


def _is_legacy_batched(t) -> bool:
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(t)


def _twice_differentiable(gradients):
    """The autograd backward of a forward op from gradients(ctx, saved_tensors, *grads) = (kernel,
    reference_gradients, row_blocks, tensors, differentiable), as _KernelGradients takes them. Without a graph
    to record the kernels' gradients come directly; with one (create_graph, torch.func.grad) out of
    _KernelGradients; under autograd.grad's is_grads_batched, whose batching drops an autograd.Function's
    graph, from the reference ops (all rows at once: that graph stays for the second derivatives anyway)."""

    def backward(ctx, *grads):
        if all(g is None for g in grads):  # no output took part in what is differentiated
            return (None,) * len(ctx.needs_input_grad)
        kernel, reference_gradients, row_blocks, tensors, differentiable = gradients(ctx, ctx.saved_tensors,
                                                                                      *grads)
        if not torch.is_grad_enabled():
            return kernel(*tensors)
        if any(_is_legacy_batched(t) for t in tensors):
            return reference_gradients(*tensors)
        return _KernelGradients.apply(kernel, reference_gradients, row_blocks, differentiable, *tensors)

    return backward


def _reference_vjp(forward, primals, grad_out):
    """The gradients of forward(*primals) (one output) for the cotangent grad_out, each None where its primal
    is None; differentiable in turn."""
    present = [p for p in primals if p is not None]

    def of_present(*present):
        supplied = iter(present)
        return forward(*(None if p is None else next(supplied) for p in primals))

    with _saved_tensors_hooks_suspended():
        _, vjp = torch.func.vjp(of_present, *present)
        supplied = iter(vjp(grad_out))
    return tuple(None if p is None else next(supplied) for p in primals)


def _function(name, run, setup_context, backward, **attributes):
    """An autograd.Function whose forward is run(*args)."""

    def forward(*args):
        return run(*args)

    forward.__signature__ = inspect.signature(forward)  # apply() binds arguments to it at every call
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), **attributes})


_AUTOGRAD_KERNELS = torch.library.Library("tfm_kernels", "IMPL")  # every op's Autograd kernel


def _has_tangent(a) -> bool:
    return isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None


def _recorded_under_transforms(op, backward, setup_context):
    """apply(keyset, *args): the op's outputs recorded by autograd, for a call that reaches the op's Autograd
    kernel under a torch.func transform (a direct call, or a program recorded by torch.export or torch.jit.trace):
    functorch refuses the Function torch registers (no separate setup_context). There the transform's level
    already holds the call and the inputs wrap that level's tensors, which autograd records as it records torch's
    own ops; so this Function records them itself, as functorch's single-level Functions do."""

    def forward(*args_and_dispatch):
        *args, keyset, lower_grad_mode = args_and_dispatch
        # apply() runs forward without grad; the transforms below this level record as they were entered.
        with torch._C._AutoDispatchBelowAutograd(), torch.set_grad_enabled(lower_grad_mode):
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    def setup_context_of_args(ctx, inputs, output):
        if setup_context is not None:
            setup_context(ctx, inputs[:-2], output)

    def backward_of_args(ctx, *grads):
        needs_input_grad = ctx.needs_input_grad
        ctx.needs_input_grad = needs_input_grad[:-2]
        try:
            return (*backward(ctx, *grads), None, None)
        finally:
            ctx.needs_input_grad = needs_input_grad

    recorded = type(f"{op._opname}_under_transforms", (torch.autograd.function._SingleLevelFunction,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context_of_args),
        "backward": staticmethod(backward_of_args)})

    def apply(keyset, *args):
        interpreter = retrieve_current_functorch_interpreter()
        lower_grad_mode = (interpreter.prev_grad_mode() if interpreter.key() == TransformType.Grad
                           else torch.is_grad_enabled())
        with torch._functorch.utils.enable_single_level_autograd_function():
            return recorded.apply(*args, keyset, lower_grad_mode)

    return apply


def _register_autograd_kernel(name, backward, setup_context=None):
    """Registers op `name`'s Autograd kernel: torch's, as torch.library.register_autograd(backward, setup_context)
    makes it, except that it refuses an input with a forward-mode tangent, which torch's would run past and drop
    (a silent zero tangent), and that under a torch.func transform it records the call itself."""
    op = getattr(torch.ops.tfm_kernels, name).default
    info = torch._library.autograd.Info(backward, setup_context)
    autograd_kernel = torch._library.autograd.make_autograd_impl(op, info)
    under_transforms = _recorded_under_transforms(op, backward, setup_context)

    def kernel(keyset, *args):
        if forward_ad._current_level >= 0 and any(_has_tangent(a) for a in args):
            raise NotImplementedError(
                f"tfm_kernels::{name} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
                f"forward_ad); tfm_kernels.scaled_dot_product_attention, fused_linear, gated_linear and mlp take "
                f"their torch backend there")
        if _differentiating_transform_active():
            return under_transforms(keyset, *args)
        return autograd_kernel(keyset, *args)

    # A Triton op (torch.library.custom_op) has its own Autograd kernel, which this one replaces: torch before 2.14
    # refuses a second Python kernel for a key unless the first is forgotten, and warns of the C++ override.
    torch.library._impls.discard(f"tfm_kernels/{name}/Autograd")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning only once for all operators")
        _AUTOGRAD_KERNELS.impl(name, kernel, "Autograd", with_keyset=True)


def _register_first_derivative_op(name):
    """A backward op's Autograd kernel: differentiating its outputs raises (its inputs are not constants of
    the gradients it returns; second derivatives come from differentiating the forward op's gradients)."""

    def backward(ctx, *grads):
        raise RuntimeError(f"tfm_kernels::{name} has no derivative of its own; differentiate the gradients of "
                           f"its forward op (torch.autograd.grad(..., create_graph=True)) instead")

    _register_autograd_kernel(name, backward)


def _register_autograd(forward_name, backward_name, gradients, setup_context):
    backward = _twice_differentiable(gradients)
    _register_autograd_kernel(forward_name, backward, setup_context)
    _register_first_derivative_op(backward_name)
    flops.register(forward_name)
    flops.register(backward_name)
    forward_op = getattr(torch.ops.tfm_kernels, forward_name)
    transformed = _function(f"{forward_name}_function", forward_op, setup_context, backward, generate_vmap_rule=True)
    kernel = KERNELS[forward_name]
    eager = _function(f"{forward_name}_eager", kernel, setup_context, backward)

    def call(*args):
        if _takes_function():
            return transformed.apply(*args)
        if _plain_eager(args):
            return eager.apply(*args) if _records_graph(args) else kernel(*args)
        return forward_op(*args)

    DIFFERENTIABLE_FORWARD[forward_name] = call


def _checked(name, check, fn):
    """fn after check(name, *args) (op_checks), with fn's signature (an op's schema is inferred from it)."""

    @functools.wraps(fn)
    def call(*args):
        check(name, *args)
        return fn(*args)

    return call


def _triton_op(name, check):
    """Defines the Triton op tfm_kernels::`name` from its kernel, a function with annotated arguments. The op
    runs check first, as the C++ ops check their arguments; KERNELS[name], which the public functions reach with
    arguments they validated, runs the kernel alone."""

    def define(kernel):
        KERNELS[name] = kernel
        return torch.library.custom_op(f"tfm_kernels::{name}", mutates_args=())(_checked(name, check, kernel))

    return define


def _register_fake(name, check, fake):
    """Registers fake as op `name`'s fake kernel, after check: a traced call, or one sent to the fake kernel by a
    meta tensor, fails as the real kernel would."""
    torch.library.register_fake(f"tfm_kernels::{name}")(_checked(name, check, fake))


def _cpp_ops(*names):
    """Makes the kernels of the C++ ops `names` callable without the dispatcher's autograd."""
    for name in names:
        KERNELS[name] = _below_autograd(getattr(torch.ops.tfm_kernels, name))


# ---------------------------------------------------------------------------------------------------------
# Attention: tfm_kernels::attention_forward/backward (C++, CPU and CUDA) and
# tfm_kernels::triton_attention_forward/backward (Triton). Layout contract: csrc/ops.cpp.


def _check_triton_attention_forward(op, *args):
    op_checks.check_triton_head_dims(op, op_checks.check_attention_forward(op, *args))


def _check_triton_attention_backward(op, *args):
    op_checks.check_triton_head_dims(op, op_checks.check_attention_backward(op, *args))


@_triton_op("triton_attention_forward", _check_triton_attention_forward)
def triton_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                             key_lengths: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float,
                             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.attention import attention_forward

    return attention_forward(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed)


@_triton_op("triton_attention_backward", _check_triton_attention_backward)
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
    if mask is not None and mask.requires_grad:  # its gradient would silently stay None
        raise RuntimeError("mask requires grad, and the attention operators compute no gradient for it; "
                           "tfm_kernels.scaled_dot_product_attention computes it on its torch backend")
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient stays None instead of a zero-filled tensor
    ctx.save_for_backward(q, k, v, out, lse, mask, key_lengths, seed)
    ctx.attention_args = (dropout_p, is_causal, scale)


# Second derivatives of attention recompute its backward through the reference, whose graph holds about twenty
# float32 tensors of the scores' size: one block of query rows at a time, sized so that a block's scores hold
# at most REFERENCE_BLOCK_SCORES elements (64 MiB), but of at least REFERENCE_MIN_BLOCK_ROWS rows, below which
# adding up every block's dK and dV terms (each the size of K and V) would cost more than the block's products.
REFERENCE_BLOCK_SCORES = 1 << 24
REFERENCE_MIN_BLOCK_ROWS = 128


def _attention_block_rows(tensors):
    q, k = tensors[:2]  # (B, Hq, L, E), (B, Hk, S, E)
    B, H = q.shape[:2]
    return max(REFERENCE_MIN_BLOCK_ROWS, REFERENCE_BLOCK_SCORES // max(B * H * k.shape[2], 1))


ATTENTION_ROW_BLOCKS = RowBlocks(inputs=(0, 5, 8), outputs=(0,), rows=_attention_block_rows)  # q, mask, grad_out


def _make_attention_gradients(backward_op):
    """_twice_differentiable's gradients(ctx, saved_tensors, grad_out, grad_lse) of an attention forward op."""

    def gradients(ctx, saved_tensors, grad_out, _grad_lse):
        dropout_p, is_causal, scale = ctx.attention_args

        def kernel(q, k, v, out, lse, mask, key_lengths, seed, grad_out):
            dq, dk, dv = backward_op(last_dim_contiguous(grad_out), q, k, v, out, lse, mask, key_lengths, dropout_p,
                                     is_causal, scale, seed)
            return dq, dk, dv, None, None, None, None, None, None

        def reference_gradients(q, k, v, out, lse, mask, key_lengths, seed, grad_out, first_row=0):
            """q, mask and grad_out: query rows first_row .. (all of them, or one block)."""
            def forward(q, k, v):
                return reference.attention(q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed,
                                           upcast=True, query_offset=first_row)[0]

            return (*_reference_vjp(forward, (q, k, v), grad_out), None, None, None, None, None, None)

        tensors = (*saved_tensors, grad_out)
        return kernel, reference_gradients, ATTENTION_ROW_BLOCKS, tensors, (0, 1, 2, 8)  # q, k, v, grad_out

    return gradients


def _register_attention(forward_name, backward_name, max_batch=None):
    backward_op = _direct(backward_name)
    _register_fake(forward_name, op_checks.check_attention_forward, _attention_forward_fake)
    _register_fake(backward_name, op_checks.check_attention_backward, _attention_backward_fake)
    _register_autograd(forward_name, backward_name, _make_attention_gradients(backward_op),
                       _attention_setup_context)
    batching.register_attention(forward_name, backward_name, max_batch)


_register_attention("triton_attention_forward", "triton_attention_backward")
if _C is not None:
    _cpp_ops("attention_forward", "attention_backward")
    _register_attention("attention_forward", "attention_backward", max_batch=CUDA_MAX_GRID_YZ)


# ---------------------------------------------------------------------------------------------------------
# MLP: tfm_kernels::mlp_{linear,gated}_{forward,backward} (C++, CPU and CUDA) and
# tfm_kernels::triton_mlp_{linear,gated}_{forward,backward} (Triton). Layout contract: csrc/ops.cpp.


@_triton_op("triton_mlp_linear_forward", op_checks.check_mlp_linear_forward)
def triton_mlp_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              activation: str, dropout_p: float,
                              seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.mlp import linear_forward

    return linear_forward(x, weight, bias, activation, dropout_p, seed)


@_triton_op("triton_mlp_linear_backward", op_checks.check_mlp_linear_backward)
def triton_mlp_linear_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               preact: torch.Tensor, activation: str, dropout_p: float,
                               seed: torch.Tensor, needs_x: bool = True, needs_weight: bool = True,
                               needs_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.mlp import linear_backward

    return linear_backward(grad_out, x, weight, preact, activation, dropout_p, seed, needs_x, needs_weight,
                           needs_bias)


@_triton_op("triton_mlp_gated_forward", op_checks.check_mlp_gated_forward)
def triton_mlp_gated_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             activation: str, dropout_p: float,
                             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton.mlp import gated_forward

    return gated_forward(x, weight, bias, activation, dropout_p, seed)


@_triton_op("triton_mlp_gated_backward", op_checks.check_mlp_gated_backward)
def triton_mlp_gated_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                              gate_up: torch.Tensor, activation: str, dropout_p: float,
                              seed: torch.Tensor, needs_x: bool = True, needs_weight: bool = True,
                              needs_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton.mlp import gated_backward

    return gated_backward(grad_out, x, weight, gate_up, activation, dropout_p, seed, needs_x, needs_weight,
                          needs_bias)


def _mlp_linear_forward_fake(x, weight, bias, activation, dropout_p, seed):
    M, N = x.shape[0], weight.shape[0]
    preact = x.new_empty(M, N) if activation != "none" else x.new_empty(0)
    return x.new_empty(M, N), preact


def _mlp_gated_forward_fake(x, weight, bias, activation, dropout_p, seed):
    M, N2 = x.shape[0], weight.shape[0]
    return x.new_empty(M, N2 // 2), x.new_empty(M, N2)


def _needed(needs, shape, like):
    """An empty tensor of `shape` like `like` where the gradient is needed, else the (0,) a backward op returns."""
    return like.new_empty(shape if needs else (0,))


def _mlp_backward_fake(grad_out, x, weight, saved, activation, dropout_p, seed, needs_x=True, needs_weight=True,
                       needs_bias=True):
    return (_needed(needs_x, x.shape, x), _needed(needs_weight, weight.shape, weight),
            _needed(needs_bias, weight.shape[:1], weight))


def _mlp_setup_context(ctx, inputs, output):
    x, weight, bias, activation, dropout_p, seed = inputs
    _, saved = output  # the pre-activation (linear) or [gate, up] (gated)
    ctx.mark_non_differentiable(saved)
    ctx.set_materialize_grads(False)  # its gradient stays None instead of a zero-filled (M, N) tensor
    ctx.save_for_backward(x, weight, saved, seed)
    ctx.kept_bias = _kept_unsaved(bias)
    ctx.mlp_args = (activation, dropout_p)


def _kept_unsaved(bias):
    """A bias as the MLP ops keep it for their second derivatives, which alone read it: not saved, so that
    updating it in place before a first-order backward is no error (torch's linear never saves its bias), but
    with its version, to refuse second derivatives from a value the forward did not use (an inference tensor
    has no version)."""
    return bias, None if bias is None or bias.is_inference() else bias._version


def _check_unchanged(kept, name, forward_name):
    bias, version = kept
    if version is not None and bias._version != version:
        raise RuntimeError(f"{name} of tfm_kernels::{forward_name} (a bias given to fused_linear, gated_linear or "
                           f"mlp) was modified by an inplace operation after the forward; the second derivatives "
                           f"need the value the forward used")


def _reference_activation(activation):
    return None if activation == "none" else activation


def _make_mlp_gradients(forward_name, backward_name, gated):
    """_twice_differentiable's gradients(ctx, saved_tensors, grad_out, grad_saved) of tfm_kernels::`forward_name`,
    an MLP linear or gated op."""
    backward_op = _direct(backward_name)

    def gradients(ctx, saved_tensors, grad_out, _grad_saved):
        activation, dropout_p = ctx.mlp_args
        needs = ctx.needs_input_grad[:3]  # x, weight, bias: a frozen weight's GEMM is skipped
        kept_bias = ctx.kept_bias

        def kernel(x, weight, bias, saved, seed, grad_out):
            grads = backward_op(grad_out.contiguous(), x, weight, saved, activation, dropout_p, seed, *needs)
            return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)

        def reference_gradients(x, weight, bias, saved, seed, grad_out):
            _check_unchanged(kept_bias, "bias", forward_name)

            def forward(x, weight, bias):
                reference_forward = reference.gated_linear if gated else reference.linear
                return reference_forward(x, weight, bias, _reference_activation(activation), dropout_p, seed)

            return (*_reference_vjp(forward, (x, weight, bias), grad_out), None, None, None)

        x, weight, saved, seed = saved_tensors
        tensors = (x, weight, kept_bias[0], saved, seed, grad_out)
        return kernel, reference_gradients, None, tensors, (0, 1, 2, 5)  # x, weight, bias, grad_out

    return gradients


def _register_mlp(prefix):
    for kind, forward_fake in (("linear", _mlp_linear_forward_fake), ("gated", _mlp_gated_forward_fake)):
        forward_name, backward_name = f"{prefix}mlp_{kind}_forward", f"{prefix}mlp_{kind}_backward"
        _register_fake(forward_name, getattr(op_checks, f"check_mlp_{kind}_forward"), forward_fake)
        _register_fake(backward_name, getattr(op_checks, f"check_mlp_{kind}_backward"), _mlp_backward_fake)
        gradients = _make_mlp_gradients(forward_name, backward_name, gated=kind == "gated")
        _register_autograd(forward_name, backward_name, gradients, _mlp_setup_context)
        batching.register_mlp(forward_name, backward_name, weights=2)  # weight, bias


def _mlp_block_forward_fake(x, w1, b1, w2, b2, activation, dropout_p, seed):
    M, F = x.shape[0], w1.shape[0]
    preact = x.new_empty(M, F) if activation != "none" else x.new_empty(0)
    return x.new_empty(M, w2.shape[0]), preact, x.new_empty(M, F)


def _mlp_block_backward_fake(grad_out, x, w1, preact, hidden, w2, activation, dropout_p, seed, needs_x=True,
                             needs_w1=True, needs_b1=True, needs_w2=True, needs_b2=True):
    return (_needed(needs_x, x.shape, x), _needed(needs_w1, w1.shape, w1), _needed(needs_b1, w1.shape[:1], w1),
            _needed(needs_w2, w2.shape, w2), _needed(needs_b2, w2.shape[:1], w2))


def _mlp_block_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, dropout_p, seed = inputs
    _, preact, hidden = output
    ctx.mark_non_differentiable(preact, hidden)
    ctx.set_materialize_grads(False)  # their gradients stay None instead of zero-filled (M, F) tensors
    if activation == "relu":
        # relu' (0 where z <= 0, else 1, NaN included) reads the same from hidden = relu(z) times a dropout factor
        # >= 1, or 0 where dropped (whose gradient the backward's dropout factor zeroes anyway): hidden serves as
        # the pre-activation, so that the block saves one (M, F) tensor, as torch's relu saves its result only,
        # instead of two.
        preact = hidden
    ctx.save_for_backward(x, w1, preact, hidden, w2, seed)
    ctx.kept_biases = (_kept_unsaved(b1), _kept_unsaved(b2))
    ctx.mlp_args = (activation, dropout_p)


def _make_mlp_block_gradients(backward_op):
    """_twice_differentiable's gradients of tfm_kernels::mlp_block_forward."""

    def gradients(ctx, saved_tensors, grad_out, _grad_preact, _grad_hidden):
        activation, dropout_p = ctx.mlp_args
        needs = ctx.needs_input_grad
        kept_biases = ctx.kept_biases

        def kernel(x, w1, b1, preact, hidden, w2, b2, seed, grad_out):
            grads = backward_op(grad_out.contiguous(), x, w1, preact, hidden, w2, activation, dropout_p, seed,
                                *needs[:5])
            return (*(g if need else None for g, need in zip(grads, needs)), None, None, None)

        def reference_gradients(x, w1, b1, preact, hidden, w2, b2, seed, grad_out):
            _check_unchanged(kept_biases[0], "b1", "mlp_block_forward")
            _check_unchanged(kept_biases[1], "b2", "mlp_block_forward")

            def forward(x, w1, b1, w2, b2):
                activated = reference.linear(x, w1, b1, _reference_activation(activation), dropout_p, seed)  # (M, F)
                return reference.linear(activated, w2, b2)

            return (*_reference_vjp(forward, (x, w1, b1, w2, b2), grad_out), None, None, None)

        x, w1, preact, hidden, w2, seed = saved_tensors
        (b1, _), (b2, _) = kept_biases
        tensors = (x, w1, b1, preact, hidden, w2, b2, seed, grad_out)
        return kernel, reference_gradients, None, tensors, (0, 1, 2, 5, 6, 8)  # x, w1, b1, w2, b2, grad_out

    return gradients


_register_mlp("triton_")
if _C is not None:
    _cpp_ops(*(f"mlp_{kind}_{part}" for kind in ("linear", "gated", "block") for part in ("forward", "backward")))
    _register_mlp("")
    _register_fake("mlp_block_forward", op_checks.check_mlp_block_forward, _mlp_block_forward_fake)
    _register_fake("mlp_block_backward", op_checks.check_mlp_block_backward, _mlp_block_backward_fake)
    _register_autograd("mlp_block_forward", "mlp_block_backward",
                       _make_mlp_block_gradients(_direct("mlp_block_backward")), _mlp_block_setup_context)
    batching.register_mlp("mlp_block_forward", "mlp_block_backward", weights=4)  # w1, b1, w2, b2
