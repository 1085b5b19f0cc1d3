"""The models: configurations, equivalence with PyTorch's own layers, the key/value cache, padding, and that
attention runs on the package's kernels."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from threads import one_thread  # noqa: F401  (fixture)
from tolerance import assert_within_tolerance
from torch.nn.utils import prune

from tfm_kernels.models import (
    EncoderDecoderTransformer,
    KVCache,
    LMConfig,
    Seq2SeqConfig,
    TransformerLM,
    layers,
)
from tfm_kernels.models.baseline import TorchLM, build_torch_lm
from tfm_kernels.models.seq2seq import sinusoidal_positions
from tfm_kernels.nn import mlp as nn_mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_presets_hold_the_published_shapes():
    base = Seq2SeqConfig.preset("base")
    shape = (base.n_encoder_layers, base.n_decoder_layers, base.d_model, base.d_ff, base.n_heads)
    assert shape == (6, 6, 512, 2048, 8)
    assert (base.dropout, base.label_smoothing, base.warmup_steps, base.norm_first) == (0.1, 0.1, 4000, False)
    gpt2 = LMConfig.preset("gpt2-small")
    shape = (gpt2.n_layers, gpt2.d_model, gpt2.n_heads, gpt2.context_length, gpt2.d_ff)
    assert shape == (12, 768, 12, 1024, 3072)
    assert LMConfig.preset("tiny", dropout=0.2).dropout == 0.2
    assert LMConfig.from_dict(gpt2.to_dict()) == gpt2


@pytest.mark.parametrize("make, message", [
    (lambda: LMConfig(d_model=64, n_heads=5), "d_model must be divisible by n_heads"),
    (lambda: LMConfig(n_layers=0), "n_layers must be a positive int; got 0"),
    (lambda: LMConfig(dropout=1.0), "dropout must be a float in [0, 1); got 1.0"),
    (lambda: LMConfig(activation="tanh"), "activation must be one of"),
    (lambda: LMConfig.preset("huge"), "preset must be one of ['gpt2-small', 'tiny']; got 'huge'"),
    (lambda: LMConfig.preset("tiny", width=3), "has no fields ['width']"),
    (lambda: Seq2SeqConfig(pad_id=300), "pad_id must be an int in [0, vocab_size=259); got 300"),
    (lambda: Seq2SeqConfig(bos_id=256), "pad_id, bos_id and eos_id must differ"),
    (lambda: Seq2SeqConfig(label_smoothing=-0.1), "label_smoothing must be a float in [0, 1)"),
    (lambda: Seq2SeqConfig(pad_id=True), "pad_id must be an int in [0, vocab_size=259); got True"),
    (lambda: Seq2SeqConfig(norm_first="False"), "norm_first must be a bool; got 'False'"),
    (lambda: LMConfig(bias="False"), "bias must be a bool; got 'False'"),
])
def test_config_errors_name_the_field(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize("bias", [True, False])
def test_lm_matches_torch_layers_with_the_same_weights(bias):
    """Logits and every gradient of the model on our kernels are within the tolerance rule of the same model
    built from nn.TransformerEncoderLayer, against a float64 run of the latter; with bias=False too (the linear
    layers lose their biases, the LayerNorms keep theirs), with the same parameter count."""
    config = LMConfig.preset("tiny", n_layers=2, context_length=32, bias=bias)
    model = TransformerLM(config)
    baseline = TorchLM(config).copy_weights_from(model)
    assert sum(p.numel() for p in baseline.parameters()) == sum(p.numel() for p in model.parameters())
    oracle = copy.deepcopy(baseline).double()
    tokens = torch.randint(0, config.vocab_size, (3, 29))
    targets = torch.randint(0, config.vocab_size, (3, 29))
    outputs = []
    for m in (model, baseline, oracle):
        logits = m(tokens)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        outputs.append(logits)
    assert_within_tolerance("logits", *outputs)
    grads = {name: p.grad for name, p in baseline.named_parameters()}
    oracle_grads = {name: p.grad for name, p in oracle.named_parameters()}
    ours = TorchLM(config).copy_weights_from(_grads_as_model(model))  # our gradients in the baseline's names
    for name, p in ours.named_parameters():
        assert_within_tolerance(f"grad {name}", p.detach(), grads[name], oracle_grads[name])


def _grads_as_model(model):
    """A copy of `model` whose parameters hold its gradients (to map them with copy_weights_from)."""
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for p, source in zip(holder.parameters(), model.parameters()):
            p.copy_(source.grad)
    return holder


def test_output_head_is_tied_and_baseline_builder_copies_weights():
    config = LMConfig.preset("tiny")
    model = TransformerLM(config)
    tokens = torch.randint(0, config.vocab_size, (2, 5))
    logits = model(tokens)
    expected = F.linear(model.final_norm(_hidden(model, tokens)), model.token_embedding.weight)
    torch.testing.assert_close(logits, expected)
    assert not any(p.shape == (config.vocab_size, config.d_model) and p is not model.token_embedding.weight
                   for p in model.parameters())
    torch.manual_seed(5)
    a = build_torch_lm(config)
    torch.manual_seed(5)
    b = TransformerLM(config)
    torch.testing.assert_close(a.token_embedding.weight, b.token_embedding.weight, rtol=0, atol=0)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


def _hidden(model, tokens):
    x = model.token_embedding(tokens) + model.position_embedding(torch.arange(tokens.shape[1]))
    for block in model.blocks:
        x = block(x)
    return x


def test_lm_cache_prefill_single_steps_and_chunks_equal_full_forward():
    config = LMConfig.preset("tiny", context_length=40)
    model = TransformerLM(config).eval()
    tokens = torch.randint(0, config.vocab_size, (3, 23))
    full = model(tokens)
    cache = model.new_cache()
    pieces = [model(tokens[:, :9], cache)]  # prefill: causal attention over the prompt
    for t in range(9, 13):  # one query against the cache
        pieces.append(model(tokens[:, t:t + 1], cache))
    pieces.append(model(tokens[:, 13:23], cache))  # a multi-token chunk appended to the cache
    assert cache.length == 23
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_decode_step_is_one_query_against_the_cache_on_the_kernels(monkeypatch):
    """Every attention call goes through tfm_kernels.scaled_dot_product_attention; a decoding step sends one
    query per head against all cached keys without a mask, and nothing recomputes past positions."""
    calls = []
    kernel = layers.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.shape[2], k.shape[2], kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers, "scaled_dot_product_attention", recording)
    config = LMConfig.preset("tiny")
    model = TransformerLM(config).eval()
    cache = model.new_cache()
    model(torch.randint(0, 256, (2, 7)), cache)
    assert calls == [(7, 7, True, None)] * config.n_layers
    calls.clear()
    model(torch.randint(0, 256, (2, 1)), cache)
    assert calls == [(1, 8, False, None)] * config.n_layers


def test_cache_errors_when_full_and_reorders_rows():
    cache = KVCache(n_layers=1, max_length=4)
    k = torch.randn(3, 2, 4, 8)
    cache.update(0, k, k)
    cache.advance(4)
    with pytest.raises(ValueError, match="KVCache holds at most 4 positions; 4 cached \\+ 1 new = 5"):
        cache.update(0, k[:, :, :1], k[:, :, :1])
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.keys[0], k[[2, 2, 0]], rtol=0, atol=0)


def test_cache_rejects_a_first_step_whose_keys_and_values_disagree_and_layers_it_lacks():
    """The first update has no buffers to compare with: a v of another batch or length was broadcast into them
    silently, and a model with more layers than its cache failed with an IndexError."""
    k = torch.randn(2, 2, 3, 4)
    for v in (torch.randn(1, 2, 3, 4), torch.randn(2, 2, 1, 4), k.half()):
        with pytest.raises(ValueError, match=r"KVCache k and v must agree in \(B, H, n\), dtype and device"):
            KVCache(n_layers=1, max_length=8).update(0, k, v)
    for layer in (1, -1):
        with pytest.raises(ValueError, match=rf"KVCache layer must be an int in \[0, n_layers=1\); got {layer}"):
            KVCache(n_layers=1, max_length=8).update(layer, k, k)
    model = TransformerLM(LMConfig.preset("tiny", context_length=8))
    with pytest.raises(ValueError, match=r"KVCache layer must be an int in \[0, n_layers=1\); got 1"):
        model(torch.zeros(1, 3, dtype=torch.int64), KVCache(n_layers=1, max_length=8))
    cache = KVCache(n_layers=1, max_length=8)
    keys, values = cache.update(0, k, torch.randn(2, 2, 3, 6))  # Ev may differ from E
    assert values.shape == (2, 2, 3, 6)


@pytest.mark.parametrize("model_class", [TransformerLM, TorchLM])
def test_lm_rejects_sequences_longer_than_the_context(model_class):
    """Also the torch-layer baseline: past its position table it would fail in an embedding lookup (a
    device-side assert on a GPU)."""
    model = model_class(LMConfig.preset("tiny", context_length=8))
    with pytest.raises(ValueError, match="sequence length 9 .* exceeds the context length 8"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="tokens must be a \\(batch, length\\) int64 or int32 tensor"):
        model(torch.zeros(9))


def test_encoder_decoder_errors_name_the_argument():
    model = EncoderDecoderTransformer(Seq2SeqConfig.preset("tiny", max_length=16))
    src, tgt = torch.randint(3, 200, (3, 5)), torch.randint(3, 200, (3, 4))
    cases = [
        ((src[0], tgt), r"src must be a \(batch, length\) int64 or int32 tensor; got torch.Size\(\[5\]\)"),
        ((src, tgt[0]), r"tgt_in must be a \(batch, length\) int64 or int32 tensor; got torch.Size\(\[4\]\)"),
        ((src.float(), tgt), r"src must be a \(batch, length\) int64 or int32 tensor; got .* torch.float32"),
        ((src[:2], tgt), "src and tgt_in must have the same batch size; got 2 and 3"),
        ((torch.ones(3, 20, dtype=torch.int64), tgt), "src: sequence length 20 exceeds max_length 16"),
        ((src, torch.ones(3, 20, dtype=torch.int64)), "tgt: sequence length 20 exceeds max_length 16"),
        ((src, tgt, torch.full((3, 1), 5)), r"src_lengths must be a \(3,\) int64 or int32 tensor"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            model(*args)


@pytest.mark.parametrize("norm_first", [False, True])
def test_seq2seq_cached_decoding_equals_full_decoder(norm_first):
    config = Seq2SeqConfig.preset("tiny", norm_first=norm_first)
    model = EncoderDecoderTransformer(config).eval()
    src = torch.randint(0, 256, (2, 11))
    tgt = torch.randint(0, 256, (2, 9))
    full = model(src, tgt)
    lengths = model.source_lengths(src)
    memory_kv = model.memory_kv(model.encode(src, lengths))
    cache = model.new_cache()
    steps = [model.decode(tgt[:, :4], memory_kv, lengths, cache)]
    steps += [model.decode(tgt[:, t:t + 1], memory_kv, lengths, cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_seq2seq_ignores_source_padding():
    """Pad positions take no part as keys (key_lengths): extra right padding leaves the logits unchanged."""
    config = Seq2SeqConfig.preset("tiny")
    model = EncoderDecoderTransformer(config).eval()
    src = torch.randint(0, 256, (2, 6))
    src[1, 4:] = config.pad_id
    padded = torch.cat([src, torch.full((2, 5), config.pad_id)], dim=1)
    tgt = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), rtol=1e-5, atol=1e-5)
    # the pad positions were not attended: making them ordinary tokens changes row 1 only
    unpadded = padded.clone()
    unpadded[1, 4:6] = 7
    changed = (model(unpadded, tgt) - model(padded, tgt)).abs().amax(dim=(1, 2))
    assert changed[0] == 0 and changed[1] > 1e-3


def test_seq2seq_structure_follows_the_paper():
    config = Seq2SeqConfig.preset("tiny")
    model = EncoderDecoderTransformer(config)
    assert isinstance(model.encoder_norm, torch.nn.Identity)  # post-norm: the last sub-layer normalises
    pre = EncoderDecoderTransformer(Seq2SeqConfig.preset("tiny", norm_first=True))
    assert isinstance(pre.encoder_norm, torch.nn.LayerNorm)
    table = sinusoidal_positions(50, 16)
    p, i = 37, 3
    assert table[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
    assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)
    src = torch.randint(0, 256, (1, 3))
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_length 64"):
        model(src, torch.zeros(1, 65, dtype=torch.int64))


def test_dropout_trains_stochastically_and_evaluates_deterministically():
    config = LMConfig.preset("tiny", dropout=0.3)
    model = TransformerLM(config)
    tokens = torch.randint(0, 256, (2, 16))
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_lm_compiles_to_one_graph():
    """torch.compile(fullgraph=True) traces the model through the package's operators (no graph breaks) and
    computes the same logits."""
    model = TransformerLM(LMConfig.preset("tiny", n_layers=1))
    tokens = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_training_steps_under_cuda_graphs():
    """torch.compile(mode="reduce-overhead") replays a training step's kernels from CUDA graphs, which takes the
    host's time per call out of the step: the same losses as eager over a few optimizer steps (float32; dropout
    0, as inductor draws its own dropout masks)."""
    torch.manual_seed(0)
    config = LMConfig.preset("tiny", dropout=0.0)
    eager = TransformerLM(config).cuda()
    graphed = copy.deepcopy(eager)

    def loss_of(model):
        return lambda tokens: F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())  # (B * T, vocab)

    runs = [(loss_of(eager), eager, []),
            (torch.compile(loss_of(graphed), mode="reduce-overhead"), graphed, [])]
    optimizers = [torch.optim.Adam(model.parameters(), lr=1e-3) for _, model, _ in runs]
    for _ in range(4):
        tokens = torch.randint(0, config.vocab_size, (4, config.context_length), device="cuda")  # (B, T)
        torch.compiler.cudagraph_mark_step_begin()
        for (loss_fn, _, losses), optimizer in zip(runs, optimizers):
            loss = loss_fn(tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    torch.testing.assert_close(runs[1][2], runs[0][2], rtol=1e-4, atol=1e-5)


def test_autocast_runs_attention_and_mlp_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast (as training on a GPU) both kernels compute in bf16 (their results come in the dtype
    they computed in), and the logits stay close to the float32 model's."""
    dtypes = []

    def recording(name, function):
        def call(*args, **kwargs):
            out = function(*args, **kwargs)
            dtypes.append((name, out.dtype))
            return out
        return call

    monkeypatch.setattr(nn_mlp, "mlp", recording("mlp", nn_mlp.mlp))
    monkeypatch.setattr(layers, "scaled_dot_product_attention",
                        recording("attention", layers.scaled_dot_product_attention))
    model = TransformerLM(LMConfig.preset("tiny", n_layers=1))
    tokens = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens)
    assert dtypes == [("attention", torch.bfloat16), ("mlp", torch.bfloat16)]
    reference = model(tokens)
    assert (low.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_feed_forward_with_pruned_linear_trains():
    """A feed-forward linear pruned with torch.nn.utils.prune (a forward pre-hook that recomputes the weight from
    weight_orig and the mask) is called as a module: the mask applies at every step, and a second training step
    does not reuse the first step's freed graph, as reading its weight into the fused MLP did."""
    torch.manual_seed(0)
    model = TransformerLM(LMConfig.preset("tiny", dropout=0.0, n_layers=1))
    linear1 = model.blocks[0].feed_forward.linear1
    prune.l1_unstructured(linear1, "weight", amount=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        tokens = torch.randint(0, model.config.vocab_size, (2, 6))
        logits = model(tokens)
        with torch.no_grad():
            torch.testing.assert_close(linear1.weight, linear1.weight_orig * linear1.weight_mask, rtol=0, atol=0)
        optimizer.zero_grad()
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()
