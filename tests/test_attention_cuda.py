"""The CUDA C++ attention kernels (csrc/cuda/attention/) against the float64 oracle (DESIGN.md tolerance rule)
over their feature matrix: float16/bfloat16, head dims 64 and 128, odd sizes, L != S, causal, key lengths with
zeros, GQA/MQA, strided views of a packed projection, scale, dropout (keep-mask bit-identical with
tfm_kernels.rng and the Triton kernel), the default backward (dQ by atomics) and the deterministic one,
CUDA graphs and bad-input errors. Everything
but the build checks needs a GPU (`gpu` marker; run by benchmarks/device_check.sh)."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_attention import check_against_oracle, rand
from tolerance import assert_within_tolerance

import tfm_kernels
from tfm_kernels import backends, ops, reference, rng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
# (B, Hq, Hk, L, S): single element, odd sizes either side of the 64-row (backward) and 128-row (forward) tiles,
# L != S both ways, GQA, MQA.
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 3, 17, 97), (1, 2, 2, 97, 17), (2, 2, 2, 257, 257), (1, 8, 2, 100, 300),
          (2, 4, 1, 65, 129)]


def attention_op(q, k, v, key_lengths=None, dropout_p=0.0, is_causal=False, scale=None, seed=None):
    """The CUDA operator itself (with its registered autograd), for explicit seeds and raw lse."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = torch.zeros((), dtype=torch.int64, device=q.device) if seed is None else seed
    op = torch.ops.tfm_kernels.attention_forward
    return op(q, k, v, None, key_lengths, dropout_p, is_causal, scale, seed)


def require_head_dim(D):
    """Skips when the build left head dim D out (a TFM_KERNELS_HEAD_DIMS choice, not a kernel limit)."""
    built = ops.compiled_head_dims()
    if D not in built:
        pytest.skip(f"head dim {D} is not built (TFM_KERNELS_HEAD_DIMS gave {built})")


def cuda_inputs(B, Hq, Hk, L, S, D, dtype, requires_grad=False):
    require_head_dim(D)
    q, k, v = (rand(B, h, n, D, dtype=dtype, device="cuda") for h, n in ((Hq, L), (Hk, S), (Hk, S)))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_build_info_reports_cuda():
    """A build with CUDA sources says so and registers the CUDA kernels of both attention ops."""
    info = tfm_kernels.build_info()
    if not info.get("built") or not info.get("cuda"):
        pytest.skip("the extension was built without CUDA (TFM_KERNELS_CUDA=0 or no toolkit)")
    assert info["cuda_archs"] and info["head_dims"], info
    assert {int(d) for d in info["head_dims"].split(",")} <= {32, 64, 96, 128, 256}, info
    shared = ops.attention_shared_memory_bytes()  # from the kernels' traits: fits an H100 block, exceeds 48 KiB
    assert sorted(shared) == sorted(ops.compiled_head_dims()), info
    assert all(48 * 1024 < b <= 232448 for b in shared.values()), info
    for name in ("attention_forward", "attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tfm_kernels::{name}", "CUDA"), name


def test_generator_writes_one_unit_per_instantiation(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    try:
        import generate_kernels
    finally:
        sys.path.pop(0)
    (tmp_path / "attention_fwd_d32_fp16.cu").write_text("stale")
    names = generate_kernels.generate([64, 96], output_dir=str(tmp_path))
    units = sorted(n for n in names if n.endswith(".cu"))
    assert units == sorted(f"attention_{p}_d{d}_{t}.cu" for p in ("fwd", "bwd") for d in (64, 96)
                           for t in ("fp16", "bf16"))
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # the stale unit is gone
    assert "X(64) X(96)" in (tmp_path / "head_dims.h").read_text()
    with pytest.raises(SystemExit, match="head-dims"):
        generate_kernels.parse_head_dims("64,48")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True])
def test_against_oracle(dtype, head_dim, shape, is_causal):
    B, Hq, Hk, L, S = shape
    q, k, v = cuda_inputs(B, Hq, Hk, L, S, head_dim, dtype)
    check_against_oracle("cuda", q, k, v, is_causal=is_causal, enable_gqa=Hq != Hk)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_key_lengths_with_zeros(dtype, is_causal):
    B, H, L, S, D = 4, 2, 70, 150, 64
    q, k, v = cuda_inputs(B, H, H, L, S, D, dtype)
    lengths = torch.tensor([S, 5, 0, 64], device="cuda")
    out = check_against_oracle("cuda", q, k, v, key_lengths=lengths, is_causal=is_causal)
    assert (out[2] == 0).all(), "a batch with no keys must give 0"
    out, lse = attention_op(q, k, v, key_lengths=lengths.to(torch.int32), is_causal=is_causal)
    assert torch.isinf(lse[2]).all() and (lse[2] > 0).all(), "lse is +inf where no key takes part"
    assert torch.isfinite(lse[[0, 1, 3]]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_strided_views_of_packed_qkv(head_dim):
    B, L, H = 2, 77, 3
    require_head_dim(head_dim)
    qkv = rand(B, L, 3, H, head_dim, dtype=torch.bfloat16, device="cuda")  # packed projection (B, L, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, stride(-1) == 1
    assert not q.is_contiguous()
    check_against_oracle("cuda", q, k, v, is_causal=True)


@pytest.mark.gpu
def test_misaligned_view_is_copied_not_misread():
    """A view whose rows are not 16-byte aligned (offset by one element) still gives the right answer."""
    base = rand(2, 4, 50, 129, dtype=torch.float16, device="cuda")
    q = base[..., 1:65]  # (2, 4, 50, 64), row stride 129 elements: not a multiple of 8
    k, v = (rand(2, 4, 60, 64, dtype=torch.float16, device="cuda") for _ in range(2))
    check_against_oracle("cuda", q, k, v)


@pytest.mark.gpu
def test_contiguous_tensor_at_misaligned_offset_is_copied():
    """A contiguous tensor whose data pointer is one element past a 16-byte boundary (contiguous() would return
    it unchanged) is copied before the 16-byte loads, forward and backward."""
    require_head_dim(64)
    shape = (1, 2, 33, 64)
    flat = rand(math.prod(shape) + 1, dtype=torch.float16, device="cuda")
    q = flat[1:].view(shape)  # contiguous, data pointer 2 bytes past the allocation
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    k, v = (rand(*shape, dtype=torch.float16, device="cuda") for _ in range(2))
    check_against_oracle("cuda", q, k, v, is_causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [0.05, 1.0, -0.3])
def test_scale(scale):
    q, k, v = cuda_inputs(1, 2, 2, 45, 80, 64, torch.float16)
    check_against_oracle("cuda", q, k, v, scale=scale, is_causal=True)


def keep_mask_from_output(out, dropout_p):
    """With v = identity (S == D) and no masking, out[z, i, j] = P[i, j] keep[i, j] keep_scale and P > 0, so
    the nonzero pattern of out is the keep-mask."""
    return out != 0


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_mask_matches_rng_and_triton(head_dim, dtype):
    B, H, L, S, p = 2, 3, 150, head_dim, 0.3
    require_head_dim(head_dim)
    q = 0.1 * rand(B, H, L, head_dim, dtype=dtype, device="cuda")  # small scores: no weight underflows to 0
    k = rand(B, H, S, head_dim, dtype=dtype, device="cuda")
    v = torch.eye(S, head_dim, dtype=dtype, device="cuda").expand(B, H, S, head_dim)
    seed = torch.tensor(0x1234_5678_9ABC_DEF0 - 2**63, dtype=torch.int64, device="cuda")
    out, _ = attention_op(q, k, v, dropout_p=p, seed=seed)
    expected = rng.dropout_keep_mask(seed, B * H, L, S, p, device="cuda").view(B, H, L, S)
    assert torch.equal(keep_mask_from_output(out, p), expected)
    triton_out, _ = torch.ops.tfm_kernels.triton_attention_forward(q, k, v, None, None, p, False,
                                                                   head_dim**-0.5, seed)
    assert torch.equal(keep_mask_from_output(triton_out, p), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_against_oracle(dtype, is_causal):
    """Output and gradients with dropout against the oracle drawing the same keep-mask from the same seed."""
    B, Hq, Hk, L, S, D, p = 2, 4, 2, 97, 130, 64, 0.2
    q, k, v = cuda_inputs(B, Hq, Hk, L, S, D, dtype, requires_grad=True)
    lengths = torch.tensor([S, 77], device="cuda")
    seed = rng.draw_seed("cuda")
    out, _ = attention_op(q, k, v, key_lengths=lengths, dropout_p=p, is_causal=is_causal, seed=seed)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    def run_reference(cast):
        inputs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        o, _ = reference.attention(*inputs, None, lengths, p, is_causal, D**-0.5, seed)
        return (o, *torch.autograd.grad(o, inputs, grad_out.to(cast)))

    baseline, oracle = run_reference(dtype), run_reference(torch.float64)
    for name, result, base, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), baseline, oracle):
        assert_within_tolerance(f"cuda dropout {name}", result, base, ref)


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test: the three-pass backward without atomics. Warn-only,
    so the oracle's cuBLAS products run without CUBLAS_WORKSPACE_CONFIG."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_deterministic_backward_repeats_bit_for_bit(head_dim, deterministic_algorithms):
    q, k, v = cuda_inputs(2, 8, 2, 300, 333, head_dim, torch.bfloat16, requires_grad=True)
    seed = rng.draw_seed("cuda")

    def grads():
        out, _ = attention_op(q, k, v, dropout_p=0.1, is_causal=True, seed=seed)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    first = grads()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_deterministic_backward_against_oracle(head_dim, is_causal, deterministic_algorithms):
    """The rest of this file runs the default backward (dQ summed by atomics in the dk/dv pass); this is the
    three-pass one."""
    q, k, v = cuda_inputs(2, 4, 2, 150, 333, head_dim, torch.float16)
    check_against_oracle("cuda", q, k, v, is_causal=is_causal, enable_gqa=True)


@pytest.mark.gpu
def test_auto_order_follows_the_architecture():
    q, k, v = cuda_inputs(1, 2, 2, 64, 64, 64, torch.bfloat16)
    expected = "triton" if torch.cuda.get_device_capability()[0] >= 9 else "cuda"
    assert backends.choose(q, k, v) == expected


@pytest.mark.gpu
def test_cuda_graph_replay_reads_the_seed_on_the_device():
    q, k, v = cuda_inputs(1, 2, 2, 64, 64, 64, torch.float16)
    seed = torch.tensor(7, dtype=torch.int64, device="cuda")
    attention_op(q, k, v, dropout_p=0.5, seed=seed)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = attention_op(q, k, v, dropout_p=0.5, seed=seed)
    for value in (7, 8):
        seed.fill_(value)
        graph.replay()
        expected, _ = attention_op(q, k, v, dropout_p=0.5, seed=seed)
        assert torch.equal(captured, expected)


@pytest.mark.gpu
def test_output_layout_contract():
    q, k, v = cuda_inputs(2, 3, 3, 40, 50, 64, torch.float16, requires_grad=True)
    out, lse = attention_op(q, k, v)
    assert out.shape == (2, 3, 40, 64) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32 and lse.is_contiguous()
    expected_lse = torch.logsumexp((q.float() @ k.float().transpose(-2, -1)) / 8.0, dim=-1) / math.log(2)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-3, atol=1e-3)
    for grad in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert grad.transpose(1, 2).is_contiguous()


@pytest.mark.gpu
def test_bad_inputs_raise_naming_the_argument():
    q, k, v = cuda_inputs(1, 2, 2, 16, 16, 64, torch.float16)
    seed = torch.zeros((), dtype=torch.int64, device="cuda")
    op = torch.ops.tfm_kernels.attention_forward
    mask = torch.ones(1, 2, 16, 16, dtype=torch.bool, device="cuda")
    with pytest.raises(RuntimeError, match="attention_forward: mask is not supported by the CUDA kernels"):
        op(q, k, v, mask, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="q must be float16 or bfloat16"):
        op(q.float(), k.float(), v.float(), None, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="head dim"):
        op(q[..., :48], k[..., :48], v[..., :48], None, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="attention_forward: k and v must have q's dtype"):
        op(q, k.bfloat16(), v, None, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="key_lengths must have shape"):
        op(q, k, v, None, torch.tensor([3, 4], device="cuda"), 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="key_lengths must be int32 or int64"):
        op(q, k, v, None, torch.tensor([3.0], device="cuda"), 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        op(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, None, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="heads must divide"):
        three_heads = k[:, :1].expand(1, 3, 16, 64)  # (1, 3, 16, 64): 3 does not divide q's 2 heads
        op(q, three_heads, three_heads, None, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="dropout_p"):
        op(q, k, v, None, None, 1.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match="seed must be an int64"):
        op(q, k, v, None, None, 0.5, False, 0.125, seed.int())
    with pytest.raises(RuntimeError, match="scale must be finite"):
        op(q, k, v, None, None, 0.0, False, math.inf, seed)
    out, lse = op(q, k, v, None, None, 0.0, False, 0.125, seed)
    with pytest.raises(RuntimeError, match=r"attention_backward: lse must have shape \(B, Hq, L\)"):
        backward = torch.ops.tfm_kernels.attention_backward
        backward(out, q, k, v, out, lse[:, :1], None, None, 0.0, False, 0.125, seed)
    with pytest.raises(NotImplementedError, match="cuda"):
        tfm_kernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda")


# A C++ error from three sources, each in a fresh process: torch's own CUDA code, our CPU operator, our CUDA
# operator. On the H200 machines a TORCH_CHECK message that formats a number killed its process (SIGSEGV) while
# the extension carried a static copy of libstdc++ (benchmarks/RESULTS.md, 2026-11-30; setup.py now links the
# shared one); these tell a fault of every C++ exception on a machine, of ours only, and of earlier work apart.
CPP_ERRORS = {
    "torch cuda": "torch.ones(2, device='cuda') @ torch.ones(3, device='cuda')",
    "our cpu operator": "torch.ops.tfm_kernels.mlp_linear_backward(torch.ones(4, 6).half(), torch.ones(4, 8), "
                        "torch.ones(6, 8), torch.ones(4, 6), 'gelu', 0.0, torch.zeros((), dtype=torch.int64))",
    "our cuda operator": "q = torch.ones(1, 2, 16, 64, dtype=torch.half, device='cuda'); "
                         "torch.ops.tfm_kernels.attention_forward(q, q, q, q[..., :16] > 0, None, 0.0, False, "
                         "0.125, torch.zeros((), dtype=torch.int64, device='cuda'))",
}


def native_backtrace(code):
    """The C++ stack of `code` crashing, through cuda-gdb (on the GPU machines it debugs host code), or why
    there is none."""
    debugger = shutil.which("cuda-gdb") or shutil.which("cuda-gdb", path="/usr/local/cuda/bin")
    if debugger is None:
        return "(no cuda-gdb for a native backtrace)"
    run = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    crash = run.stdout.find("received signal")  # the backtrace follows; thread notices come before it
    return run.stdout[max(crash, 0):][:8000] + run.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("source", CPP_ERRORS)
def test_gpu_cpp_error_raises_in_a_fresh_process(source):
    code = (f"import torch, tfm_kernels\ntry:\n    {CPP_ERRORS[source]}\nexcept RuntimeError as error:\n"
            f"    print('raised:', str(error).splitlines()[0])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    if result.returncode < 0:
        pytest.fail(f"{source}: killed by signal {-result.returncode}\n{result.stderr[-2000:]}\n"
                    f"{native_backtrace(code)}")
    assert result.returncode == 0 and "raised:" in result.stdout, result.stdout + result.stderr


def test_cuda_backend_reasons_on_cpu_tensors():
    q = torch.randn(1, 2, 8, 64)
    reasons = tfm_kernels.backends.not_supported_reasons("cuda", q, q, q)
    assert any("CUDA tensors" in r for r in reasons) or not ops.has_compiled_cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_opcheck(dropout_p):
    """Schema, fake kernel, autograd registration and AOT dispatch of the CUDA operator."""
    q, k, v = cuda_inputs(1, 4, 2, 70, 90, 64, torch.bfloat16, requires_grad=True)
    args = (q, k, v, None, torch.tensor([50], device="cuda"), dropout_p, True, 0.125, rng.draw_seed("cuda"))
    torch.library.opcheck(torch.ops.tfm_kernels.attention_forward.default, args)
