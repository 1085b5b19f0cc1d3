"""tfm_kernels.nn.MultiheadAttention against torch.nn.MultiheadAttention (tolerance rule: torch's module in
float64 is the oracle, torch's module in the test dtype the baseline) over the argument matrix: batch_first,
batched and unbatched, key_padding_mask and attn_mask of each kind, need_weights and
average_attn_weights, is_causal, cross attention with kdim/vdim, add_bias_kv, add_zero_attn; plus
state_dict round trips, dropout, fully masked rows, autocast, kernel call counts, torch.compile and bad
input."""

import pytest
import torch
from nn_check import check_against_torch, randomize_parameters
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tfm_kernels
import tfm_kernels.attention
from tfm_kernels.nn import MultiheadAttention

E, H, N, L, S = 24, 3, 2, 5, 7  # head dim 8; L != S for cross attention

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")


def make_pair(dtype=torch.float32, device="cpu", embed_dim=E, num_heads=H, **kwargs):
    """torch's module (random weights and biases) and ours loaded from its state_dict."""
    reference = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, device=device, **kwargs)
    reference = randomize_parameters(reference)
    ours = MultiheadAttention(embed_dim, num_heads, dtype=dtype, device=device, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def seq_tensor(batched, batch_first, length, features, device="cpu", batch=N):
    if not batched:
        return torch.randn(length, features, dtype=torch.float64, device=device)
    shape = (batch, length, features) if batch_first else (length, batch, features)
    return torch.randn(shape, dtype=torch.float64, device=device)


def bool_mask(*shape, device="cpu"):
    """Random "masked out" positions, never the first key, so that no row is fully masked."""
    mask = torch.rand(shape, device=device) < 0.35
    mask[..., 0] = False
    return mask


def make_mask(kind, shape, device="cpu"):
    """None, a bool mask (True = masked out) or a float mask (random values, -inf where masked out)."""
    if kind is None:
        return None
    masked = bool_mask(*shape, device=device)
    if kind == "bool":
        return masked
    return torch.randn(shape, dtype=torch.float64, device=device).masked_fill(masked, float("-inf"))


def attn_mask_shape(kind3d, batched, L, S):
    return ((N * H if batched else H), L, S) if kind3d else (L, S)


def self_attention_call(need_weights, **kwargs):
    average = need_weights != "per_head"

    def call(module, t):
        return module(t["x"], t["x"], t["x"], key_padding_mask=t.get("key_padding_mask"),
                      attn_mask=t.get("attn_mask"), need_weights=bool(need_weights),
                      average_attn_weights=average, **kwargs)

    return call


@pytest.mark.parametrize("need_weights", [False, "average", "per_head"])
@pytest.mark.parametrize("attn_mask", [None, "bool-2d", "float-2d", "bool-3d", "float-3d"])
@pytest.mark.parametrize("key_padding_mask", [None, "bool", "float"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_self_attention_masks(batch_first, batched, key_padding_mask, attn_mask, need_weights):
    reference, ours = make_pair(batch_first=batch_first)
    inputs = {"x": seq_tensor(batched, batch_first, L, E)}
    inputs["key_padding_mask"] = make_mask(key_padding_mask, (N, L) if batched else (L,))
    if attn_mask is not None:
        kind, dims = attn_mask.split("-")
        inputs["attn_mask"] = make_mask(kind, attn_mask_shape(dims == "3d", batched, L, L))
    check_against_torch(reference, ours, inputs, self_attention_call(need_weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weights_with_float_masks_equal_torch(dtype):
    """need_weights=True computes as torch does: the float mask goes into the score product and is rounded with
    it once (torch's baddbmm), so seq-first inputs, projected as torch projects them, give torch's weights and
    output bit for bit. Added to scores already rounded (as before), a bfloat16 output broke the tolerance rule
    (0.26 against torch's 0.094)."""
    reference, ours = make_pair(dtype=dtype)
    x = 3 * seq_tensor(True, False, L, E).to(dtype)
    masks = {"key_padding_mask": make_mask("float", (N, L)).to(dtype),
             "attn_mask": make_mask("float", attn_mask_shape(True, True, L, L)).to(dtype)}
    expected = reference(x, x, x, average_attn_weights=False, **masks)
    for result, torch_result in zip(ours(x, x, x, average_attn_weights=False, **masks), expected):
        assert torch.equal(result, torch_result)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("key_padding_mask", [None, "bool"])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_is_causal(batch_first, mask_kind, key_padding_mask, need_weights, dtype, monkeypatch):
    """The hint with a causal attn_mask: causal attention in the kernel (or the mask where torch reads it)."""
    reference, ours = make_pair(dtype=dtype, batch_first=batch_first)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    inputs = {"x": seq_tensor(True, batch_first, L, E),
              "attn_mask": causal.isinf() if mask_kind == "bool" else causal,
              "key_padding_mask": make_mask(key_padding_mask, (N, L))}
    calls = record_kernel_masks(monkeypatch)
    check_against_torch(reference, ours, inputs, self_attention_call(need_weights, is_causal=True), dtype)
    assert_causal_only_where_torch_is(calls, key_padding_mask is None, need_weights)


def record_kernel_masks(monkeypatch):
    """(is_causal, attn_mask given) of every fused-kernel call MultiheadAttention makes from now on."""
    calls = []
    attend = tfm_kernels.attention.scaled_dot_product_attention

    def recording(*args, attn_mask=None, is_causal=False, **kwargs):
        calls.append((is_causal, attn_mask is not None))
        return attend(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(tfm_kernels.attention, "scaled_dot_product_attention", recording)
    return calls


def assert_causal_only_where_torch_is(calls, no_padding_mask, need_weights):
    """torch's rule for the hint: causal attention (no mask read) without a padding mask and without weights;
    the mask otherwise; with weights the explicit path runs no kernel."""
    if need_weights:
        assert calls == []
    else:
        assert calls and set(calls) == {(True, False) if no_padding_mask else (False, True)}, calls


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", [False, True], ids=["no_masks", "masks"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("inputs_kind", ["key_is_value", "all_distinct", "kdim_vdim"])
def test_cross_attention(inputs_kind, batch_first, batched, masks, need_weights):
    """Encoder-decoder attention (key is value: two GEMMs), distinct q/k/v, and kdim/vdim projections."""
    kdim, vdim = (10, 6) if inputs_kind == "kdim_vdim" else (E, E)
    reference, ours = make_pair(batch_first=batch_first, kdim=kdim, vdim=vdim)
    inputs = {"query": seq_tensor(batched, batch_first, L, E),
              "key": seq_tensor(batched, batch_first, S, kdim)}
    if inputs_kind != "key_is_value":
        inputs["value"] = seq_tensor(batched, batch_first, S, vdim)
    if masks:
        inputs["key_padding_mask"] = make_mask("bool", (N, S) if batched else (S,))
        inputs["attn_mask"] = make_mask("float", (L, S))

    def call(module, t):
        value = t.get("value", t["key"])
        return module(t["query"], t["key"], value, key_padding_mask=t.get("key_padding_mask"),
                      attn_mask=t.get("attn_mask"), need_weights=need_weights)

    check_against_torch(reference, ours, inputs, call)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("masks", [None, "bool", "float"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("extra", ["bias_kv", "zero_attn", "both"])
def test_bias_kv_and_zero_attn(extra, batched, masks, need_weights):
    kwargs = {"add_bias_kv": extra in ("bias_kv", "both"), "add_zero_attn": extra in ("zero_attn", "both")}
    reference, ours = make_pair(**kwargs)
    inputs = {"x": seq_tensor(batched, False, L, E)}
    if masks is not None:
        inputs["key_padding_mask"] = make_mask(masks, (N, L) if batched else (L,))
        inputs["attn_mask"] = make_mask(masks, attn_mask_shape(True, batched, L, L))
    check_against_torch(reference, ours, inputs, self_attention_call(need_weights))


@pytest.mark.parametrize("need_weights", [False, True])
def test_bias_kv_with_is_causal(need_weights, monkeypatch):
    """The causal hint with the added keys: top-left causal over S + 2 keys (bias and zero), as torch."""
    reference, ours = make_pair(add_bias_kv=True, add_zero_attn=True, batch_first=True)
    inputs = {"x": seq_tensor(True, True, L, E),
              "attn_mask": nn.Transformer.generate_square_subsequent_mask(L)}
    calls = record_kernel_masks(monkeypatch)
    check_against_torch(reference, ours, inputs, self_attention_call(need_weights, is_causal=True))
    assert_causal_only_where_torch_is(calls, True, need_weights)


def test_without_bias():
    reference, ours = make_pair(bias=False, batch_first=True)
    assert ours.in_proj_bias is None and ours.out_proj.bias is None
    inputs = {"x": seq_tensor(True, True, L, E), "key_padding_mask": make_mask("bool", (N, L))}
    check_against_torch(reference, ours, inputs, self_attention_call(False))


def test_under_autocast():
    """CPU autocast (bfloat16): the projections run in bfloat16 and so does the kernel, as torch's."""
    reference, ours = make_pair(batch_first=True)

    def call(module, t):
        autocast = module.in_proj_weight.dtype == torch.float32  # the float64 oracle runs without
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return module(t["x"], t["x"], t["x"], key_padding_mask=t["key_padding_mask"], need_weights=False)

    inputs = {"x": seq_tensor(True, True, L, E), "key_padding_mask": make_mask("bool", (N, L))}
    results = check_against_torch(reference, ours, inputs, call)
    assert results["out0"].dtype == torch.bfloat16


def test_bias_kv_under_autocast():
    """CPU autocast (bfloat16) with add_bias_kv: the learned bias key/value join the bfloat16 keys in bfloat16
    (torch.cat would promote the keys to the float32 of the bias, and the kernel takes one dtype)."""
    reference, ours = make_pair(batch_first=True, add_bias_kv=True)

    def call(module, t):
        autocast = module.in_proj_weight.dtype == torch.float32  # the float64 oracle runs without
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return module(t["x"], t["x"], t["x"], need_weights=False)

    results = check_against_torch(reference, ours, {"x": seq_tensor(True, True, L, E)}, call)
    assert results["out0"].dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 10, "vdim": 6}, {"add_bias_kv": True}, {"bias": False}],
                         ids=["packed", "kdim_vdim", "bias_kv", "no_bias"])
def test_state_dict_round_trip(kwargs):
    theirs = randomize_parameters(nn.MultiheadAttention(E, H, **kwargs))
    ours = MultiheadAttention(E, H, **kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    back = nn.MultiheadAttention(E, H, **kwargs)
    back.load_state_dict(ours.state_dict())
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
        assert torch.equal(back.state_dict()[name], tensor), name


def test_same_initial_weights_as_torch():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, H, add_bias_kv=True)
    torch.manual_seed(0)
    ours = MultiheadAttention(E, H, add_bias_kv=True)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_fully_masked_rows_give_zero():
    """A query row that sees no key: attention 0, so the output is the out-projection bias, weights 0 and
    gradients finite. torch gives NaN there on its explicit path (need_weights=True) and, depending on version
    and kernel, NaN or 0 on its SDPA path. The other rows match torch."""
    reference, ours = make_pair(batch_first=True)
    x = torch.randn(N, L, E, requires_grad=True)
    attn_mask = bool_mask(L, L)
    attn_mask[2] = True  # query row 2 sees no key
    keep = [i for i in range(L) if i != 2]
    for need_weights in (False, True):
        out, weights = ours(x, x, x, attn_mask=attn_mask, need_weights=need_weights)
        expected, _ = reference(x, x, x, attn_mask=attn_mask, need_weights=need_weights)
        torch.testing.assert_close(out[:, 2], ours.out_proj.bias.expand(N, E))
        torch.testing.assert_close(out[:, keep], expected[:, keep])
        if need_weights:
            assert torch.isnan(expected[:, 2]).all()
            assert (weights[:, 2] == 0).all()
        (grad,) = torch.autograd.grad(out.sum() + (0 if weights is None else weights.sum()), x)
        assert torch.isfinite(grad).all()


def test_dropout_only_in_training():
    reference, ours = make_pair(dropout=0.5, batch_first=True)
    x = torch.randn(N, L, E)
    ours.eval()
    reference.eval()
    with torch.no_grad():
        expected = reference(x, x, x, need_weights=False)[0]
        torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], expected)
    ours.train()
    torch.manual_seed(1)
    first = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    again = ours(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(first, again)  # the dropout RNG follows torch's generator
    ours.eval()
    assert not torch.allclose(first, ours(x, x, x, need_weights=False)[0])


def test_dropout_weights_are_the_ones_used():
    """need_weights=True in training: the returned (dropped-out) weights produce the output."""
    _, ours = make_pair(dropout=0.5, batch_first=True)
    x = torch.randn(N, L, E)
    out, weights = ours(x, x, x, average_attn_weights=False)
    assert (weights == 0).any()
    v = torch.nn.functional.linear(x, ours.in_proj_weight[2 * E:], ours.in_proj_bias[2 * E:])
    v = v.view(N, L, H, E // H).transpose(1, 2)  # (N, H, L, D)
    attended = (weights @ v).transpose(1, 2).reshape(N, L, E)  # (N, L, E)
    torch.testing.assert_close(out, ours.out_proj(attended))


def test_runs_the_fused_attention(monkeypatch):
    """need_weights=False runs the fused attention, in inference too (where torch's fast path would run);
    need_weights=True is the explicit path."""
    calls = []
    original = tfm_kernels.attention.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tfm_kernels.attention, "scaled_dot_product_attention", counting)
    _, ours = make_pair(batch_first=True)
    ours.eval()
    x = torch.randn(N, L, E)
    with torch.no_grad():
        ours(x, x, x, key_padding_mask=make_mask("bool", (N, L)), need_weights=False)
    ours.backend = "torch"
    ours(x, x, x, need_weights=False)
    assert calls == ["auto", "torch"]
    ours(x, x, x, need_weights=True)
    assert len(calls) == 2


@pytest.mark.parametrize("case", ["padding+float_mask", "float_padding+bool_3d_mask", "cross_extra_keys"])
def test_triton_backend_under_the_interpreter(case):
    cross = case == "cross_extra_keys"  # with kdim/vdim, add_bias_kv and add_zero_attn
    extra = {"kdim": 10, "vdim": 6, "add_bias_kv": True, "add_zero_attn": True} if cross else {}
    reference, ours = make_pair(batch_first=True, **extra)
    ours.backend = "triton"
    if cross:
        inputs = {"query": seq_tensor(True, True, L, E), "key": seq_tensor(True, True, S, 10),
                  "value": seq_tensor(True, True, S, 6), "key_padding_mask": make_mask("bool", (N, S))}

        def call(module, t):
            return module(t["query"], t["key"], t["value"], key_padding_mask=t["key_padding_mask"],
                          need_weights=False)
    else:
        padding, mask = ("bool", "float") if case == "padding+float_mask" else ("float", "bool")
        inputs = {"x": seq_tensor(True, True, L, E), "key_padding_mask": make_mask(padding, (N, L)),
                  "attn_mask": make_mask(mask, attn_mask_shape(mask == "bool", True, L, L))}
        call = self_attention_call(False)
    check_against_torch(reference, ours, inputs, call)


def test_torch_compile_matches_eager():
    _, ours = make_pair(batch_first=True)
    x = torch.randn(N, L, E)
    kpm = make_mask("bool", (N, L))
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for kwargs in ({"key_padding_mask": kpm}, {"attn_mask": mask, "is_causal": True}):
        eager = ours(x, x, x, need_weights=False, **kwargs)[0]
        torch.testing.assert_close(compiled(x, x, x, need_weights=False, **kwargs)[0], eager)


def test_bad_input():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads; got embed_dim=10"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        MultiheadAttention(E, H, backend="fast")
    ours = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\).*got \(5, 2\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(L, N, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(5, 5\) or \(6, 5, 5\).*\(2, 5, 5\)"):
        ours(x, x, x, attn_mask=torch.zeros(N, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating-point tensor; got torch.int64"):
        ours(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))
    with pytest.raises(ValueError, match="query must have embed_dim=24 features"):
        ours(x[..., :8], x, x)
    with pytest.raises(ValueError, match="key must be 3-D like query"):
        ours(x, x[0], x)
    with pytest.raises(ValueError, match="query and key must have the same batch size"):
        ours(x, x[:1], x[:1])
    with pytest.raises(RuntimeError, match="is_causal=True is a hint that attn_mask is causal and needs it"):
        ours(x, x, x, is_causal=True)
    # a mask on another device (a meta tensor stands in for a CPU mask beside CUDA inputs) is named, on both paths
    for need_weights in (True, False):
        with pytest.raises(ValueError, match=r"key_padding_mask must be on query's device cpu; got meta"):
            ours(x, x, x, key_padding_mask=torch.zeros(N, L, dtype=torch.bool, device="meta"),
                 need_weights=need_weights)
        with pytest.raises(ValueError, match=r"attn_mask must be on query's device cpu; got meta"):
            ours(x, x, x, attn_mask=torch.zeros(L, L, device="meta"), need_weights=need_weights)
    # dropout outside [0, 1] ran without dropout with need_weights=True and was named dropout_p otherwise
    for dropout in (-0.5, 1.5):
        with pytest.raises(ValueError, match=rf"dropout must be a float in \[0, 1\]; got {dropout}"):
            MultiheadAttention(E, H, dropout=dropout)
        patched = tfm_kernels.patch(torch_mha := nn.MultiheadAttention(E, H, dropout=dropout, batch_first=True))
        assert patched.swapped
        for need_weights in (True, False):
            with pytest.raises(ValueError, match=rf"dropout must be a float in \[0, 1\]; got {dropout}"):
                torch_mha.train()(x, x, x, need_weights=need_weights)


@pytest.mark.gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_bf16(is_causal):
    """d 1024, 16 heads, bf16 on the GPU with backend="auto" (seq 256 keeps the float64 oracle quick)."""
    embed_dim, heads, batch, seq = 1024, 16, 2, 256
    reference, ours = make_pair(torch.bfloat16, "cuda", embed_dim, heads, batch_first=True)
    inputs = {"x": seq_tensor(True, True, seq, embed_dim, device="cuda", batch=batch)}
    if is_causal:
        inputs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(seq, device="cuda")
    else:
        inputs["key_padding_mask"] = make_mask("bool", (batch, seq), device="cuda")
    call = self_attention_call(False, is_causal=is_causal)
    check_against_torch(reference, ours, inputs, call, torch.bfloat16)


class AllocatedBytes(TorchDispatchMode):
    """The bytes of the tensors the aten operators dispatched while active return, by operator (views excluded:
    they share their input's storage)."""

    def __init__(self):
        super().__init__()
        self.by_op = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.by_op[str(func.overloadpacket)] = self.by_op.get(str(func.overloadpacket), 0) + t.nbytes
        return out


def test_merged_masks_allocate_one_mask():
    """A bool attn_mask (L, S) with a key_padding_mask (N, S) merge into one (N, 1, L, S) bool mask, made once (not
    an (N * H, L, S) one as torch's, nor a second one for its negation); a key_padding_mask alone reaches the
    kernel as (N, 1, 1, S)."""
    N, H, L, E = 2, 4, 96, 32
    module = MultiheadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    padding = torch.arange(L).expand(N, L) >= L - 7  # True = masked out
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    for attn_mask, mask_bytes in ((causal, N * L * L), (None, N * L)):
        with AllocatedBytes() as allocated:
            module(x, x, x, key_padding_mask=padding, attn_mask=attn_mask, need_weights=False)
        mask_ops = ("aten.logical_or", "aten.bitwise_not", "aten.logical_not", "aten.expand", "aten.clone")
        assert sum(allocated.by_op.get(op, 0) for op in mask_ops) == mask_bytes, allocated.by_op
