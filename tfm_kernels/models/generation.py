"""Decoding: greedy, temperature and top-k sampling for the language model; greedy and beam search for the
encoder-decoder. With use_cache=True every step feeds only the newest token and attends the key/value cache
on the package's kernels; use_cache=False recomputes the whole prefix each step (the reference the cached
path must equal token for token). These entry points check their token ids against the vocabulary (the models'
forward does not: its check would wait for the GPU at every training step)."""

import math

import torch

from ..op_checks import check_flags
from .config import is_int, is_real
from .lm import TransformerLM
from .seq2seq import EncoderDecoderTransformer, check_src_lengths


def _check_count(name, value, minimum=1):
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_model(model, kind):
    """ValueError unless `model` is a `kind` (or torch.compile's wrapper of one), in eval mode where it has dropout
    (decoding would be random otherwise, with nothing to say so)."""
    model = getattr(model, "_orig_mod", model)  # the module a torch.compile'd one runs
    if not isinstance(model, kind):
        raise ValueError(f"model must be a {kind.__name__}; got {type(model).__name__}")
    if model.training and model.config.dropout > 0:
        raise ValueError(f"model is in training mode with dropout {model.config.dropout}: decoding would be "
                         f"random; call model.eval() first")


def _check_id_tensor(name, ids):
    """ValueError naming `name` unless `ids` is a dense (batch, length) int64 tensor."""
    if (isinstance(ids, torch.Tensor) and not ids.is_nested and ids.layout == torch.strided and ids.dim() == 2
            and ids.dtype == torch.int64):
        return
    if not isinstance(ids, torch.Tensor):
        got = type(ids).__name__
    elif ids.is_nested:
        got = f"a nested tensor of {ids.dtype}"
    elif ids.layout != torch.strided:
        got = f"a {ids.layout} tensor of {ids.dtype}"
    else:
        got = f"{tuple(ids.shape)} {ids.dtype}"
    raise ValueError(f"{name} must be a dense (batch, length) int64 tensor; got {got}")


def _check_token_ids(name, ids, vocab_size):
    """ValueError naming `name` unless every id of `ids` is in [0, vocab_size)."""
    if ids.numel():
        low, high = (bound.item() for bound in torch.aminmax(ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} must hold token ids in [0, vocab_size={vocab_size}); got ids from {low} to "
                             f"{high}")


def _check_device(name, tensor, model):
    """ValueError naming `name` unless `tensor` is on the model's device (the embedding lookup would fail with
    torch's message, naming neither the argument nor the devices' owners), and the device not meta."""
    device = next(model.parameters()).device
    if tensor.device != device:
        raise ValueError(f"{name} must be on the model's device {device}; got {tensor.device}")
    if device.type == "meta":
        raise ValueError("model's parameters are on the meta device (shapes without values); load or "
                         "materialise its weights first")


def _next_token(logits, greedy, temperature, top_k, generator):
    """logits (B, V) -> (B, 1) int64: argmax, or a sample of softmax(logits / temperature) restricted to the
    top_k largest logits.

    The largest logit is subtracted first and the division is in float64, where no positive temperature is 0:
    the largest logits stay 0 and the others at most overflow to -inf, so a tiny temperature samples like
    greedy decoding instead of dividing inf by inf."""
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # (B, V), <= 0
    if top_k is not None and top_k < logits.shape[-1]:
        # Exactly top_k tokens stay, also where several tie with the k-th largest logit (topk picks among them).
        kept, kept_ids = torch.topk(logits, top_k, dim=-1)  # (B, top_k)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, kept_ids, kept)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt,
    max_new_tokens: int,
    *,
    greedy=False,
    temperature=1.0,
    top_k=None,
    generator=None,
    use_cache=True,
):
    """Continues each prompt row by `max_new_tokens` tokens.

    Args:
        model: a TransformerLM, in eval mode if it has dropout.
        prompt: (B, T) int64 token ids in [0, vocab_size), T >= 1; T + max_new_tokens must fit the context
            length.
        greedy: take the most likely token; otherwise sample from softmax(logits / temperature) over the
            `top_k` most likely tokens (all if None).
        generator: torch.Generator for sampling (reproducible runs), on the model's device.
        use_cache: feed only the newest token per step and attend the key/value cache (prefill: causal
            attention over the prompt); False recomputes the whole sequence every step.

    Returns:
        (B, T + max_new_tokens) int64: the prompt followed by the generated tokens.
    """
    _check_model(model, TransformerLM)
    _check_id_tensor("prompt", prompt)
    if prompt.shape[1] == 0:
        raise ValueError("prompt must hold at least one token; got length 0")
    _check_device("prompt", prompt, model)
    _check_token_ids("prompt", prompt, model.config.vocab_size)
    _check_count("max_new_tokens", max_new_tokens, 0)
    check_flags(greedy=greedy, use_cache=use_cache)
    context = model.config.context_length
    if prompt.shape[1] > context:
        raise ValueError(f"prompt length {prompt.shape[1]} exceeds the model's context length {context}")
    if prompt.shape[1] + max_new_tokens > context:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context length {context}"
        )
    # inf would make every scaled logit 0: a uniform draw over the whole vocabulary, top_k included.
    if not greedy and not (is_real(temperature) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 when sampling; got {temperature!r}")
    if not greedy and generator is not None:
        if not isinstance(generator, torch.Generator) or generator.device.type != prompt.device.type:
            raise ValueError(f"generator must be a torch.Generator on {prompt.device.type} or None; got "
                             f"{getattr(generator, 'device', type(generator).__name__)}")
    if top_k is not None:
        _check_count("top_k", top_k)

    tokens = prompt.clone()  # returned as it is when max_new_tokens is 0: never the caller's tensor
    cache = model.new_cache(prompt.shape[1] + max_new_tokens) if use_cache else None
    step_input = prompt
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else tokens, cache)[:, -1]  # (B, V)
        next_token = _next_token(logits, greedy, temperature, top_k, generator)  # (B, 1)
        tokens = torch.cat([tokens, next_token], dim=1)
        step_input = next_token
    return tokens


class _Decoder:
    """One decoding step of the encoder-decoder: log-probabilities of the next token given the target prefix,
    cached (only the newest token is fed) or recomputed from the whole prefix."""

    def __init__(self, model: EncoderDecoderTransformer, src, src_lengths, max_steps, use_cache):
        self.model = model
        self.src_lengths = model.source_lengths(src) if src_lengths is None else src_lengths
        self.memory_kv = model.memory_kv(model.encode(src, self.src_lengths))  # computed once per source
        self.cache = model.new_cache(max_steps) if use_cache else None

    def expand(self, beam_size):
        """Repeats every source row `beam_size` times (rows b * beam_size + k)."""
        self.src_lengths = self.src_lengths.repeat_interleave(beam_size)
        self.memory_kv = [
            (k.repeat_interleave(beam_size, 0), v.repeat_interleave(beam_size, 0)) for k, v in self.memory_kv
        ]

    def log_probs(self, prefix):
        """prefix (N, t) -> (N, V) float32 log-probabilities of token t + 1."""
        step_input = prefix[:, -1:] if self.cache is not None else prefix
        logits = self.model.decode(step_input, self.memory_kv, self.src_lengths, self.cache)[:, -1]
        return torch.log_softmax(logits.float(), dim=-1)

    def reorder(self, rows):
        if self.cache is not None:
            self.cache.reorder(rows)


def _check_source(model, src, max_length, src_lengths):
    _check_model(model, EncoderDecoderTransformer)
    _check_id_tensor("src", src)
    if src.shape[1] > model.config.max_length:
        raise ValueError(
            f"src length {src.shape[1]} exceeds the model's max_length {model.config.max_length}"
        )
    _check_device("src", src, model)
    _check_token_ids("src", src, model.config.vocab_size)
    if src_lengths is not None:
        B, S = src.shape
        check_src_lengths(src_lengths, B)
        _check_device("src_lengths", src_lengths, model)
        if B:
            low, high = (bound.item() for bound in torch.aminmax(src_lengths))
            if low < 0 or high > S:
                raise ValueError(f"src_lengths must be in [0, src length {S}]; got lengths from {low} to {high}")
    _check_count("max_length", max_length)
    # The decoder is fed bos and every generated token but the last: positions 0..max_length - 1.
    if max_length > model.config.max_length:
        raise ValueError(f"max_length {max_length} exceeds the model's max_length {model.config.max_length}")


@torch.no_grad()
def greedy_decode(
    model: EncoderDecoderTransformer, src, max_length: int, *, src_lengths=None, use_cache=True
):
    """Greedy decoding of each right-padded source row of src (B, S) int64 token ids in [0, vocab_size);
    src_lengths (B,) in [0, S] (None: the non-pad tokens of each row).

    Returns (B, n) int64, n <= max_length: the generated tokens after bos, ending with eos where a row
    finished; positions after a row's eos hold pad_id."""
    _check_source(model, src, max_length, src_lengths)
    check_flags(use_cache=use_cache)
    config = model.config
    decoder = _Decoder(model, src, src_lengths, max_length, use_cache)
    tokens = torch.full((src.shape[0], 1), config.bos_id, dtype=torch.int64, device=src.device)
    finished = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_length):
        next_token = decoder.log_probs(tokens).argmax(dim=-1)  # (B,)
        next_token = torch.where(finished, torch.full_like(next_token, config.pad_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        finished |= next_token == config.eos_id
        if finished.all():
            break
    return tokens[:, 1:]


def length_penalty(lengths, alpha):
    """GNMT's length normalisation ((5 + length) / 6) ** alpha, as the paper's beam search (alpha 0.6)."""
    return ((5.0 + lengths) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: EncoderDecoderTransformer,
    src,
    max_length: int,
    *,
    beam_size=4,
    alpha=0.6,
    src_lengths=None,
    use_cache=True,
):
    """Beam search over each right-padded source row of src (B, S), src_lengths as in greedy_decode.

    Each row keeps `beam_size` hypotheses; a finished hypothesis (ended by eos) is carried unchanged with its
    score. The answer is the hypothesis with the highest log-probability / length_penalty(length, alpha) (alpha
    finite, >= 0), length counting the tokens after bos up to and including eos.

    Returns (tokens (B, n) int64 as in greedy_decode, scores (B,) float32 length-normalised
    log-probabilities).
    """
    _check_source(model, src, max_length, src_lengths)
    vocab_size = model.config.vocab_size
    if not is_int(beam_size) or not 1 <= beam_size <= vocab_size:
        # More beams than tokens hold nothing but -inf hypotheses at the first step, and cost memory throughout.
        raise ValueError(f"beam_size must be an int in [1, vocab_size={vocab_size}]; got {beam_size!r}")
    check_flags(use_cache=use_cache)
    if not is_real(alpha) or not (math.isfinite(alpha) and alpha >= 0):  # is_real: NumPy scalars too, as temperature
        raise ValueError(f"alpha must be a finite number >= 0; got {alpha!r}")
    config = model.config
    B, K = src.shape[0], beam_size
    device = src.device
    decoder = _Decoder(model, src, src_lengths, max_length, use_cache)
    decoder.expand(K)
    tokens = torch.full((B * K, 1), config.bos_id, dtype=torch.int64, device=device)
    # All beams start as the same prefix: only beam 0 may expand at the first step, or the top-K would be K
    # copies of one hypothesis.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    for _ in range(max_length):
        log_probs = decoder.log_probs(tokens)  # (B*K, V)
        V = log_probs.shape[-1]
        # A finished beam continues only with pad, at no cost.
        carried = torch.full_like(log_probs, float("-inf"))
        carried[:, config.pad_id] = 0.0
        log_probs = torch.where(finished[:, None], carried, log_probs)
        candidates = scores.view(B * K, 1) + log_probs  # (B*K, V)
        scores, flat = candidates.view(B, K * V).topk(K, dim=-1)  # (B, K)
        parent = flat // V + torch.arange(B, device=device)[:, None] * K  # (B, K) row in the (B*K) layout
        parent, next_token = parent.flatten(), (flat % V).flatten()  # (B*K,)
        tokens = torch.cat([tokens[parent], next_token[:, None]], dim=1)
        decoder.reorder(parent)
        lengths = lengths[parent] + (~finished[parent]).float()
        finished = finished[parent] | (next_token == config.eos_id)
        if finished.all():
            break
    normalised = scores.flatten() / length_penalty(lengths, float(alpha))  # (B*K,)
    best = normalised.view(B, K).argmax(dim=-1) + torch.arange(B, device=device) * K  # (B,)
    return tokens[best, 1:], normalised[best]
