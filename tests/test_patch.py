"""tfm_kernels.patch / unpatch: in-place conversion of nn.Transformer, of the model of PyTorch's
language-modeling tutorial and of a user's model; weights, hooks and modes kept; the kernels run; training
follows the same loss curve as torch's modules; torch.compile agrees with eager."""

import copy
import math

import pytest
import torch
from nn_check import check_against_torch, randomize_parameters
from tolerance import assert_within_tolerance
from torch import nn

import tfm_kernels
import tfm_kernels.nn.transformer as fused_transformer
from tfm_kernels import nn as fused_nn

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def patched_copy(model, **kwargs):
    ours = copy.deepcopy(model)
    tfm_kernels.patch(ours, **kwargs)
    return ours


def small_transformer(**kwargs):
    kwargs = {"d_model": 24, "nhead": 3, "num_encoder_layers": 2, "num_decoder_layers": 2,
              "dim_feedforward": 40, "dropout": 0.0, **kwargs}
    return randomize_parameters(nn.Transformer(**kwargs))


class PositionalEncoding(nn.Module):
    """Adds fixed sinusoids to (S, N, E) embeddings, then dropout."""

    def __init__(self, d_model, dropout, max_len=512):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
        even = torch.arange(0, d_model, 2, dtype=torch.float32)  # (E / 2,)
        frequency = torch.exp(even * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, 1, d_model)
        table[:, 0, 0::2] = torch.sin(position * frequency)
        table[:, 0, 1::2] = torch.cos(position * frequency)
        self.register_buffer("table", table)

    def forward(self, x):
        return self.dropout(x + self.table[: x.shape[0]])


class TutorialLanguageModel(nn.Module):
    """The model of PyTorch's language-modeling tutorial: embedding, positional encoding, an
    nn.TransformerEncoder of 2 layers (d_model 200, 2 heads of dim 100, feed-forward 200) and a linear head;
    inputs (S, N) token ids."""

    def __init__(self, vocab=50, d_model=200, nhead=2, d_hid=200, nlayers=2, dropout=0.2):
        super().__init__()
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab, d_model)
        self.pos_encoder = PositionalEncoding(d_model, dropout)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers)
        self.linear = nn.Linear(d_model, vocab)

    def forward(self, src, src_mask=None):
        x = self.pos_encoder(self.embedding(src) * math.sqrt(self.d_model))  # (S, N, E)
        return self.linear(self.transformer_encoder(x, src_mask))  # (S, N, vocab)


class TaggedAttention(nn.MultiheadAttention):
    """A user's subclass of nn.MultiheadAttention: patch leaves it alone."""


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 24)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        block = nn.TransformerEncoderLayer(24, 4, 48, 0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.ModuleList([block])
        self.tagged = TaggedAttention(24, 2, batch_first=True)

    def forward(self, x, key_padding_mask):
        h = self.proj(x)
        h = h + self.attn(h, h, h, key_padding_mask=key_padding_mask)[0]  # need_weights=True: explicit path
        for block in self.blocks:
            h = block(h, src_key_padding_mask=key_padding_mask)
        return h + self.tagged(h, h, h, need_weights=False)[0]


def count_kernel_calls(monkeypatch):
    calls = {"attention": 0, "mlp": 0}
    originals = {"attention": tfm_kernels.attention.scaled_dot_product_attention,
                 "mlp": fused_transformer.mlp}

    def counted(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return call

    monkeypatch.setattr(tfm_kernels.attention, "scaled_dot_product_attention", counted("attention"))
    monkeypatch.setattr(fused_transformer, "mlp", counted("mlp"))
    return calls


def test_patch_transformer_in_place():
    model = small_transformer()
    model.decoder.eval()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.encoder.layers[0].self_attn
    fired = []
    attention.register_forward_hook(lambda module, args, out: fired.append(type(module).__name__))

    report = tfm_kernels.patch(model)

    names = [name for name, _, _ in report.swapped]
    assert names == ["", "encoder", "encoder.layers.0", "encoder.layers.0.self_attn", "encoder.layers.1",
                     "encoder.layers.1.self_attn", "decoder", "decoder.layers.0",
                     "decoder.layers.0.self_attn", "decoder.layers.0.multihead_attn", "decoder.layers.1",
                     "decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"]
    assert report.skipped == []
    assert "encoder.layers.0.self_attn: torch.nn.modules.activation.MultiheadAttention -> " \
           "tfm_kernels.nn.attention.MultiheadAttention" in str(report)
    assert type(model) is fused_nn.Transformer and model.encoder.layers[0].self_attn is attention
    assert type(attention) is fused_nn.MultiheadAttention and attention.backend == "auto"
    assert all(p is params[name] for name, p in model.named_parameters())  # shared, not copied
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and model.encoder.training and not model.decoder.training
    assert not model.decoder.layers[1].multihead_attn.training
    model(torch.randn(6, 2, 24), torch.randn(5, 2, 24))
    assert fired == ["MultiheadAttention"] and type(attention).__module__ == "tfm_kernels.nn.attention"

    assert tfm_kernels.patch(model).swapped == []  # already patched
    back = tfm_kernels.unpatch(model)
    assert [name for name, _, _ in back.swapped] == names
    assert type(model) is nn.Transformer and type(attention) is nn.MultiheadAttention
    assert "backend" not in vars(attention)
    assert all(p is params[name] for name, p in model.named_parameters())


def test_patch_backend_and_bad_backend():
    model = nn.MultiheadAttention(24, 3)
    tfm_kernels.patch(model, backend="torch")
    assert model.backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        tfm_kernels.patch(nn.Transformer(24, 3, 1, 1, 40), backend="fastest")


def test_patched_transformer_matches_torch(monkeypatch):
    model = small_transformer(batch_first=True)
    ours = patched_copy(model)
    calls = count_kernel_calls(monkeypatch)
    inputs = {"src": torch.randn(2, 6, 24, dtype=torch.float64),
              "tgt": torch.randn(2, 5, 24, dtype=torch.float64),
              "tgt_mask": nn.Transformer.generate_square_subsequent_mask(5)}

    def call(module, t):
        return (module(t["src"], t["tgt"], tgt_mask=t["tgt_mask"]),)

    check_against_torch(model, ours, inputs, call)
    assert calls == {"attention": 2 + 2 * 2, "mlp": 2 + 2}  # ours ran once: 2 encoder, 2x2 decoder attentions


def test_patched_transformer_trains_like_torch():
    """Five SGD steps: the loss curve of the patched float32 model against torch's in float32 (baseline) and
    in float64 (oracle), under the tolerance rule; the trained weights too."""
    model = small_transformer()
    ours = patched_copy(model)
    oracle = copy.deepcopy(model).double()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 24, generator=generator, dtype=torch.float64),
                torch.randn(5, 3, 24, generator=generator, dtype=torch.float64),
                torch.randn(5, 3, 24, generator=generator, dtype=torch.float64)) for _ in range(5)]
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    def train(module, dtype):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        losses = []
        for src, tgt, target in batches:
            out = module(src.to(dtype), tgt.to(dtype), tgt_mask=causal.to(dtype))
            loss = nn.functional.mse_loss(out, target.to(dtype))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    ours_losses, torch_losses, oracle_losses = train(ours, torch.float32), train(model, torch.float32), \
        train(oracle, torch.float64)
    assert oracle_losses[-1] < oracle_losses[0]  # it learns
    assert_within_tolerance("loss curve", ours_losses, torch_losses, oracle_losses)
    for (name, p), q, r in zip(ours.named_parameters(), model.parameters(), oracle.parameters()):
        assert_within_tolerance(name, p.detach(), q.detach(), r.detach())


def test_tutorial_language_model(monkeypatch):
    """d_model 200, 2 heads of dim 100, causal mask, as in the tutorial; dropout off (eval) to compare."""
    model = randomize_parameters(TutorialLanguageModel()).eval()
    ours = patched_copy(model)
    assert type(ours.transformer_encoder) is fused_nn.TransformerEncoder
    calls = count_kernel_calls(monkeypatch)
    inputs = {"tokens": torch.randint(0, 50, (35, 3)),
              "mask": nn.Transformer.generate_square_subsequent_mask(35)}

    def call(module, t):
        return (module(t["tokens"], t["mask"]),)

    check_against_torch(model, ours, inputs, call)
    assert calls == {"attention": 2, "mlp": 2}


class OwnAttention(fused_nn.MultiheadAttention):
    """A user's subclass of our MultiheadAttention."""


def test_subclasses_of_ours_are_neither_swapped_nor_skipped():
    """A subclass of our class runs our kernels already: patch leaves it alone and does not report it as a
    torch subclass it skipped."""
    model = nn.Sequential(OwnAttention(16, 2), nn.MultiheadAttention(16, 2))
    report = tfm_kernels.patch(model)
    assert [name for name, _, _ in report.swapped] == ["1"]
    assert report.skipped == []
    assert type(model[0]) is OwnAttention


def test_user_model():
    model = randomize_parameters(UserModel())
    ours = copy.deepcopy(model)
    report = tfm_kernels.patch(ours)
    assert [name for name, _, _ in report.swapped] == ["attn", "blocks.0", "blocks.0.self_attn"]
    assert [name for name, _ in report.skipped] == ["tagged"]
    assert "TaggedAttention subclasses torch.nn.modules.activation.MultiheadAttention" in report.skipped[0][1]
    assert type(ours.tagged) is TaggedAttention
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True

    def call(module, t):
        return (module(t["x"], padding),)

    check_against_torch(model, ours, {"x": torch.randn(2, 7, 16, dtype=torch.float64)}, call)


class MyEncoder(nn.TransformerEncoder):
    """A user's subclass of nn.TransformerEncoder with torch's forward: patch skips it but swaps its layers."""


def _patched_layers_only(layer):
    encoder = nn.TransformerEncoder(layer, 2)
    tfm_kernels.patch(encoder.layers)
    return encoder


@pytest.mark.parametrize("build", [
    lambda layer: patched_copy(MyEncoder(layer, 2)),
    _patched_layers_only,
    lambda layer: nn.TransformerEncoder(fused_nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True), 2),
], ids=["patched-layers-of-a-user-encoder", "patched-layers-only", "our-layer-in-torchs-encoder"])
def test_our_layers_take_the_nested_tensor_of_torchs_encoder(monkeypatch, build):
    """In inference with a padding mask, torch's TransformerEncoder hands its layers a nested tensor: our layers
    inside it (patched or built so) give torch's output, on the kernels."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, 0.0, batch_first=True)
    torch_encoder = nn.TransformerEncoder(layer, 2).eval()
    model = build(layer)
    model.load_state_dict(torch_encoder.state_dict())
    model.eval()
    calls = count_kernel_calls(monkeypatch)
    x = torch.randn(2, 5, 16)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        expected, out = torch_encoder(x, src_key_padding_mask=padding), model(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert calls == {"attention": 2, "mlp": 2}


class Halved(nn.Module):
    def forward(self, weight):
        return 0.5 * weight


def test_patch_keeps_parametrizations():
    """A parametrized MultiheadAttention (torch.nn.utils.parametrize gives it a generated subclass) is converted
    with its parametrization, which keeps acting; unpatch and remove_parametrizations undo each part."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 2, batch_first=True)
    parametrize.register_parametrization(reference, "in_proj_weight", Halved())
    model = nn.Sequential(copy.deepcopy(reference))
    report = tfm_kernels.patch(model)
    assert [(name, old) for name, old, _ in report.swapped] == [("0", "torch.nn.modules.activation.MultiheadAttention")]
    assert isinstance(model[0], fused_nn.MultiheadAttention) and parametrize.is_parametrized(model[0])
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(model[0](x, x, x, need_weights=False)[0], reference(x, x, x, need_weights=False)[0])
    assert tfm_kernels.unpatch(model).swapped[0][2] == "torch.nn.modules.activation.MultiheadAttention"
    assert type(model[0]).__bases__ == (nn.MultiheadAttention,)
    tfm_kernels.patch(model)
    parametrize.remove_parametrizations(model[0], "in_proj_weight")
    assert type(model[0]) is fused_nn.MultiheadAttention
    torch.testing.assert_close(model[0].in_proj_weight, 0.5 * reference.parametrizations.in_proj_weight.original)


def test_modules_whose_forward_is_replaced_on_the_instance_are_skipped():
    """A wrapper library replaces module.forward on the instance: a new class would not reach it, so patch
    and unpatch leave such modules and say why."""
    attention = nn.MultiheadAttention(16, 2)
    attention.forward = lambda *args, original=attention.forward, **kwargs: original(*args, **kwargs)
    report = tfm_kernels.patch(nn.Sequential(attention))
    assert report.swapped == [] and report.skipped[0][0] == "0"
    assert "forward is replaced on the instance" in report.skipped[0][1]
    assert type(attention) is nn.MultiheadAttention
    ours = fused_nn.MultiheadAttention(16, 2)
    ours.forward = lambda *args, original=ours.forward, **kwargs: original(*args, **kwargs)
    assert "forward is replaced on the instance" in tfm_kernels.unpatch(ours).skipped[0][1]
    assert type(ours) is fused_nn.MultiheadAttention


@pytest.mark.parametrize("model, given", [(None, "NoneType"), ([nn.MultiheadAttention(8, 2)], "list"),
                                          (nn.MultiheadAttention, "the class MultiheadAttention")])
def test_patch_and_unpatch_take_a_module(model, given):
    for convert in (tfm_kernels.patch, tfm_kernels.unpatch):
        with pytest.raises(TypeError, match=f"model must be an nn.Module instance .*; got {given}"):
            convert(model)


def test_unpatch_reports_subclasses_of_ours():
    model = nn.Sequential(OwnAttention(16, 2), fused_nn.MultiheadAttention(16, 2))
    report = tfm_kernels.unpatch(model)
    assert [name for name, _, _ in report.swapped] == ["1"]
    assert report.skipped == [("0", f"{OwnAttention.__module__}.OwnAttention subclasses "
                                    "tfm_kernels.nn.attention.MultiheadAttention; left as it is")]


def test_shared_module_is_patched_once():
    attention = nn.MultiheadAttention(24, 3)
    model = nn.ModuleDict({"a": attention, "b": attention})
    report = tfm_kernels.patch(model)
    assert [name for name, _, _ in report.swapped] == ["a"]
    assert type(model["b"]) is fused_nn.MultiheadAttention


def test_torch_compile_of_patched_model_matches_eager():
    model = TutorialLanguageModel(d_model=48, nhead=2, d_hid=64).eval()
    tfm_kernels.patch(model)
    tokens = torch.randint(0, 50, (9, 2))
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    compiled = torch.compile(model, backend="aot_eager")
    eager_out = model(tokens, mask)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled_out = compiled(tokens, mask)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(compiled_out, eager_out)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


def test_jit_trace_and_script_of_patched_model(tmp_path):
    """torch.jit.trace records the kernel operators, also with parameters that require grad (training), and the
    saved trace reloads and computes what the model computes; torch.jit.script refuses our modules with a
    message naming what works, and scripts the model once unpatched."""
    model = TutorialLanguageModel(d_model=48, nhead=2, d_hid=64, dropout=0.0)
    tfm_kernels.patch(model)
    tokens = torch.randint(0, 50, (9, 2))
    mask = nn.Transformer.generate_square_subsequent_mask(9)
    traced = torch.jit.trace(model, (tokens, mask))
    assert "tfm_kernels::attention_forward" in str(traced.inlined_graph)
    torch.jit.save(traced, tmp_path / "model.pt")
    torch.testing.assert_close(torch.jit.load(tmp_path / "model.pt")(tokens, mask), model(tokens, mask))
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile tfm_kernels.nn.transformer."
                                           r"TransformerEncoderLayer: .* tfm_kernels.unpatch\(model\)"):
        torch.jit.script(model)
    tfm_kernels.unpatch(model)
    torch.testing.assert_close(torch.jit.script(model)(tokens, mask), traced(tokens, mask))


@pytest.mark.gpu
def test_gpu_patched_tutorial_model_bf16():
    model = randomize_parameters(TutorialLanguageModel(vocab=1000)).eval().to("cuda", torch.bfloat16)
    ours = patched_copy(model)
    inputs = {"tokens": torch.randint(0, 1000, (256, 4), device="cuda"),
              "mask": nn.Transformer.generate_square_subsequent_mask(256, device="cuda")}

    def call(module, t):
        return (module(t["tokens"], t["mask"]),)

    check_against_torch(model, ours, inputs, call, torch.bfloat16)
