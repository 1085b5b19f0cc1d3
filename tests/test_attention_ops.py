"""Attention operators beyond the oracle matrix of test_attention.py: dropout (reproducible under
torch.manual_seed, keep rate 1 - p, the kernel's keep-mask equal to tfm_kernels.rng bit for bit, output and
gradients equal to the reference under that keep-mask), torch.library.opcheck, torch.compile, bad input.

The dropout seed of a call: scaled_dot_product_attention draws exactly one value from torch's generator,
rng.draw_seed(device). `drawn_seed(s, device)` re-seeds torch with the `s` set before the call and draws it
again, so a test knows the seed and, with rng.dropout_keep_mask, the keep-mask every backend applies."""

import contextlib
import functools
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from autograd_probe import (
    LOSSES,
    DispatchedOps,
    DropGradient,
    assert_refuses_derivatives_it_lacks,
    assert_unchanged_by_saved_tensors_hooks,
    gradient_penalty_derivatives,
    operator_node,
)
from test_attention import check_against_oracle, masks, plain_torch, rand, require, sdpa
from tolerance import assert_within_tolerance
from torch.func import grad

import tfm_kernels
from tfm_kernels import backends, ops, reference, rng

CPU_BACKENDS = ["triton", "cpu"]
GPU_BACKENDS = ["triton", "cuda"]
OPS = {
    "triton": ("triton_attention_forward", "triton_attention_backward"),
    "cpu": ("attention_forward", "attention_backward"),
    "cuda": ("attention_forward", "attention_backward"),
}


def drawn_seed(torch_seed, device):
    """The dropout seed that a call made right after torch.manual_seed(torch_seed) draws."""
    torch.manual_seed(torch_seed)
    return rng.draw_seed(device)


def forward_backward(backend, q, k, v, grad_out, torch_seed, **kwargs):
    """(out, dq, dk, dv) of one call made right after torch.manual_seed(torch_seed)."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(torch_seed)
    out = sdpa(backend, *inputs, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out))


def qkv(B, Hq, Hk, L, S, E, Ev, dtype=torch.float32, device="cpu"):
    return (
        rand(B, Hq, L, E, dtype=dtype, device=device),
        rand(B, Hk, S, E, dtype=dtype, device=device),
        rand(B, Hk, S, Ev, dtype=dtype, device=device),
    )


# ---------------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_same_seed_same_result(backend):
    q, k, v = qkv(2, 4, 2, 19, 23, 16, 16)
    require(backend, q, k, v)
    grad_out = rand(2, 4, 19, 16)
    kwargs = dict(dropout_p=0.3, is_causal=True, enable_gqa=True)
    first = forward_backward(backend, q, k, v, grad_out, 7, **kwargs)
    again = forward_backward(backend, q, k, v, grad_out, 7, **kwargs)
    other = forward_backward(backend, q, k, v, grad_out, 8, **kwargs)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), first, again, other):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"
        assert not torch.equal(a, c), f"{name} is the same for two different seeds"


def kernel_keep_mask(backend, B, Hq, Hk, L, S, p, torch_seed, dtype=torch.float32, device="cpu"):
    """The keep-mask (B, Hq, L, S) a backend applies, read off its output: with k = 0 every score is 0, so
    each row attends uniformly, and with v the identity (S x S), out[..., i, j] = keep[i, j] keep_scale / S."""
    q = rand(B, Hq, L, S, dtype=dtype, device=device)
    k = torch.zeros(B, Hk, S, S, dtype=dtype, device=device)
    v = torch.eye(S, dtype=dtype, device=device).expand(B, Hk, S, S)  # (B, Hk, S, Ev = S), zero batch strides
    require(backend, q, k, v)
    torch.manual_seed(torch_seed)
    out = sdpa(backend, q, k, v, dropout_p=p, enable_gqa=Hq != Hk)
    kept_value = rng.dropout_keep_scale(p) / S
    assert torch.all((out == 0) | ((out.double() - kept_value).abs() <= 1e-2 * kept_value)), (
        "out is not 0 or keep_scale / S"
    )
    return out != 0


def assert_keep_mask_matches_rng(backend, B, Hq, Hk, L, S, p, dtype=torch.float32, device="cpu"):
    keep = kernel_keep_mask(backend, B, Hq, Hk, L, S, p, 1234, dtype, device)
    expected = rng.dropout_keep_mask(drawn_seed(1234, device), B * Hq, L, S, p, device=device).view(
        B, Hq, L, S
    )
    assert torch.equal(keep, expected), (
        f"{(keep != expected).sum().item()} keep-mask bits differ from tfm_kernels.rng"
    )
    # Binomial keep count: 5 standard deviations from n(1 - p) fails by chance with probability < 1e-6.
    n = keep.numel()
    bound = 5 * (p * (1 - p) / n) ** 0.5
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) <= bound, f"keep rate {rate:.4f}, expected {1 - p} +- {bound:.4f}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_mask_is_rng_mask_and_rate(backend, p):
    assert_keep_mask_matches_rng(backend, 2, 4, 2, 40, 64, p)


def check_dropout_against_reference(backend, q, k, v, p, **kwargs):
    """Output and gradients of a dropout call against the float64 oracle under the keep-mask of the seed the
    call drew (tolerance rule: torch in q's dtype, same keep-mask, is the baseline)."""
    require(backend, q, k, v)
    B, Hq, L = q.shape[:3]
    S = k.shape[2]
    grad_out = torch.randn(B, Hq, L, v.shape[-1], dtype=q.dtype, device=q.device)
    result = forward_backward(
        backend, q, k, v, grad_out, 99, dropout_p=p, enable_gqa=Hq != k.shape[1], **kwargs
    )
    keep = rng.dropout_keep_mask(drawn_seed(99, q.device), B * Hq, L, S, p, device=q.device).view(B, Hq, L, S)

    def run_reference(dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        extra = {
            n: (a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
            for n, a in kwargs.items()
        }
        mask = extra.pop("attn_mask", None)
        out, _ = reference.attention(*inputs, mask, dropout_p=p, keep_mask=keep, **extra)
        return (out, *torch.autograd.grad(out, inputs, grad_out.to(dtype)))

    baseline, oracle = run_reference(q.dtype), run_reference(torch.float64)
    for name, r, b, o in zip(("out", "dq", "dk", "dv"), result, baseline, oracle):
        assert_within_tolerance(f"{backend} dropout {name}", r, b, o)


def dropout_cases(B, H, L, S):
    return {
        "plain": {},
        "causal": {"is_causal": True},
        "float_mask": {"attn_mask": torch.randn(B, 1, L, S)},
        "bool_mask_key_lengths": {
            "attn_mask": torch.rand(L, S) > 0.3,
            "key_lengths": torch.tensor([S, S // 2]),
        },
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(dropout_cases(2, 1, 2, 2)))
def test_dropout_matches_reference_under_keep_mask(backend, dtype, case):
    B, Hq, Hk, L, S, E, Ev = 2, 4, 2, 21, 37, 24, 16
    q, k, v = qkv(B, Hq, Hk, L, S, E, Ev, dtype)
    kwargs = dropout_cases(B, Hq, L, S)[case]
    if "attn_mask" in kwargs and kwargs["attn_mask"].is_floating_point():
        kwargs["attn_mask"] = kwargs["attn_mask"].to(dtype)
    check_dropout_against_reference(backend, q, k, v, 0.25, **kwargs)


@pytest.mark.parametrize("split", [False, True], ids=["group_per_program", "head_per_program"])
def test_triton_grouped_query_dkdv_split(monkeypatch, split):
    """Triton's dK/dV programs loop over a kv head's query group, or, where that leaves multiprocessors idle,
    take one query head each and sum the partial gradients: both against the oracle, dropout and mask on."""
    import tfm_kernels.triton.attention as triton_attention

    monkeypatch.setattr(triton_attention, "_multiprocessor_count", lambda device: 1 << 30 if split else 0)
    q, k, v = qkv(2, 6, 2, 13, 21, 16, 24)
    check_against_oracle("triton", q, k, v, attn_mask=torch.rand(13, 21) > 0.2, enable_gqa=True)
    check_dropout_against_reference("triton", q, k, v, 0.3, is_causal=True)


# ---------------------------------------------------------------------------------------------------------
# Operator registration: opcheck and torch.compile


def op_cases(B, H, L, S):
    return {
        "plain": {},
        "causal": {"is_causal": True},
        "bool_mask_broadcast": {"mask": (torch.rand(1, 1, L, S) > 0.4).expand(B, H, L, S)},
        "float_mask_dropout": {"mask": torch.randn(B, H, L, S), "dropout_p": 0.2},
        "key_lengths": {"key_lengths": torch.tensor([S, 2], dtype=torch.int32)},
    }


def op_samples(backend, case):
    """[(forward op, its arguments), (backward op, its arguments)] for an op_cases case; q, k, v require grad in
    the forward's."""
    B, Hq, Hk, L, S, E, Ev = 2, 2, 1, 5, 7, 8, 12
    q, k, v = qkv(B, Hq, Hk, L, S, E, Ev)
    require(backend, q, k, v)
    forward_op, backward_op = (getattr(torch.ops.tfm_kernels, name).default for name in OPS[backend])
    options = op_cases(B, Hq, L, S)[case]
    rest = (
        options.get("mask"),
        options.get("key_lengths"),
        options.get("dropout_p", 0.0),
        options.get("is_causal", False),
        E**-0.5,
        rng.draw_seed("cpu"),
    )
    out, lse = forward_op(q, k, v, *rest)
    backward_args = (torch.randn_like(out), q, k, v, out, lse, *rest)
    return [(forward_op, (*(t.clone().requires_grad_() for t in (q, k, v)), *rest)), (backward_op, backward_args)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(op_cases(2, 1, 1, 1)))
def test_opcheck(backend, case):
    for op, args in op_samples(backend, case):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_operators_refuse_the_derivatives_they_lack(backend):
    for op, args in op_samples(backend, "float_mask_dropout"):
        assert_refuses_derivatives_it_lacks(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_plain_eager_calls_run_the_kernels_past_the_operators(backend, dropout_p):
    """A plain eager call runs the kernels through an autograd.Function, past the operators' dispatch (ops.KERNELS);
    a call under a dispatch mode runs the operators and their registered autograd: the same outputs and
    gradients bit for bit, and no zero-filled gradient either way."""
    forward_name, backward_name = OPS[backend]
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 2, 9, 11, 8, 8))
    require(backend, q, k, v)
    grad_out = torch.randn(2, 2, 9, 8)

    def run():
        torch.manual_seed(7)
        out = sdpa(backend, q, k, v, dropout_p=dropout_p, is_causal=True)
        return out, torch.autograd.grad(out, (q, k, v), grad_out)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        plain, plain_grads = run()
    assert operator_node(plain) == f"{forward_name}_eagerBackward"
    assert "aten::zeros" not in {event.name for event in profile.events()}
    with DispatchedOps() as dispatched:
        through_operators, operator_grads = run()
    assert dispatched.counts[f"tfm_kernels.{forward_name}"] == dispatched.counts[f"tfm_kernels.{backward_name}"] == 1
    assert "aten.zeros" not in dispatched.counts
    assert operator_node(through_operators) == f"GeneratedBackwardFor_tfm_kernels_{forward_name}_defaultBackward"
    assert all(torch.equal(a, b) for a, b in zip((plain, *plain_grads), (through_operators, *operator_grads)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensors_the_dispatcher_acts_on_take_the_operators(backend):
    """Tensors that look plain but that the dispatcher acts on first: a negative view (which it resolves), a
    ZeroTensor gradient, and autograd.grad's is_grads_batched batching (without create_graph). Each gives what the
    same values as ordinary tensors give."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 2, 9, 11, 8, 8))
    require(backend, q, k, v)
    negated = torch._neg_view(q.detach().neg())  # q's values behind the negative bit
    assert negated.is_neg()
    assert torch.equal(sdpa(backend, negated, k, v), sdpa(backend, q, k, v))
    out = sdpa(backend, q, k, v)
    zero_grads = torch.autograd.grad(out, (q, k, v), torch._efficientzerotensor(out.shape), retain_graph=True)
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(zero_grads, (q, k, v)))
    probes = torch.randn(3, *out.shape)
    batched = torch.autograd.grad(out, (q, k, v), probes, is_grads_batched=True, retain_graph=True)
    for i, probe in enumerate(probes):
        one = torch.autograd.grad(out, (q, k, v), probe, retain_graph=True)
        assert all(torch.equal(b[i], g) for b, g in zip(batched, one))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_enable_grad_inside_inference_mode_records_nothing(backend):
    """As torch's operators: inference mode drops autograd, whatever grad mode says."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 2, 9, 11, 8, 8))
    require(backend, q, k, v)
    with torch.inference_mode(), torch.enable_grad():
        out = sdpa(backend, q, k, v)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_gets_no_filled_gradients(backend):
    """The log-sum-exp output never has a gradient: autograd would fill a zero tensor for it at every backward
    unless the operator says not to. And where a later function drops the output's gradient, the backward gets
    None and returns none."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 5, 7, 8, 8))
    require(backend, q, k, v)
    with DispatchedOps() as dispatched:
        out = sdpa(backend, q, k, v, dropout_p=0.2)
        torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dispatched.counts["aten.zeros"] == 0, dispatched.counts
    out = sdpa(backend, q, k, v)
    grads = torch.autograd.grad(DropGradient.apply(out).sum() + q.sum(), (q, k, v), allow_unused=True)
    assert torch.equal(grads[0], torch.ones_like(q)) and grads[1] is None and grads[2] is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_modified_in_place_as_torch(backend):
    """out += residual in grad mode works, as with torch's SDPA: the output is not a view made inside the
    operator. Its backward, which reads the saved output, then raises autograd's version error, as torch's
    flash kernel's does; torch's own SDPA is the reference for both."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 2, 5, 7, 8, 8))
    require(backend, q, k, v)
    residual = rand(2, 2, 5, 8)
    outputs = []
    for attend in (lambda: sdpa(backend, q, k, v), lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)):
        out = attend()
        out += residual
        outputs.append(out)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
    torch.testing.assert_close(*outputs)


SECOND_ORDER_FEATURES = {
    "plain": lambda B, H, L, S: {},
    "causal_gqa": lambda B, H, L, S: {"is_causal": True, "enable_gqa": True},
    "bool_mask_empty_rows": lambda B, H, L, S: {"attn_mask": masks(B, H, L, S, torch.float32)["bool_empty_rows"]},
    "float_mask": lambda B, H, L, S: {"attn_mask": masks(B, H, L, S, torch.float32)["float_with_neg_inf"]},
    "key_lengths": lambda B, H, L, S: {"key_lengths": torch.tensor([3] + [S] * (B - 1))},
    "dropout": lambda B, H, L, S: {"dropout_p": 0.3, "scale": 0.2},
}


def check_second_derivatives(backend, feature, loss, dtype=torch.float32, device="cpu", sizes=(2, 4, 7, 9),
                             head_dims=(8, 6)):
    """A gradient penalty: the gradients of <dL/d(q, k, v), w> by q, k and v against the float64 oracle
    (tolerance rule). The kernels give the first derivatives; differentiating those recomputes the reference's
    backward. loss: of the output; with a plain sum the output's gradient is a constant, so that only the saved
    inputs tie the gradient to the graph."""
    B, Hq, L, S = sizes
    Hk = Hq // 2 if feature == "causal_gqa" else Hq
    q, k, v = qkv(B, Hq, Hk, L, S, *head_dims, device=device)
    require(backend, q, k, v)
    kwargs = SECOND_ORDER_FEATURES[feature](B, Hq, L, S)
    weights = [rand(*t.shape, device=device) for t in (q, k, v)]
    torch_seed = int(torch.randint(0, 2**31, ()))

    def run(attend, run_dtype):
        inputs = [t.detach().to(run_dtype).requires_grad_() for t in (q, k, v)]
        extra = {n: (a.to(device, run_dtype if a.is_floating_point() else a.dtype) if isinstance(a, torch.Tensor)
                     else a) for n, a in kwargs.items()}
        torch.manual_seed(torch_seed)
        return gradient_penalty_derivatives(lambda *qkv: attend(*qkv, **extra), inputs,
                                            [w.to(run_dtype) for w in weights], loss)

    ours = run(functools.partial(sdpa, backend), dtype)
    baseline, oracle = run(plain_torch, dtype), run(plain_torch, torch.float64)
    names = ("dq", "dk", "dv", "d(penalty)/dq", "d(penalty)/dk", "d(penalty)/dv")
    for name, result, base, ref in zip(names, ours, baseline, oracle):
        assert_within_tolerance(f"{backend} {feature} {name}", result, base, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("feature", list(SECOND_ORDER_FEATURES))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_second_derivatives(backend, feature, loss):
    check_second_derivatives(backend, feature, LOSSES[loss])


@pytest.mark.parametrize("backend", [*CPU_BACKENDS, "torch"])
def test_grad_over_grad_within_tolerance(backend):
    """grad of a function of the first derivatives (here with a sin between), against float64 torch (tolerance
    rule). The second derivatives differentiate the reference's softmax; with the softmax composed of exp, sum
    and division (as before) they broke the rule in about 1 of 5 draws, at up to 8x torch's float32 error."""
    draws = 3 if backend == "triton" else 12  # the interpreter takes about 2 s a draw

    def grad_over_grad(attend, q):  # q (3, 1, 2, 5, 8): batch of 3, 1 head, 2 x 5 query rows
        return grad(lambda q: grad(lambda q: attend(q, 2 * q, q, is_causal=True).sin().sum())(q).square().sum())(q)

    for _ in range(draws):
        q = rand(3, 1, 2, 5, 8)
        require(backend, q, q, q)
        assert_within_tolerance(f"{backend} grad over grad", grad_over_grad(functools.partial(sdpa, backend), q),
                                grad_over_grad(F.scaled_dot_product_attention, q),
                                grad_over_grad(F.scaled_dot_product_attention, q.double()))


@contextlib.contextmanager
def reference_in_blocks(rows, B, H, S):
    """Second derivatives recompute the reference `rows` query rows at a time (as for long sequences, where a
    block's scores are bounded); yields the query rows of each reference call made meanwhile with a query
    offset (the oracles call the reference too, without one)."""
    seen = []

    def counted(q, *args, **kwargs):
        if "query_offset" in kwargs:
            seen.append(q.shape[2])
        return attention(q, *args, **kwargs)

    attention = reference.attention
    with mock.patch.object(ops, "REFERENCE_BLOCK_SCORES", rows * B * H * S), \
            mock.patch.object(ops, "REFERENCE_MIN_BLOCK_ROWS", 1), mock.patch.object(reference, "attention", counted):
        yield seen


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("feature", list(SECOND_ORDER_FEATURES))
def test_second_derivatives_by_blocks_of_query_rows(backend, feature):
    """Second derivatives whose reference takes 3 of the 7 query rows at a time (blocks of 3, 3 and 1 rows, each
    with its own causal rows, mask rows and dropout-mask rows) against the float64 oracle (tolerance rule); no
    reference call sees more than a block."""
    B, H, L, S = 2, 4, 7, 9
    with reference_in_blocks(3, B, H, S) as seen:
        check_second_derivatives(backend, feature, LOSSES["square"], sizes=(B, H, L, S))
    assert sorted(seen) == [1, 3, 3]


def test_bfloat16_second_derivatives_by_hundreds_of_blocks():
    """512 one-row blocks in bfloat16: their parts of each second derivative add up in float32 and are rounded
    once, within the tolerance rule (rounded block by block, the dK/dV terms of hundreds of blocks were not)."""
    B, H, L, S = 1, 2, 512, 64
    with reference_in_blocks(1, B, H, S) as seen:
        check_second_derivatives("cpu", "plain", LOSSES["square"], torch.bfloat16, sizes=(B, H, L, S),
                                 head_dims=(16, 16))
    assert len(seen) == L


def test_compiled_backward_keeps_the_sequence_length_dynamic():
    """Under torch.compile(dynamic=True) the first-order backward does not read the sequence length (the blocks of
    the second derivatives are formed only when those are taken): one graph serves every length."""
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []
    compiler = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: backward_graphs.append(gm) or gm)

    @torch.compile(backend=compiler, dynamic=True)
    def loss(q, k, v):
        return sdpa("cpu", q, k, v, is_causal=True).square().sum()

    for length in (16, 24, 40):
        q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, length, length, 8, 8))
        require("cpu", q, k, v)
        loss(q, k, v).backward()
    assert len(backward_graphs) == 1


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_derivatives_under_saved_tensors_hooks(backend):
    """Under default saved-tensors hooks, which the torch.func transforms of the second derivatives refuse and
    so set aside while they run: the same first and second derivatives as without hooks, bit for bit; the
    forward's tensors go through the hooks."""
    q, k, v = qkv(1, 4, 2, 5, 7, 8, 6)
    require(backend, q, k, v)
    weights = [rand(*t.shape) for t in (q, k, v)]

    def derivatives():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        attend = functools.partial(sdpa, backend, is_causal=True, enable_gqa=True)
        return gradient_penalty_derivatives(attend, inputs, weights, LOSSES["square"])

    assert_unchanged_by_saved_tensors_hooks(derivatives)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["batched_grads", "checkpointed"])
def test_second_derivatives_through_batched_grads_and_checkpointing(backend, case):
    """Second derivatives where autograd.grad's is_grads_batched runs the backward under its own batching, and
    through a non-reentrant checkpoint (which lets a backward unpack each saved tensor once), against the
    float64 oracle (tolerance rule). A gradient recorded under create_graph takes in-place updates."""
    q, k, v = qkv(1, 2, 2, 4, 5, 3, 3)
    require(backend, q, k, v)
    probes, weights = rand(3, 1, 2, 4, 3), [rand(*t.shape) for t in (q, k, v)]

    def run(attend, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        if case == "batched_grads":
            out = attend(*inputs)
            grads = torch.autograd.grad(out, inputs, probes.to(dtype), is_grads_batched=True, create_graph=True)
        else:
            out = torch.utils.checkpoint.checkpoint(attend, *inputs, use_reentrant=False)
            grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        grads[0].mul_(2)
        penalty = sum((g * w.to(dtype)).sum() for g, w in zip(grads, weights))
        return (*grads, *torch.autograd.grad(penalty, inputs))

    results = zip(run(functools.partial(sdpa, backend), torch.float32), run(plain_torch, torch.float32),
                  run(plain_torch, torch.float64))
    for name, (result, base, ref) in zip(("dq", "dk", "dv", "d2q", "d2k", "d2v"), results):
        assert_within_tolerance(f"{backend} {case} {name}", result, base, ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_first_derivatives_do_not_run_the_reference(backend):
    """The reference's backward runs only when a gradient is differentiated: not in a plain backward, nor under
    create_graph or torch.func.grad until then."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 5, 7, 8, 8))
    require(backend, q, k, v)
    with mock.patch.object(reference, "attention", wraps=reference.attention) as reference_attention:
        sdpa(backend, q, k, v).square().sum().backward()
        (grad_q,) = torch.autograd.grad(sdpa(backend, q, k, v).square().sum(), q, create_graph=True)
        torch.func.grad(lambda q: sdpa(backend, q, k, v).square().sum())(q)
        assert reference_attention.call_count == 0
        grad_q.square().sum().backward()
        assert reference_attention.call_count == 1


@pytest.mark.parametrize("sizes", [(0, 2, 2, 5, 7), (2, 0, 0, 5, 7), (2, 4, 2, 0, 7), (2, 4, 2, 5, 0)],
                         ids=["batch", "heads", "queries", "keys"])
def test_empty_inputs_keep_the_graph(sizes):
    """An empty batch, head count or sequence, which scaled_dot_product_attention answers before any kernel:
    output zeros of the right shape, and a backward through it gives q, k and v zero (or empty) gradients of
    their shapes, as torch's SDPA does."""
    B, Hq, Hk, L, S = sizes
    q, k, v = (t.requires_grad_() for t in qkv(B, Hq, Hk, L, S, 8, 6))
    out = sdpa("auto", q, k, v, enable_gqa=True)
    assert out.shape == (B, Hq, L, 6) and not out.any()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))


def assert_compiled_equals_eager(attend, compiled, q, k, v):
    """Output and gradients of `compiled` equal those of `attend` exactly (same kernels, same seed)."""
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    results = []
    for fn in (attend, compiled):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(5)
        out = fn(*inputs)
        results.append((out.detach(), *torch.autograd.grad(out, inputs, grad_out)))
    for name, eager, comp in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(comp, eager, rtol=0, atol=0, msg=f"compiled {name} differs from eager")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["causal", "bool_mask", "float_mask_gqa", "dropout"])
def test_compile_fullgraph_matches_eager(backend, case):
    B, Hq, Hk, L, S, E = 2, 2, 2, 9, 13, 16
    if case == "float_mask_gqa":
        Hq = 4
    q, k, v = qkv(B, Hq, Hk, L, S, E, E)
    require(backend, q, k, v)
    kwargs = {
        "causal": {"is_causal": True},
        "bool_mask": {"attn_mask": torch.rand(B, 1, L, S) > 0.3},
        "float_mask_gqa": {"attn_mask": torch.randn(L, S), "enable_gqa": True},
        "dropout": {"dropout_p": 0.3},
    }[case]

    def attend(q, k, v):
        return tfm_kernels.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)

    assert_compiled_equals_eager(attend, torch.compile(attend, fullgraph=True, backend="aot_eager"), q, k, v)


def test_backend_checks_trace_without_graph_breaks():
    """Every backend's support check (including the cuda one, which reads the build of tfm_kernels._C) traces
    under torch.compile(fullgraph=True), so backend="auto" and explicit backends never break a graph."""
    q, k, v = qkv(2, 2, 2, 5, 7, 64, 64)

    def count_reasons(q, k, v):
        counts = [len(backends.not_supported_reasons(b, q, k, v)) for b in backends.ATTENTION_BACKENDS]
        counts += [len(backends.mlp_not_supported_reasons(b, q[0, 0], k[0, 0])) for b in backends.MLP_BACKENDS]
        return q.new_tensor(counts)

    compiled = torch.compile(count_reasons, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), count_reasons(q, k, v), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, before any kernel runs


def bad_inputs():
    q, k, v = qkv(2, 3, 3, 5, 7, 8, 8)
    return {
        "dtype_mismatch": ((q, k.half(), v), {}, TypeError, r"query, key and value must share a dtype"),
        "device_mismatch": ((q, k.to("meta"), v), {}, ValueError, r"must be on one device"),
        "rank_too_low": ((q[0, 0, 0], k, v), {}, ValueError, r"query must have at least 2 dimensions"),
        "batch_does_not_broadcast": (
            (q, k[:1].expand(3, -1, -1, -1), v),
            {},
            ValueError,
            r"the batch and head dims of query, key and value must broadcast; got \(2, 3\), \(3, 3\), \(2, 3\)",
        ),
        "heads_do_not_broadcast": (
            (q, k[:, :2], v[:, :2]),
            {},
            ValueError,
            r"the batch and head dims of query, key and value must broadcast; got \(2, 3\), \(2, 2\), \(2, 2\)",
        ),
        "gqa_heads_do_not_divide": (
            (q, k[:, :2], v[:, :2]),
            {"enable_gqa": True},
            ValueError,
            r"with enable_gqa=True the key and value heads must each divide the query heads; got 3, 2 and 2",
        ),
        "head_dims_differ": ((q, k[..., :4], v), {}, ValueError, r"query and key must have the same head dim"),
        "mask_does_not_broadcast": (
            (q, k, v),
            {"attn_mask": torch.ones(2, 5, 7, dtype=torch.bool)},
            ValueError,
            r"attn_mask must broadcast to \(2, 3, 5, 7\); got \(2, 5, 7\)",
        ),
        "mask_wrong_key_length": (
            (q, k, v),
            {"attn_mask": torch.randn(5, 6)},
            ValueError,
            r"attn_mask must broadcast to \(2, 3, 5, 7\); got \(5, 6\)",
        ),
        "causal_with_mask": (
            (q, k, v),
            {"attn_mask": torch.randn(5, 7), "is_causal": True},
            ValueError,
            r"is_causal=True cannot be combined with attn_mask",
        ),
        "dropout_one": (
            (q, k, v),
            {"dropout_p": 1.0},
            ValueError,
            r"dropout_p must be a float in \[0, 1\); got 1.0",
        ),
        "dropout_negative": (
            (q, k, v),
            {"dropout_p": -0.1},
            ValueError,
            r"dropout_p must be a float in \[0, 1\)",
        ),
        "key_lengths_shape": (
            (q, k, v),
            {"key_lengths": torch.tensor([7])},
            ValueError,
            r"key_lengths must have shape \(2,\); got \(1,\)",
        ),
        "key_lengths_dtype": (
            (q, k, v),
            {"key_lengths": torch.tensor([7.0, 7.0])},
            TypeError,
            r"key_lengths must be an int32 or int64 tensor",
        ),
        "unknown_backend": ((q, k, v), {"backend": "fastest"}, ValueError, r"backend must be one of"),
        "is_causal_not_bool": ((q, k, v), {"is_causal": "no"}, TypeError, r"is_causal must be a bool; got str"),
        "is_causal_none": ((q, k, v), {"is_causal": None}, TypeError, r"is_causal must be a bool; got NoneType"),
        "enable_gqa_not_bool": ((q, k, v), {"enable_gqa": "False"}, TypeError, r"enable_gqa must be a bool; got str"),
        "scale_not_a_number": ((q, k, v), {"scale": "0.5"}, TypeError, r"scale must be a real number; got str"),
        "dropout_not_a_number": ((q, k, v), {"dropout_p": "0.1"}, TypeError,
                                 r"dropout_p must be a real number; got str"),
        "float8": ((q.to(torch.float8_e4m3fn), k, v), {}, TypeError,
                   r"query must be float16, bfloat16, float32 or float64; got torch.float8_e4m3fn"),
        "nested": ((torch.nested.nested_tensor([q[0], q[1, :, :4]], layout=torch.jagged), k, v), {}, TypeError,
                   r"query must be a dense tensor; got a nested tensor"),
        "sparse": ((q, k.to_sparse(), v), {}, TypeError, r"key must be a dense \(strided\) tensor; got layout "
                   r"torch.sparse_coo"),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_errors(backend, case):
    args, kwargs, error, message = bad_inputs()[case]
    with pytest.raises(error, match=message):
        tfm_kernels.scaled_dot_product_attention(*args, **{"backend": backend, **kwargs})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_recorded_operators_follow_autocast(backend):
    """A program recorded without autocast (torch.export, torch.jit.trace) and run under it: the forward
    operators cast their floating inputs as the public functions (and torch's own operators) do, through their
    Autocast kernels, and give what an eager call under autocast gives."""
    dtype = torch.float16 if backend == "triton" else torch.bfloat16  # the interpreter's bf16 dots are wrong
    q, k, v = qkv(2, 3, 3, 5, 7, 8, 8)
    require(backend, q.to(dtype), k.to(dtype), v.to(dtype))
    weight, mask = rand(6, 8), rand(5, 7)

    class Block(torch.nn.Module):
        def forward(self, q, k, v, mask):
            out = tfm_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
            return tfm_kernels.fused_linear(out, weight, None, "gelu", backend=backend)

    args = (q, k, v, mask)
    with torch.autocast("cpu", dtype=dtype):
        expected = Block()(*args)
    for recorded in (torch.export.export(Block(), args).module(), torch.jit.trace(Block(), args)):
        with torch.autocast("cpu", dtype=dtype):
            out = recorded(*args)
        assert out.dtype == expected.dtype == dtype
        assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float_arguments_as_torch_takes_them(backend):
    """dropout_p and scale as NumPy scalars or one-element tensors, and a mask with a leading size-1 dim beyond
    the scores' rank (torch 2.14 takes both): the results of the same Python floats and of torch's SDPA."""
    q, k, v = qkv(1, 3, 3, 5, 7, 8, 8)
    require(backend, q, k, v)
    mask = rand(1, 3, 5, 7)
    expected = tfm_kernels.scaled_dot_product_attention(q, k, v, scale=0.5, backend=backend)
    for scale in (np.float32(0.5), torch.tensor(0.5)):
        for dropout_p in (np.float64(0.0), torch.tensor(0.0)):
            out = tfm_kernels.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, backend=backend)
            assert torch.equal(out, expected)
    q3, k3, v3 = q[0], k[0], v[0]  # (3, 5, 8): the mask (1, 3, 5, 7) has one more dim
    torch.testing.assert_close(tfm_kernels.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask, backend=backend),
                               F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask[0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["cuda"])
def test_explicit_backend_that_cannot_run_raises_with_reasons(backend):
    q, k, v = qkv(1, 2, 2, 5, 7, 8, 8, torch.float64)  # no kernel backend takes float64
    with pytest.raises(NotImplementedError, match=rf"backend='{backend}' cannot run these inputs: .*float64"):
        tfm_kernels.scaled_dot_product_attention(q, k, v, backend=backend)


def test_head_dims_past_the_triton_limit():
    """Head dims above 256: the cpu kernel (which "auto" runs on CPU tensors) and the torch backend take them,
    as torch's SDPA does; the triton backend says why it cannot."""
    q, k, v = qkv(1, 2, 2, 9, 11, 300, 260)
    check_against_oracle("cpu", q, k, v, is_causal=True)
    check_against_oracle("torch", q, k, v, is_causal=True)
    assert backends.choose(q, k, v) == "cpu"
    with pytest.raises(NotImplementedError, match=r"triton supports head dims up to 256; got E=300, Ev=260"):
        tfm_kernels.scaled_dot_product_attention(q, k, v, backend="triton")


def test_mask_that_requires_grad_gets_torchs_gradient():
    """A learnable float mask (an attention bias): "auto" runs the torch backend, the only one that computes
    the mask's gradient, and the gradient equals torch SDPA's; an explicit kernel backend says why it cannot,
    and runs the mask when grad mode is off."""
    q, k, v = qkv(2, 2, 2, 5, 7, 8, 8)  # float32: the kernel backends take it, so "auto" chooses by the mask
    bias = rand(2, 1, 5, 7).requires_grad_()
    out = tfm_kernels.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    (grad,) = torch.autograd.grad(out, bias, out.detach())
    bias_ref = bias.detach().requires_grad_()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias_ref)
    (expected_grad,) = torch.autograd.grad(expected, bias_ref, expected.detach())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)
    float_bias = bias.detach().requires_grad_()
    for backend in CPU_BACKENDS:
        require(backend, q, k, v)
        with pytest.raises(NotImplementedError, match=r"attn_mask requires grad, and only the torch backend"):
            tfm_kernels.scaled_dot_product_attention(q, k, v, attn_mask=float_bias, backend=backend)
        with torch.no_grad():
            out = tfm_kernels.scaled_dot_product_attention(q, k, v, attn_mask=float_bias, backend=backend)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, float_bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_backend_computes_half_precision_in_float32(dtype):
    """The torch backend (what "auto" runs for a mask that requires grad) keeps scores in float32, as torch's
    SDPA does: a float32 mask row at -1e9 is not cast to -inf (output: the mean of v), and large scores keep
    their precision; its output is within the tolerance rule of torch's."""
    q, k, v = qkv(1, 2, 2, 4, 6, 64, 64, dtype)
    mask = torch.zeros(4, 6)
    mask[1] = -1e9
    for scale in (None, 100.0):  # scale 100: scores in the thousands, where 16-bit floats keep about 1 unit
        ours = tfm_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, backend="torch")
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                 attn_mask=mask.double(), scale=scale)
        assert_within_tolerance(f"torch backend {dtype} scale {scale}", ours, theirs, exact)
        if scale is None:  # scores far below float32's spacing at 1e9 (64): all equal in that row
            torch.testing.assert_close(ours[:, :, 1].double(), v.double().mean(2), rtol=0, atol=1e-2)


@pytest.mark.parametrize("versions", [((3, 6), (2, 4)), ((3, 6), (2, 3)), ((3, 7), (2, 5))])
def test_triton_interpreter_with_a_numpy_it_cannot_use(monkeypatch, versions):
    """Triton 3.6's interpreter fails inside every kernel with numpy 2.4 and newer: the triton backend on CPU
    says so, and runs where the versions agree."""
    monkeypatch.setattr(backends, "_TRITON_VERSION", versions[0])
    monkeypatch.setattr(backends, "_NUMPY_VERSION", versions[1])
    q, k, v = qkv(1, 2, 2, 5, 7, 8, 8, torch.float32)
    if versions == ((3, 6), (2, 4)):
        with pytest.raises(NotImplementedError, match=r"triton 3\.6's CPU interpreter fails with numpy 2\.4; "
                                                      r"it needs numpy < 2\.4"):
            tfm_kernels.scaled_dot_product_attention(q, k, v, backend="triton")
    else:
        assert not backends.not_supported_reasons("triton", q, k, v)


# ---------------------------------------------------------------------------------------------------------
# GPU (benchmarks/device_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_dropout_matches_reference_under_keep_mask(backend, dtype, is_causal):
    q, k, v = qkv(2, 8, 2, 300, 517, 128, 128, dtype, "cuda")
    check_dropout_against_reference(backend, q, k, v, 0.2, is_causal=is_causal)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_keep_mask_is_rng_mask_bit_for_bit(backend):
    assert_keep_mask_matches_rng(backend, 2, 8, 4, 1000, 128, 0.3, torch.float16, "cuda")


def check_inductor_matches_eager(backend, q, k, v):
    """Compiled by inductor with fallback_random: inductor otherwise draws random numbers from its own
    generator (for torch's dropout too), so the dropout seed, and the mask, would differ from eager's."""
    def attend(q, k, v):
        return tfm_kernels.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1, backend=backend)

    require(backend, q, k, v)
    with torch._inductor.config.patch(fallback_random=True):
        assert_compiled_equals_eager(attend, torch.compile(attend, fullgraph=True), q, k, v)


def test_compile_inductor_matches_eager():
    check_inductor_matches_eager("cpu", *qkv(2, 2, 2, 9, 13, 16, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_compile_inductor_matches_eager(backend):
    check_inductor_matches_eager(backend, *qkv(2, 8, 8, 256, 256, 64, 64, torch.bfloat16, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend, feature", [(backend, feature) for backend in GPU_BACKENDS
                                              for feature in SECOND_ORDER_FEATURES
                                              if backend == "triton" or "mask" not in feature])  # cuda: no masks
def test_gpu_second_derivatives(backend, dtype, feature):
    check_second_derivatives(backend, feature, LOSSES["square"], dtype, "cuda", (2, 4, 200, 257), (64, 64))


@pytest.mark.gpu
def test_gpu_batch_offsets_beyond_32_bits():
    """Inputs whose batch stride is 2**31 elements: element offsets need 64 bits (4 GiB of memory)."""
    B, H, L, E = 2, 2, 130, 64
    batch_stride = 2**31
    buffer = torch.empty(batch_stride + 3 * L * H * E, dtype=torch.float16, device="cuda")
    q, k, v = (
        buffer[i * L * H * E :].as_strided((B, H, L, E), (batch_stride, E, H * E, 1)) for i in range(3)
    )  # (B, H, L, E) views; batch 1 starts 2**31 elements into the buffer
    for t in (q, k, v):
        t.copy_(torch.randn(B, H, L, E, device="cuda"))
    check_against_oracle("triton", q, k, v, is_causal=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flop_counter_counts_the_products_as_torch_counts_sdpa(backend):
    """FlopCounterMode counted 0 for the operators (no formula): an MFU estimate left attention out. The count is
    torch's own formula for its flash SDPA ops (every query row against every key; the backward recomputes the
    scores), GQA counting the query heads."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    q, k, v = rand(2, 4, 6, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 5)
    require(backend, q, k, v)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    with FlopCounterMode(display=False) as counter:
        sdpa(backend, *inputs, is_causal=True, enable_gqa=True).sum().backward()
    forward, backward = OPS[backend]
    counts = {str(op).removeprefix("tfm_kernels."): n for op, n in counter.get_flop_counts()["Global"].items()}
    expanded = [t.repeat_interleave(2, dim=1).shape for t in (k, v)]  # torch's formula of 2.11 takes equal heads
    assert counts == {forward: sdpa_flop_count(q.shape, *expanded),
                      backward: sdpa_backward_flop_count((2, 4, 6, 5), q.shape, *expanded)}
    assert counts[forward] == 2 * 2 * 4 * 6 * 9 * (8 + 5)
