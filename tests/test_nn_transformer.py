"""tfm_kernels.nn Transformer layers and containers against torch.nn's (tolerance rule: torch's module in
float64 is the oracle, torch's in the test dtype the baseline): batch_first, norm_first, activations (fused
and not), masks and causal hints, bias, autocast; same initial weights and state_dict; inference without
torch's fast paths; the kernels really run; torch.compile."""

import copy

import pytest
import torch
import torch.nn.functional as F
from nn_check import check_against_torch, randomize_parameters
from test_mlp import require as require_mlp
from tolerance import assert_within_tolerance
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import tfm_kernels
import tfm_kernels.nn.transformer as fused_transformer
from tfm_kernels.nn import (
    MultiheadAttention,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

D_MODEL, NHEAD, D_FF, N, S, T = 24, 3, 40, 2, 6, 5

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True",
                                        "ignore:Support for mismatched")


def layer_kwargs(**kwargs):
    return {"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": D_FF, "dropout": 0.0, **kwargs}


def make_pair(torch_class, fused_class, dtype=torch.float32, device="cpu", **kwargs):
    """torch's module with random weights and biases, and ours loaded from its state_dict."""
    reference = randomize_parameters(torch_class(**kwargs, dtype=dtype, device=device))
    ours = fused_class(**kwargs, dtype=dtype, device=device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def seq(length, batch_first, batched=True, device="cpu", batch=N, d_model=D_MODEL):
    if not batched:
        return torch.randn(length, d_model, dtype=torch.float64, device=device)
    shape = (batch, length, d_model) if batch_first else (length, batch, d_model)
    return torch.randn(shape, dtype=torch.float64, device=device)


def padding_mask(length, kind="bool", batch=N, device="cpu"):
    """(batch, length), True = padding; right padding of random lengths, the first key always kept."""
    lengths = torch.randint(1, length + 1, (batch,), device=device)
    mask = torch.arange(length, device=device) >= lengths[:, None]
    if kind == "bool":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float64, device=device).masked_fill(mask, float("-inf"))


def random_attn_mask(L, S_, kind="bool"):
    mask = torch.rand(L, S_) < 0.3
    mask[:, 0] = False
    if kind == "bool":
        return mask
    return torch.randn(L, S_, dtype=torch.float64).masked_fill(mask, float("-inf"))


def causal_mask(length, kind="float"):
    mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
    return mask.isinf() if kind == "bool" else mask


def encoder_inputs(masks, batch_first, batched=True):
    inputs = {"src": seq(S, batch_first, batched)}
    if masks == "padding":
        inputs["src_key_padding_mask"] = padding_mask(S) if batched else padding_mask(S, batch=1)[0]
    elif masks == "both":
        inputs["src_key_padding_mask"] = padding_mask(S, "float")
        inputs["src_mask"] = random_attn_mask(S, S, "bool")
    elif masks == "causal":
        inputs["src_mask"] = causal_mask(S, "bool")
    return inputs


def encoder_layer_call(is_causal=False):
    def call(module, t):
        return (module(t["src"], src_mask=t.get("src_mask"),
                       src_key_padding_mask=t.get("src_key_padding_mask"), is_causal=is_causal),)

    return call


@pytest.mark.parametrize("masks", [None, "padding", "both", "causal"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_encoder_layer(batch_first, norm_first, activation, masks):
    reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                **layer_kwargs(batch_first=batch_first, norm_first=norm_first,
                                               activation=activation))
    inputs = encoder_inputs(masks, batch_first)
    check_against_torch(reference, ours, inputs, encoder_layer_call(is_causal=masks == "causal"))


@pytest.mark.parametrize("activation, fused_name", [
    (F.gelu, "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu"), (nn.ReLU(), "relu"),
    (F.softplus, None)], ids=["F.gelu", "GELU-tanh", "SiLU", "ReLU", "softplus"])
def test_encoder_layer_activations(activation, fused_name, monkeypatch):
    """Callables the MLP fuses run fused; any other runs in torch ops (softplus here)."""
    fused_calls = []
    original = fused_transformer.mlp
    monkeypatch.setattr(fused_transformer, "mlp",
                        lambda *a, **k: fused_calls.append(a[5]) or original(*a, **k))
    reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                **layer_kwargs(batch_first=True, activation=activation))
    check_against_torch(reference, ours, encoder_inputs("padding", True), encoder_layer_call())
    assert fused_calls == ([] if fused_name is None else [fused_name])


class LeakyReLU(nn.ReLU):
    """A subclass with its own forward: not the ReLU the MLP fuses."""

    def forward(self, x):
        return F.leaky_relu(x, 0.1)


class ScaledLinear(nn.Linear):
    """A Linear with its own forward, as LoRA or quantized linears have."""

    def forward(self, x):
        return 1.5 * super().forward(x)


def _replace_linear1(layer):
    layer.linear1 = ScaledLinear(D_MODEL, D_FF)


SUBMODULE_CHANGES = {
    "linear1_forward_hook": lambda layer: layer.linear1.register_forward_hook(lambda m, args, out: 0.5 * out),
    "linear2_pre_hook": lambda layer: layer.linear2.register_forward_pre_hook(lambda m, args: (2.0 * args[0],)),
    "spectral_norm": lambda layer: nn.utils.spectral_norm(layer.linear1),
    "activation_subclass": lambda layer: setattr(layer, "activation", LeakyReLU()),
    "linear_subclass": _replace_linear1,
    "identity_dropout": lambda layer: setattr(layer, "dropout", nn.Identity()),
}


@pytest.mark.parametrize("change", list(SUBMODULE_CHANGES))
def test_feed_forward_calls_changed_submodules(change, monkeypatch):
    """A layer whose feed-forward submodules compute something else than nn.Linear / ReLU / nn.Dropout (hooks,
    spectral_norm's pre-hook, subclasses, a replaced dropout) calls them, as torch's layer does, instead of
    the fused MLP; outputs and every gradient (spectral_norm's weight_orig too) equal torch's."""
    fused_calls = []
    original = fused_transformer.mlp
    monkeypatch.setattr(fused_transformer, "mlp", lambda *a, **k: fused_calls.append(a[5]) or original(*a, **k))
    reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                **layer_kwargs(batch_first=True))
    for layer in (reference, ours):
        SUBMODULE_CHANGES[change](layer)
    ours.load_state_dict(reference.state_dict())
    results = check_against_torch(reference.eval(), ours.eval(), encoder_inputs("padding", True),
                                  encoder_layer_call())
    assert fused_calls == []
    if change == "spectral_norm":
        assert "grad linear1.weight_orig" in results


def test_feed_forward_with_a_global_forward_hook_calls_the_linears():
    """A global module hook (torch.nn.modules.module.register_module_forward_hook, as profilers register)
    sees the feed-forward's linears run, as in torch's layer."""
    reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                **layer_kwargs(batch_first=True))
    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(m))
    try:
        for layer in (reference, ours):
            seen.clear()
            layer(torch.randn(N, S, D_MODEL))
            assert layer.linear1 in seen and layer.linear2 in seen
    finally:
        handle.remove()


def test_encoder_layer_unbatched_and_without_bias():
    for kwargs, batched in (({}, False), ({"bias": False}, True)):
        reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                    **layer_kwargs(batch_first=True, **kwargs))
        check_against_torch(reference, ours, encoder_inputs("padding", True, batched), encoder_layer_call())


def test_encoder_layer_under_autocast(monkeypatch):
    """Under autocast (CPU, bfloat16) the fused MLP runs in the autocast dtype, as torch's linears do."""
    dtypes = []
    original = fused_transformer.mlp
    def recording_mlp(*args, **kwargs):
        out = original(*args, **kwargs)
        dtypes.append(out.dtype)  # the dtype it computed in: its inputs' after autocast
        return out

    monkeypatch.setattr(fused_transformer, "mlp", recording_mlp)
    reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                **layer_kwargs(batch_first=True, activation="gelu"))

    def call(module, t):
        autocast = next(module.parameters()).dtype == torch.float32  # the float64 oracle runs without
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return (module(t["src"], src_key_padding_mask=t["src_key_padding_mask"]),)

    check_against_torch(reference, ours, encoder_inputs("padding", True), call)
    assert dtypes == [torch.bfloat16]


def test_encoder_layer_dropout(monkeypatch):
    """Dropout (attention weights, MLP hidden, residuals) only in training, repeatable under manual_seed: the
    attention kernel and the fused MLP get p in training and 0 in eval, and the residual dropouts run in the
    layer's mode."""
    reference, ours = make_pair(nn.TransformerEncoderLayer, TransformerEncoderLayer,
                                **layer_kwargs(batch_first=True, dropout=0.3))
    seen = []
    attend, fused_mlp = tfm_kernels.attention.scaled_dot_product_attention, fused_transformer.mlp
    monkeypatch.setattr(tfm_kernels.attention, "scaled_dot_product_attention",
                        lambda *a, **k: seen.append(("attention", k["dropout_p"])) or attend(*a, **k))
    monkeypatch.setattr(fused_transformer, "mlp", lambda *a, **k: seen.append(("mlp", a[6])) or fused_mlp(*a, **k))
    for name in ("dropout1", "dropout2"):
        getattr(ours, name).register_forward_hook(lambda m, args, out, name=name: seen.append((name, m.training)))
    src = torch.randn(N, S, D_MODEL)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(ours(src))
    torch.testing.assert_close(runs[0], runs[1])
    assert sorted(set(seen)) == [("attention", 0.3), ("dropout1", True), ("dropout2", True), ("mlp", 0.3)]
    seen.clear()
    ours.eval()
    reference.eval()
    with torch.no_grad():
        evaluated = ours(src)
        torch.testing.assert_close(evaluated, reference(src))
    assert sorted(set(seen)) == [("attention", 0.0), ("dropout1", False), ("dropout2", False), ("mlp", 0.0)]
    assert (runs[0] - evaluated).abs().max() > 0.1


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_activation_checkpointing_repeats_the_dropout_masks(backend):
    """torch.utils.checkpoint recomputes the layer in backward: the kernels redraw the same dropout masks from
    the restored generator, so output and every gradient equal those of the plain run, bit for bit."""
    layer = TransformerEncoderLayer(**layer_kwargs(batch_first=True, dropout=0.3), backend=backend)
    src = torch.randn(N, S, D_MODEL, requires_grad=True)
    require_mlp(backend, src, layer.linear1.weight)
    leaves = [src, *layer.parameters()]
    results = []
    for run in (layer, lambda x: torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)):
        torch.manual_seed(11)
        out = run(src)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for plain, checkpointed in zip(*results):
        assert torch.equal(plain, checkpointed)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradient_penalty_as_torch(backend):
    """A gradient penalty on the input (|d out / d src|^2, as in WGAN-GP) through an encoder layer with padding
    and a causal mask: its gradients by src and every parameter against torch's layer in float64 (tolerance
    rule; torch's runs on its math SDPA, whose backward is differentiable)."""
    kwargs = layer_kwargs(batch_first=True, norm_first=True)
    reference = randomize_parameters(nn.TransformerEncoderLayer(**kwargs))
    ours = TransformerEncoderLayer(**kwargs, backend=backend)
    ours.load_state_dict(reference.state_dict())
    src = seq(S, batch_first=True)
    require_mlp(backend, src.float(), ours.linear1.weight)
    masks = {"src_mask": causal_mask(S, "bool"), "src_key_padding_mask": padding_mask(S)}
    probe = torch.randn(N, S, D_MODEL, dtype=torch.float64)

    def penalty_gradients(layer, dtype):
        x = src.to(dtype).requires_grad_()
        out = layer(x, **masks)
        (grad_x,) = torch.autograd.grad((out * probe.to(dtype)).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), [x, *layer.parameters()], allow_unused=True,
                                   materialize_grads=True)

    with sdpa_kernel(SDPBackend.MATH):
        baseline = penalty_gradients(reference, torch.float32)
        oracle = penalty_gradients(copy.deepcopy(reference).double(), torch.float64)
    names = ["src", *(name for name, _ in reference.named_parameters())]
    for name, result, base, ref in zip(names, penalty_gradients(ours, torch.float32), baseline, oracle):
        assert_within_tolerance(f"{backend} penalty gradient of {name}", result, base, ref)


def decoder_inputs(masks, batch_first):
    inputs = {"tgt": seq(T, batch_first), "memory": seq(S, batch_first)}
    if masks == "causal":
        inputs["tgt_mask"] = causal_mask(T)
        inputs["memory_key_padding_mask"] = padding_mask(S)
    elif masks == "all":
        inputs["tgt_mask"] = random_attn_mask(T, T, "float")
        inputs["memory_mask"] = random_attn_mask(T, S, "bool")
        inputs["tgt_key_padding_mask"] = padding_mask(T, "float")
        inputs["memory_key_padding_mask"] = padding_mask(S, "bool")
    return inputs


def decoder_call(tgt_is_causal=False):
    def call(module, t):
        return (module(t["tgt"], t["memory"], tgt_mask=t.get("tgt_mask"), memory_mask=t.get("memory_mask"),
                       tgt_key_padding_mask=t.get("tgt_key_padding_mask"),
                       memory_key_padding_mask=t.get("memory_key_padding_mask"),
                       tgt_is_causal=tgt_is_causal),)

    return call


@pytest.mark.parametrize("masks", [None, "causal", "all"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_decoder_layer(batch_first, norm_first, masks):
    reference, ours = make_pair(nn.TransformerDecoderLayer, TransformerDecoderLayer,
                                **layer_kwargs(batch_first=batch_first, norm_first=norm_first,
                                               activation="gelu"))
    check_against_torch(reference, ours, decoder_inputs(masks, batch_first), decoder_call(masks == "causal"))


def stack_pair(kind, batch_first, norm_first=False, layers=2, nhead=NHEAD):
    """torch's TransformerEncoder/Decoder (random weights) and ours, built from our layer, loaded from it."""
    torch_layer, fused_layer, torch_stack, fused_stack = {
        "encoder": (nn.TransformerEncoderLayer, TransformerEncoderLayer, nn.TransformerEncoder,
                    TransformerEncoder),
        "decoder": (nn.TransformerDecoderLayer, TransformerDecoderLayer, nn.TransformerDecoder,
                    TransformerDecoder),
    }[kind]
    kwargs = layer_kwargs(batch_first=batch_first, norm_first=norm_first, nhead=nhead)
    reference = randomize_parameters(torch_stack(torch_layer(**kwargs), layers, norm=nn.LayerNorm(D_MODEL)))
    ours = fused_stack(fused_layer(**kwargs), layers, norm=nn.LayerNorm(D_MODEL))
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("masks", [None, "padding", "both", "causal"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_encoder(batch_first, masks):
    """is_causal=None detects the causal mask (a bool one too), so the kernels run causal attention."""
    reference, ours = stack_pair("encoder", batch_first)

    def call(module, t):
        return (module(t["src"], mask=t.get("src_mask"), src_key_padding_mask=t.get("src_key_padding_mask")),)

    check_against_torch(reference, ours, encoder_inputs(masks, batch_first), call)


def test_encoder_detects_causal_masks(monkeypatch):
    seen = []
    original = tfm_kernels.attention.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((kwargs["is_causal"], kwargs["attn_mask"] is None))
        return original(*args, **kwargs)

    monkeypatch.setattr(tfm_kernels.attention, "scaled_dot_product_attention", recording)
    _, ours = stack_pair("encoder", True)
    src = torch.randn(N, S, D_MODEL)
    for kind in ("bool", "float"):
        ours(src, mask=causal_mask(S, kind).float() if kind == "float" else causal_mask(S, kind))
    ours(src, mask=random_attn_mask(S, S))
    assert seen == [(True, True)] * 4 + [(False, False)] * 2


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_decoder(batch_first):
    reference, ours = stack_pair("decoder", batch_first, norm_first=True)
    check_against_torch(reference, ours, decoder_inputs("causal", batch_first), decoder_call())


def test_inference_runs_the_kernels_without_torch_fast_paths(monkeypatch):
    """In eval mode without grad torch's encoder runs `_transformer_encoder_layer_fwd` on nested tensors; ours
    runs the kernels and agrees with torch, the 0 that torch's nested path writes at padded positions
    included."""
    calls = {"attention": 0, "mlp": 0}
    original_attention = tfm_kernels.attention.scaled_dot_product_attention
    original_mlp = fused_transformer.mlp

    def count(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    monkeypatch.setattr(tfm_kernels.attention, "scaled_dot_product_attention", count("attention",
                                                                                       original_attention))
    monkeypatch.setattr(fused_transformer, "mlp", count("mlp", original_mlp))
    reference, ours = stack_pair("encoder", batch_first=True, layers=3, nhead=2)  # torch nests even head counts
    reference.eval()
    ours.eval()
    src = torch.randn(N, S, D_MODEL)
    kpm = torch.arange(S) >= torch.tensor([S, 3])[:, None]  # (N, S), True = padding
    with torch.inference_mode():
        expected = reference(src, src_key_padding_mask=kpm)
        out = ours(src, src_key_padding_mask=kpm)
    assert calls == {"attention": 3, "mlp": 3}
    with torch.inference_mode():  # torch took its nested-tensor path: 0 at padded positions before the norm
        assert (expected[kpm] == reference.norm(torch.zeros(D_MODEL))).all()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_inference_with_a_source_padding_mask_as_torchs(norm_first):
    """nn.Transformer in inference with src_key_padding_mask alone: the decoder's cross-attention reads every
    encoder position, the padded ones included, so they must hold what torch's nested-tensor encoder leaves
    there (0 before the final norm). A padding mask that is not left-aligned, grad enabled, or norm_first
    keeps torch off that path, and ours then computes the padded positions as torch does."""
    torch.manual_seed(0)
    kwargs = dict(d_model=D_MODEL, nhead=2, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=D_FF,
                  dropout=0.0, batch_first=True, norm_first=norm_first)
    reference = nn.Transformer(**kwargs).eval()
    ours = Transformer(**kwargs).eval()
    ours.load_state_dict(reference.state_dict())
    src, tgt = torch.randn(N, S, D_MODEL), torch.randn(N, 5, D_MODEL)
    left_aligned = torch.arange(S) >= torch.tensor([S - 2, 3])[:, None]  # (N, S), True = padding
    not_left_aligned = left_aligned.flip(-1)
    for kpm, grad in ((left_aligned, False), (left_aligned.float().masked_fill(left_aligned, float("-inf")), False),
                      (not_left_aligned, False), (left_aligned, True)):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(ours(src, tgt, src_key_padding_mask=kpm),
                                       reference(src, tgt, src_key_padding_mask=kpm))


def test_same_initial_weights_and_state_dict_as_torch():
    kwargs = {"d_model": D_MODEL, "nhead": NHEAD, "num_encoder_layers": 2, "num_decoder_layers": 1,
              "dim_feedforward": D_FF}
    torch.manual_seed(0)
    theirs = nn.Transformer(**kwargs)
    torch.manual_seed(0)
    ours = Transformer(**kwargs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    back = nn.Transformer(**kwargs)
    back.load_state_dict(ours.state_dict())
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(**layer_kwargs())
    torch.manual_seed(0)
    torch_layer = nn.TransformerEncoderLayer(**layer_kwargs())
    for name, tensor in torch_layer.state_dict().items():
        assert torch.equal(layer.state_dict()[name], tensor), name
    assert all(type(m) is MultiheadAttention for m in ours.modules() if isinstance(m, nn.MultiheadAttention))
    assert all(type(m).__module__.startswith("tfm_kernels") for m in ours.modules()
               if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)))


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_transformer(batch_first):
    kwargs = {"d_model": D_MODEL, "nhead": NHEAD, "num_encoder_layers": 2, "num_decoder_layers": 2,
              "dim_feedforward": D_FF, "dropout": 0.0, "batch_first": batch_first, "activation": "gelu"}
    reference, ours = make_pair(nn.Transformer, Transformer, **kwargs)
    inputs = {"src": seq(S, batch_first), "tgt": seq(T, batch_first), "tgt_mask": causal_mask(T),
              "src_key_padding_mask": padding_mask(S), "memory_key_padding_mask": padding_mask(S)}

    def call(module, t):
        return (module(t["src"], t["tgt"], tgt_mask=t["tgt_mask"],
                       src_key_padding_mask=t["src_key_padding_mask"],
                       memory_key_padding_mask=t["memory_key_padding_mask"]),)

    check_against_torch(reference, ours, inputs, call)


def test_meta_device_training_forward_gives_torchs_shapes():
    """Shape-only runs on the meta device (memory planning, deferred initialisation), in training mode with
    dropout, as torch's modules allow."""
    kwargs = {"d_model": D_MODEL, "nhead": NHEAD, "num_encoder_layers": 1, "num_decoder_layers": 1,
              "dim_feedforward": D_FF, "dropout": 0.1, "batch_first": True}
    with torch.device("meta"):
        src, tgt = torch.randn(N, S, D_MODEL), torch.randn(N, T, D_MODEL)
        expected = nn.Transformer(**kwargs)(src, tgt)
        out = Transformer(**kwargs)(src, tgt)
    assert out.device.type == "meta" and out.shape == expected.shape == (N, T, D_MODEL)


def test_torch_layers_given_to_our_containers_become_ours():
    encoder = TransformerEncoder(nn.TransformerEncoderLayer(**layer_kwargs()), 2)
    decoder = TransformerDecoder(nn.TransformerDecoderLayer(**layer_kwargs()), 2)
    assert all(type(layer) is TransformerEncoderLayer for layer in encoder.layers)
    assert all(type(layer) is TransformerDecoderLayer for layer in decoder.layers)
    assert all(type(layer.multihead_attn) is MultiheadAttention for layer in decoder.layers)


def test_decoder_layer_compiles_in_one_graph():
    """torch.compile(fullgraph=True): both attentions and the fused MLP trace without graph breaks."""
    layer = TransformerDecoderLayer(**layer_kwargs(batch_first=True, norm_first=True))
    tgt, memory = torch.randn(N, T, D_MODEL, requires_grad=True), torch.randn(N, S, D_MODEL)
    tgt_mask, memory_padding = causal_mask(T).float(), padding_mask(S)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outs = [module(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_padding, tgt_is_causal=True)
            for module in (layer, compiled)]
    torch.testing.assert_close(outs[1], outs[0])
    grads = [torch.autograd.grad(out.square().sum(), tgt)[0] for out in outs]
    torch.testing.assert_close(grads[1], grads[0])


def test_bad_input():
    with pytest.raises(ValueError, match="d_model must be divisible by nhead; got d_model=10 and nhead=3"):
        TransformerEncoderLayer(10, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        TransformerDecoderLayer(D_MODEL, NHEAD, backend="nope")
    layer = TransformerEncoderLayer(**layer_kwargs(batch_first=True))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 6\)"):
        layer(torch.randn(N, S, D_MODEL), src_key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(6, 6\) or \(6, 6, 6\)"):
        layer(torch.randn(N, S, D_MODEL), src_mask=torch.zeros(S, S - 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="is_causal=True is a hint"):
        layer(torch.randn(N, S, D_MODEL), is_causal=True)


@pytest.mark.gpu
def test_gpu_encoder_bf16():
    """A 2-layer encoder at d 1024, 16 heads, bf16 on the GPU (seq 256 keeps the float64 oracle quick)."""
    d_model, heads, seq_len = 1024, 16, 256
    kwargs = {"d_model": d_model, "nhead": heads, "dim_feedforward": 4 * d_model, "dropout": 0.0,
              "batch_first": True, "device": "cuda", "dtype": torch.bfloat16}
    reference = randomize_parameters(nn.TransformerEncoder(nn.TransformerEncoderLayer(**kwargs), 2))
    ours = TransformerEncoder(TransformerEncoderLayer(**kwargs), 2)
    ours.load_state_dict(reference.state_dict())
    inputs = {"src": seq(seq_len, True, device="cuda", d_model=d_model),
              "src_mask": nn.Transformer.generate_square_subsequent_mask(seq_len, device="cuda")}

    def call(module, t):
        return (module(t["src"], mask=t["src_mask"], is_causal=True),)

    check_against_torch(reference, ours, inputs, call, torch.bfloat16)


@pytest.mark.parametrize("make, call", [
    (lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=1.0, batch_first=True), lambda m, x: m(x)),
    (lambda: nn.MultiheadAttention(16, 2, dropout=1.0, batch_first=True),
     lambda m, x: m(x, x, x, need_weights=False)[0]),
], ids=["encoder-layer", "multihead-attention"])
def test_dropout_of_one_zeroes_what_it_drops_as_torch(make, call):
    """torch's modules take dropout=1.0 (what it applies to becomes zero in training); the kernels take dropout in
    [0, 1), so ours compute those parts in torch ops: the same outputs and gradients as torch's."""
    torch.manual_seed(0)
    reference = make()
    ours = copy.deepcopy(reference)
    tfm_kernels.patch(ours)
    x = torch.randn(2, 5, 16, requires_grad=True)
    expected, out = call(reference, x), call(ours, x)
    torch.testing.assert_close(out, expected)
    expected_grads = torch.autograd.grad(expected.sum(), [x, *reference.parameters()])
    grads = torch.autograd.grad(out.sum(), [x, *ours.parameters()])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def _captured_self_attention(layer, captured):
    """`layer._sa_block`, overridden on the instance, that keeps the attention weights, as users capture them."""

    def sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        out, weights = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                      need_weights=True)
        captured.append(weights)
        return self.dropout1(out)

    layer._sa_block = sa_block.__get__(layer)


def test_overridden_blocks_run_as_in_torch():
    """The layers run their blocks through _sa_block, _mha_block and _ff_block, as torch's: a subclass
    that overrides one, and an instance given its own before patch(), run it."""

    def halved_ff(cls):
        return type(f"Halved{cls.__name__}", (cls,), {"_ff_block": lambda self, x: 0.5 * cls._ff_block(self, x)})

    def zero_cross(cls):
        return type(f"NoCross{cls.__name__}", (cls,), {"_mha_block": lambda self, x, mem, *a, **k: 0 * x})

    reference, ours = make_pair(halved_ff(nn.TransformerEncoderLayer), halved_ff(TransformerEncoderLayer),
                                **layer_kwargs(batch_first=True))
    check_against_torch(reference, ours, encoder_inputs("padding", True), encoder_layer_call())
    reference, ours = make_pair(zero_cross(nn.TransformerDecoderLayer), zero_cross(TransformerDecoderLayer),
                                **layer_kwargs(batch_first=True))
    src, tgt = torch.randn(N, S, D_MODEL), torch.randn(N, T, D_MODEL)
    assert_within_tolerance("out", ours(tgt, src), reference(tgt, src), copy.deepcopy(reference).double()(
        tgt.double(), src.double()).float())
    layer = randomize_parameters(nn.TransformerEncoderLayer(**layer_kwargs(batch_first=True))).eval()
    captured = []
    _captured_self_attention(layer, captured)
    src, padding = torch.randn(N, S, D_MODEL), padding_mask(S)
    expected = layer(src, src_key_padding_mask=padding)
    tfm_kernels.patch(layer)
    assert type(layer) is TransformerEncoderLayer
    assert_within_tolerance("out", layer(src, src_key_padding_mask=padding), expected,
                            copy.deepcopy(layer).double()(src.double(), src_key_padding_mask=padding).float())
    assert len(captured) == 3 and torch.equal(captured[1], captured[0])


class _PaddingLayer(nn.Module):
    """A user's encoder layer that reads src_key_padding_mask as a number, as torch's encoder hands it over (with
    the self_attn torch's encoder looks at)."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(D_MODEL, NHEAD, batch_first=True)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        self.seen = (src_mask, src_key_padding_mask)
        return src + src_key_padding_mask.clamp(min=-1.0)[..., None]


def test_encoder_gives_other_layers_torchs_float_masks():
    """Layers other than ours get both masks from our encoder as from torch's: float, -inf where masked."""
    padding = padding_mask(S)
    src_mask = torch.ones(S, S, dtype=torch.bool).triu(1)  # causal, detected as such
    src = torch.randn(N, S, D_MODEL)
    reference = nn.TransformerEncoder(_PaddingLayer(), 2, enable_nested_tensor=False)
    ours = TransformerEncoder(_PaddingLayer(), 2, enable_nested_tensor=False)
    assert torch.equal(ours(src, mask=src_mask, src_key_padding_mask=padding),
                       reference(src, mask=src_mask, src_key_padding_mask=padding))
    for mine, theirs in zip(ours.layers[0].seen, reference.layers[0].seen):
        assert mine.dtype == theirs.dtype == torch.float32 and torch.equal(mine, theirs)
