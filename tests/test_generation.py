"""Generation: cached decoding equals uncached decoding token for token (greedy, sampling, beam search), the
sampling controls do what they say, and bad arguments raise clear errors."""

import copy
import itertools
import zlib

import pytest
import torch
from threads import one_thread  # noqa: F401  (fixture)

from tfm_kernels.models import EncoderDecoderTransformer, KVCache, LMConfig, Seq2SeqConfig, TransformerLM, generation
from tfm_kernels.models.generation import beam_search, generate, greedy_decode, length_penalty
from tfm_kernels.models.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def lm():
    return TransformerLM(LMConfig.preset("tiny", context_length=48)).eval()


@pytest.fixture
def seq2seq():
    return EncoderDecoderTransformer(Seq2SeqConfig.preset("tiny")).eval()


def test_lm_greedy_cached_equals_uncached(lm):
    prompt = torch.randint(0, 256, (3, 7))
    cached = generate(lm, prompt, 30, greedy=True)
    uncached = generate(lm, prompt, 30, greedy=True, use_cache=False)
    assert cached.shape == (3, 37)
    assert torch.equal(cached[:, :7], prompt)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 5), (1.3, 1)])
def test_lm_sampling_cached_equals_uncached(lm, temperature, top_k):
    prompt = torch.randint(0, 256, (2, 4))
    runs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(1234)
        runs.append(generate(lm, prompt, 25, temperature=temperature, top_k=top_k, generator=generator,
                             use_cache=use_cache))
    assert torch.equal(*runs)
    if top_k == 1:  # only the most likely token can be drawn
        assert torch.equal(runs[0], generate(lm, prompt, 25, greedy=True))


def test_lm_sampling_differs_between_seeds_and_repeats_with_one(lm):
    prompt = torch.randint(0, 256, (1, 3))
    draw = lambda seed: generate(lm, prompt, 20, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


@pytest.mark.parametrize("temperature, top_k", [(1e-40, None), (1e-300, None), (1e-300, 4)])
def test_tiny_temperature_samples_the_most_likely_token(lm, temperature, top_k):
    """A temperature far below every gap between logits is greedy decoding: logits / temperature would
    overflow to inf (and 1e-300 is 0 in float32), which must not turn the distribution into NaN."""
    prompt = torch.randint(0, 256, (3, 4))
    generator = torch.Generator().manual_seed(0)
    sampled = generate(lm, prompt, 20, temperature=temperature, top_k=top_k, generator=generator)
    assert torch.equal(sampled, generate(lm, prompt, 20, greedy=True))


def test_top_k_restricts_samples_to_the_k_most_likely(lm):
    prompt = torch.randint(0, 256, (64, 2))
    with torch.no_grad():
        allowed = torch.topk(lm(prompt)[:, -1], 3, dim=-1).indices  # (64, 3)
    generator = torch.Generator().manual_seed(0)
    sampled = generate(lm, prompt, 1, top_k=3, temperature=5.0, generator=generator)[:, -1]
    assert (sampled[:, None] == allowed).any(dim=1).all()


def test_seq2seq_greedy_cached_equals_uncached(seq2seq):
    src = torch.randint(0, 256, (4, 9))
    src[2, 5:] = seq2seq.config.pad_id
    cached = greedy_decode(seq2seq, src, 15)
    assert torch.equal(cached, greedy_decode(seq2seq, src, 15, use_cache=False))


def test_seq2seq_greedy_cached_log_probs_follow_the_tolerance_rule(seq2seq, monkeypatch):
    """Every cached decoding step's log-probabilities against a float64 model's on the same prefix: at most 2x
    the error of the uncached float32 decoder. Token equality alone cannot fail here: this untrained model
    repeats one token per row, and greedy decoding with the target positions reset to 0 in the cached path
    decoded the same tokens."""
    steps = []
    log_probs = generation._Decoder.log_probs

    def recording(self, prefix):
        out = log_probs(self, prefix)
        steps.append((prefix.clone(), out))
        return out

    monkeypatch.setattr(generation._Decoder, "log_probs", recording)
    src = torch.randint(0, 256, (4, 9))
    src[2, 5:] = seq2seq.config.pad_id
    greedy_decode(seq2seq, src, 15)
    oracle_model = copy.deepcopy(seq2seq).double()
    assert len(steps) > 1
    with torch.no_grad():
        for prefix, cached in steps:
            oracle = torch.log_softmax(oracle_model(src, prefix)[:, -1], dim=-1)
            plain = torch.log_softmax(seq2seq(src, prefix)[:, -1].float(), dim=-1)
            error, plain_error = ((t.double() - oracle).abs().max().item() for t in (cached, plain))
            assert error <= 2 * plain_error + 1e-6, (prefix.shape[1], error, plain_error)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_exhaustive_beam_search_finds_the_best_normalised_hypothesis(seq2seq, monkeypatch, alpha):
    """A decoder with three possible tokens (two letters and eos) and a beam wide enough to keep every
    hypothesis (31 at 4 steps): beam search must return the hypothesis of highest log-probability / length
    penalty over all of them, found by enumeration, with that score. Hypotheses end at every length and beams
    are reordered at every step, so this checks the bookkeeping of scores, lengths and finished beams that
    the random models (whose best hypothesis ends at the first step or never) leave untested."""
    config = seq2seq.config
    letters, eos, K, steps = (97, 98), config.eos_id, 32, 4
    live = torch.tensor([*letters, eos])

    def table(row, prefix):  # log-probabilities of the next token, a fixed random draw per (row, prefix)
        generator = torch.Generator().manual_seed(zlib.crc32(repr((row, prefix)).encode()))
        out = torch.full((config.vocab_size,), float("-inf"))
        out[live] = torch.log_softmax(2.0 * torch.randn(3, generator=generator), dim=0)
        return out

    monkeypatch.setattr(generation._Decoder, "log_probs", lambda self, prefix: torch.stack(
        [table(index // K, tuple(row)) for index, row in enumerate(prefix.tolist())]))
    src = torch.randint(97, 123, (2, 5))
    tokens, scores = beam_search(seq2seq, src, steps, beam_size=K, alpha=alpha)
    for row in range(2):
        hypotheses = [(*body, eos) for n in range(steps) for body in itertools.product(letters, repeat=n)]
        hypotheses += itertools.product(letters, repeat=steps)  # unfinished at the last step
        best = None
        for sequence in hypotheses:
            prefix, total = (config.bos_id,), 0.0
            for token in sequence:
                total += table(row, prefix)[token].item()
                prefix += (token,)
            score = total / length_penalty(torch.tensor(float(len(sequence))), alpha).item()
            if best is None or score > best[0]:
                best = (score, sequence)
        expected = list(best[1]) + [config.pad_id] * (tokens.shape[1] - len(best[1]))
        assert tokens[row].tolist() == expected
        assert scores[row].item() == pytest.approx(best[0], abs=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_beam_search_cached_equals_uncached(seq2seq, beam_size):
    src = torch.randint(0, 256, (3, 8))
    src[0, 6:] = seq2seq.config.pad_id
    tokens, scores = beam_search(seq2seq, src, 12, beam_size=beam_size)
    tokens_uncached, scores_uncached = beam_search(seq2seq, src, 12, beam_size=beam_size, use_cache=False)
    assert torch.equal(tokens, tokens_uncached)
    torch.testing.assert_close(scores, scores_uncached, rtol=1e-5, atol=1e-5)
    if beam_size == 1:  # one beam is greedy decoding
        greedy = greedy_decode(seq2seq, src, 12)
        assert torch.equal(tokens[:, :greedy.shape[1]], greedy)


def test_cache_reorder_copies_only_the_cached_positions():
    """Beam search reorders the cache every step: the copy must follow the decoded length, not the capacity
    (it gathered all max_length positions, so a short decode with a large max_length spent most of its time
    there). Rows keep their values through reorders that also change the batch size."""
    gathered = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if "index_select" in getattr(func, "__name__", ""):
                gathered.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    cache = KVCache(n_layers=2, max_length=64)
    keys = torch.randn(2, 3, 4, 5, 8)  # (layer, B, H, positions, D)
    values = torch.randn(2, 3, 4, 5, 8)
    expected_k, expected_v = keys[:, :, :, :3], values[:, :, :, :3]
    for layer in range(2):
        cache.update(layer, keys[layer, :, :, :3], values[layer, :, :, :3])
    cache.advance(3)
    for rows in ([2, 0, 0], [1, 2, 2], [0, 2]):
        rows = torch.tensor(rows)
        with Record():
            cache.reorder(rows)
        expected_k, expected_v = expected_k[:, rows], expected_v[:, rows]
        assert gathered and all(shape[3] == cache.length for shape in gathered), gathered
        gathered.clear()
    for layer in range(2):  # a step after the reorders appends to the reordered rows
        k, v = cache.update(layer, keys[layer, :2, :, 3:4], values[layer, :2, :, 3:4])
        torch.testing.assert_close(k, torch.cat([expected_k[layer], keys[layer, :2, :, 3:4]], 2), rtol=0, atol=0)
        torch.testing.assert_close(v, torch.cat([expected_v[layer], values[layer, :2, :, 3:4]], 2), rtol=0, atol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_seq2seq_decodes_as_many_tokens_as_the_model_holds(seq2seq, monkeypatch, use_cache):
    """The decoder is fed bos and all generated tokens but the last: max_length == config.max_length feeds
    positions 0..max_length - 1 and decodes max_length tokens (eos is suppressed, so no row stops early)."""
    eos = torch.tensor([seq2seq.config.eos_id])
    log_probs = generation._Decoder.log_probs
    monkeypatch.setattr(generation._Decoder, "log_probs",
                        lambda self, prefix: log_probs(self, prefix).index_fill(-1, eos, float("-inf")))
    src = torch.randint(97, 123, (2, 10))
    n = seq2seq.config.max_length
    assert greedy_decode(seq2seq, src, n, use_cache=use_cache).shape == (2, n)
    tokens, scores = beam_search(seq2seq, src, n, beam_size=2, use_cache=use_cache)
    assert tokens.shape == (2, n) and scores.isfinite().all()


def test_beam_search_scores_are_length_normalised_log_probabilities():
    """The returned score is the decoder's log-probability of the returned sequence (eos included) divided by
    the length penalty (here the best hypotheses end at the first step: other lengths are checked by
    test_exhaustive_beam_search_finds_the_best_normalised_hypothesis)."""
    config = Seq2SeqConfig.preset("tiny")
    model = EncoderDecoderTransformer(config).eval()
    with torch.no_grad():  # make eos likely so that hypotheses finish at different lengths
        model.embedding.weight[config.eos_id] *= 6.0
    src = torch.randint(97, 123, (2, 6))
    tokens, scores = beam_search(model, src, 10, beam_size=4, alpha=0.6)
    for row in range(2):
        sequence = tokens[row]
        end = (sequence == config.eos_id).nonzero()
        length = end[0].item() + 1 if len(end) else len(sequence)
        sequence = sequence[:length]
        tgt_in = torch.cat([torch.tensor([config.bos_id]), sequence[:-1]])[None]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(src[row:row + 1], tgt_in)[0], dim=-1)
        total = log_probs[torch.arange(length), sequence].sum()
        expected = total / length_penalty(torch.tensor(float(length)), 0.6)
        assert scores[row].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(prompt_length=49, max_new_tokens=0), ValueError, "prompt length 49 exceeds the model's context"),
    (dict(prompt_length=40, max_new_tokens=9), ValueError, "prompt length 40 \\+ max_new_tokens 9 exceeds"),
    (dict(prompt_length=0, max_new_tokens=1), ValueError, "prompt must hold at least one token"),
    (dict(prompt_length=3, max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0; got -1"),
    (dict(prompt_length=3, max_new_tokens=2, temperature=0.0), ValueError,
     "temperature must be a finite number > 0 when sampling; got 0.0"),
    (dict(prompt_length=3, max_new_tokens=2, temperature=float("inf"), top_k=3), ValueError,
     "temperature must be a finite number > 0 when sampling; got inf"),
    (dict(prompt_length=3, max_new_tokens=2, temperature="0.5"), ValueError,
     "temperature must be a finite number > 0 when sampling; got '0.5'"),
    (dict(prompt_length=3, max_new_tokens=2, generator=123), ValueError,
     "generator must be a torch.Generator on cpu or None; got int"),
    (dict(prompt_length=3, max_new_tokens=2, top_k=0), ValueError, "top_k must be an int >= 1; got 0"),
    # strings and None counted as True or False
    (dict(prompt_length=3, max_new_tokens=2, greedy="no"), TypeError, "greedy must be a bool; got str"),
    (dict(prompt_length=3, max_new_tokens=2, use_cache=None), TypeError, "use_cache must be a bool; got NoneType"),
])
def test_generate_rejects_bad_arguments(lm, kwargs, error, message):
    prompt = torch.zeros(1, kwargs.pop("prompt_length"), dtype=torch.int64)
    with pytest.raises(error, match=message):
        generate(lm, prompt, kwargs.pop("max_new_tokens"), **kwargs)


def test_decoding_rejects_inputs_on_another_device_than_the_model():
    """An id tensor on another device than the model is named with both devices (it failed inside the
    embedding or the attention, naming key_lengths for a src on the wrong device). The meta device stands in
    for a GPU on machines without one."""
    lm = TransformerLM(LMConfig.preset("tiny", context_length=16)).to("meta")
    with pytest.raises(ValueError, match="prompt must be on the model's device meta; got cpu"):
        generate(lm, torch.zeros(1, 3, dtype=torch.int64), 2, greedy=True)
    seq2seq = EncoderDecoderTransformer(Seq2SeqConfig.preset("tiny", max_length=16)).to("meta")
    src = torch.randint(97, 123, (1, 5))
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match="src must be on the model's device meta; got cpu"):
            decode(seq2seq, src, 3)
    seq2seq = EncoderDecoderTransformer(Seq2SeqConfig.preset("tiny", max_length=16))
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match="src_lengths must be on the model's device cpu; got meta"):
            decode(seq2seq, src, 3, src_lengths=torch.tensor([5], device="meta"))


def test_top_k_samples_exactly_k_tokens_where_logits_tie():
    """top_k keeps k tokens: logits tied with the k-th largest are not all kept (every token was kept where all
    logits were equal, a uniform draw over the vocabulary for top_k=1)."""
    logits = torch.zeros(4000, 7)
    generator = torch.Generator().manual_seed(0)
    for top_k in (1, 3):
        sampled = generation._next_token(logits, False, 1.0, top_k, generator)
        assert sampled.unique().numel() == top_k, sampled.unique()


def test_generate_never_returns_the_prompt_tensor_itself(lm):
    """With max_new_tokens=0 the result was the caller's prompt: writing to one changed the other."""
    prompt = torch.randint(0, 256, (2, 3))
    tokens = generate(lm, prompt, 0)
    assert torch.equal(tokens, prompt) and tokens.data_ptr() != prompt.data_ptr()


def test_decoding_refuses_a_model_that_would_decode_at_random_or_is_not_a_model():
    """A model in training mode with dropout decoded with dropout on, silently; another object than the entry
    point's model failed with an AttributeError inside generation."""
    lm = TransformerLM(LMConfig.preset("tiny", context_length=16, dropout=0.1))
    seq2seq = EncoderDecoderTransformer(Seq2SeqConfig.preset("tiny", max_length=16, dropout=0.1))
    ids = torch.randint(97, 123, (1, 3))
    message = "model is in training mode with dropout 0.1: decoding would be random; call model.eval\\(\\) first"
    with pytest.raises(ValueError, match=message):
        generate(lm, ids, 2)
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match=message):
            decode(seq2seq, ids, 3)
    assert generate(lm.eval(), ids, 2).shape == (1, 5)
    without_dropout = TransformerLM(LMConfig.preset("tiny", context_length=16))  # training mode changes nothing
    assert torch.equal(generate(without_dropout, ids, 2, greedy=True),
                       generate(without_dropout.eval(), ids, 2, greedy=True))
    with pytest.raises(ValueError, match="model must be a TransformerLM; got EncoderDecoderTransformer"):
        generate(seq2seq, ids, 2)
    with pytest.raises(ValueError, match="model must be a TransformerLM; got EncoderDecoderTransformer"):
        generate(torch.compile(seq2seq), ids, 2)
    compiled = torch.compile(without_dropout.eval())  # decodes as the module it wraps (not run: that compiles)
    generation._check_model(compiled, TransformerLM)
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match="model must be a EncoderDecoderTransformer; got TransformerLM"):
            decode(lm, ids, 3)


def test_decoding_refuses_ids_that_are_not_a_dense_tensor_and_a_model_without_values(lm, seq2seq):
    """Sparse and nested ids, and a model and ids on the meta device, failed deep in torch (aminmax has no
    sparse kernel; nested tensors have no sizes; .item() of a meta tensor)."""
    ids = torch.randint(97, 123, (2, 3))
    bad = [(ids.to_sparse(), "a torch.sparse_coo tensor of torch.int64"),
           (torch.nested.nested_tensor([ids[0], ids[1, :2]], layout=torch.jagged), "a nested tensor of torch.int64")]
    for bad_ids, got in bad:
        with pytest.raises(ValueError, match=f"prompt must be a dense \\(batch, length\\) int64 tensor; got {got}"):
            generate(lm, bad_ids, 2)
        for decode in (greedy_decode, beam_search):
            with pytest.raises(ValueError, match=f"src must be a dense \\(batch, length\\) int64 tensor; got {got}"):
                decode(seq2seq, bad_ids, 3)
    message = "model's parameters are on the meta device \\(shapes without values\\); load or materialise"
    with pytest.raises(ValueError, match=message):
        generate(copy.deepcopy(lm).to("meta"), ids.to("meta"), 2)
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match=message):
            decode(copy.deepcopy(seq2seq).to("meta"), ids.to("meta"), 3)


def test_seq2seq_decoding_rejects_bad_arguments(seq2seq):
    with pytest.raises(ValueError, match="src must be a dense \\(batch, length\\) int64 tensor; got \\(3,\\)"):
        greedy_decode(seq2seq, torch.zeros(3, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match="max_length 65 exceeds the model's max_length 64"):
        greedy_decode(seq2seq, torch.zeros(1, 3, dtype=torch.int64), 65)
    # More beams than tokens (up to an allocation failure) held nothing but -inf hypotheses.
    for beam_size in (0, 260, 2.0):
        with pytest.raises(ValueError, match=f"beam_size must be an int in \\[1, vocab_size=259\\]; got {beam_size}"):
            beam_search(seq2seq, torch.zeros(1, 3, dtype=torch.int64), 5, beam_size=beam_size)
    for decode in (greedy_decode, beam_search):
        with pytest.raises(TypeError, match="use_cache must be a bool; got str"):
            decode(seq2seq, torch.zeros(1, 3, dtype=torch.int64), 5, use_cache="no")


@pytest.mark.parametrize("bad_id", [259, -1])
def test_decoding_rejects_token_ids_outside_the_vocabulary(lm, seq2seq, bad_id):
    """Each entry point checks its ids (the models' forward does not: it would wait for the GPU every step)."""
    ids = torch.tensor([[97, bad_id]])
    got = f"got ids from {min(97, bad_id)} to {max(97, bad_id)}"
    with pytest.raises(ValueError, match=f"prompt must hold token ids in \\[0, vocab_size=259\\); {got}"):
        generate(lm, ids, 1)
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match=f"src must hold token ids in \\[0, vocab_size=259\\); {got}"):
            decode(seq2seq, ids, 3)


@pytest.mark.parametrize("src_lengths, message", [
    (torch.tensor([6]), "src_lengths must be in \\[0, src length 5\\]; got lengths from 6 to 6"),
    (torch.tensor([-1]), "src_lengths must be in \\[0, src length 5\\]; got lengths from -1 to -1"),
    (torch.tensor([2, 3]), "src_lengths must be a \\(1,\\) int64 or int32 tensor .*; got torch.Size\\(\\[2\\]\\)"),
    (torch.tensor([2.0]), "src_lengths must be a \\(1,\\) int64 or int32 tensor .* torch.float32"),
], ids=["longer", "negative", "shape", "dtype"])
def test_seq2seq_decoding_rejects_bad_source_lengths(seq2seq, src_lengths, message):
    src = torch.randint(97, 123, (1, 5))
    for decode in (greedy_decode, beam_search):
        with pytest.raises(ValueError, match=message):
            decode(seq2seq, src, 4, src_lengths=src_lengths)


def test_cache_rejects_steps_unlike_its_first_and_bad_sizes():
    """A cache holds one batch, head layout, dtype and device: a step that differs is named with both (it failed
    in the copy with torch's message, or, for a float32 step after a bfloat16 autocast prefill, was cast
    silently and failed in attention naming query/key/value); a capacity < 1 is refused (new_cache(0) gave the
    context length)."""
    model = TransformerLM(LMConfig.preset("tiny", context_length=16))
    with torch.no_grad():
        cache = model.new_cache()
        model(torch.randint(0, 256, (3, 4)), cache)
        with pytest.raises(ValueError, match=r"KVCache holds keys \(B=3, H=4, n, D=16\).* of torch.float32 on "
                                             r"cpu; got keys \(2, 4, 1, 16\) torch.float32"):
            model(torch.randint(0, 256, (2, 1)), cache)
        cache = model.new_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randint(0, 256, (3, 4)), cache)
        with pytest.raises(ValueError, match=r"of torch.bfloat16 on cpu; got keys \(3, 4, 1, 16\) torch.float32"):
            model(torch.randint(0, 256, (3, 1)), cache)
    assert cache.length == 4
    for max_length in (0, -3, 2.0):
        with pytest.raises(ValueError, match=f"KVCache max_length must be an int >= 1; got {max_length}"):
            model.new_cache(max_length)


def test_cache_refuses_advances_and_reorders_it_cannot_hold():
    """advance(-1) left a length that made the next step's views silently empty, advance past max_length was
    accepted; reorder rows outside the batch failed in index_select with torch's message (on a GPU, a
    device-side assert)."""
    cache = KVCache(n_layers=1, max_length=4)
    cache.update(0, torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    for n in (-1, 5, 1.0):
        with pytest.raises(ValueError, match=f"KVCache advance n must be an int in \\[0, 4\\] .*; got {n}"):
            cache.advance(n)
    cache.advance(3)
    with pytest.raises(ValueError, match=r"advance n must be an int in \[0, 1\] \(max_length 4 - 3 cached\); got 2"):
        cache.advance(2)
    for indices, message in [(torch.tensor([0, 2]), "must be rows in \\[0, 2\\); got 0 to 2"),
                             (torch.tensor([-1]), "must be rows in \\[0, 2\\); got -1 to -1"),
                             (torch.tensor([0.0]), "must be a 1-D int64 or int32 tensor; got torch.Size\\(\\[1\\]\\) "
                                                   "torch.float32"),
                             ([0, 1], "must be a 1-D int64 or int32 tensor; got list"),
                             (torch.tensor([0], device="meta"), "must be on the cache's device cpu; got meta")]:
        with pytest.raises(ValueError, match=f"KVCache reorder indices {message}"):
            cache.reorder(indices)
    cache.reorder(torch.tensor([1, 1, 0], dtype=torch.int32))
    assert cache.keys.shape[1] == 3 and cache.length == 3


def test_beam_search_takes_a_numpy_length_penalty(seq2seq):
    """alpha accepts the real numbers temperature and the configs accept (it refused np.float32(0.6) as "not a
    finite number >= 0")."""
    import numpy as np

    src = torch.randint(97, 123, (1, 5))
    for alpha in (np.float32(0.6), np.float64(0.6)):
        tokens, scores = beam_search(seq2seq, src, 4, alpha=alpha)
        expected_tokens, expected_scores = beam_search(seq2seq, src, 4, alpha=0.6)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(scores, expected_scores)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -0.5])
def test_beam_search_rejects_a_length_penalty_that_is_not_finite_and_non_negative(seq2seq, alpha):
    with pytest.raises(ValueError, match=f"alpha must be a finite number >= 0; got {alpha}"):
        beam_search(seq2seq, torch.randint(97, 123, (1, 5)), 4, alpha=alpha)


def test_tokenizer_encodes_empty_text_and_refuses_lone_surrogates():
    """Every str UTF-8 can encode round-trips, the empty one included; a lone surrogate (how Python hands over a
    command-line byte that is not UTF-8) cannot be encoded."""
    tokenizer = ByteTokenizer()
    empty = tokenizer.encode_tensor("")
    assert empty.shape == (0,) and empty.dtype == torch.int64
    text = "h\u00e9llo \U0001f642"
    assert tokenizer.encode_tensor(text).tolist() == tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode_tensor(text)) == text
    with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
        tokenizer.encode_tensor("caf\udcff")
