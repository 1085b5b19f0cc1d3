"""Encoder-decoder Transformer of "Attention Is All You Need" on the package's attention and MLP kernels."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mlp import FusedMLP
from .cache import KVCache
from .config import Seq2SeqConfig, check_token_ids
from .layers import CrossAttention, SelfAttention


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """(length, d_model) float32: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]  # (length, 1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    angles = position * inv_freq  # (length, ceil(d / 2))
    table = torch.zeros(length, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table.float()


class _Residual(nn.Module):
    """One sub-layer with its residual connection: post-norm LN(x + drop(f(x))) as the paper, or pre-norm
    x + drop(f(LN(x)))."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x, sublayer):
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention over the source (pad keys excluded by src_lengths), then the feed-forward network."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        c = config
        self.self_attention = SelfAttention(c.d_model, c.n_heads, c.dropout)
        self.feed_forward = FusedMLP(c.d_model, c.d_ff, c.activation, c.dropout)
        self.residual1 = _Residual(c.d_model, c.dropout, c.norm_first)
        self.residual2 = _Residual(c.d_model, c.dropout, c.norm_first)

    def forward(self, x, src_lengths):
        x = self.residual1(x, lambda h: self.self_attention(h, key_lengths=src_lengths))
        return self.residual2(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Causal self-attention (cached when decoding), attention over the encoder's keys/values, then the
    feed-forward network."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        c = config
        self.self_attention = SelfAttention(c.d_model, c.n_heads, c.dropout)
        self.cross_attention = CrossAttention(c.d_model, c.n_heads, c.dropout)
        self.feed_forward = FusedMLP(c.d_model, c.d_ff, c.activation, c.dropout)
        self.residual1 = _Residual(c.d_model, c.dropout, c.norm_first)
        self.residual2 = _Residual(c.d_model, c.dropout, c.norm_first)
        self.residual3 = _Residual(c.d_model, c.dropout, c.norm_first)

    def forward(self, x, memory_kv, src_lengths, cache=None, layer=0):
        """memory_kv: this layer's cross-attention keys/values from memory_kv (decoding), or the encoder output
        (B, S, d_model), projected here (training: FSDP gathers a layer's parameters only in its forward)."""
        if isinstance(memory_kv, torch.Tensor):
            memory_kv = self.cross_attention.memory_kv(memory_kv)
        x = self.residual1(x, lambda h: self.self_attention(h, causal=True, cache=cache, layer=layer))
        x = self.residual2(x, lambda h: self.cross_attention(h, memory_kv, key_lengths=src_lengths))
        return self.residual3(x, self.feed_forward)


def check_src_lengths(src_lengths, batch):
    """src_lengths: (batch,) int64 or int32, one length per source row (values unchecked, as token ids)."""
    if (not isinstance(src_lengths, torch.Tensor) or src_lengths.shape != (batch,)
            or src_lengths.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"src_lengths must be a ({batch},) int64 or int32 tensor (one length per src row); got "
                         f"{getattr(src_lengths, 'shape', type(src_lengths).__name__)} "
                         f"{getattr(src_lengths, 'dtype', '')}")


class EncoderDecoderTransformer(nn.Module):
    """The paper's Transformer. Source and target share one vocabulary and one embedding matrix, which is also
    the output projection; embeddings are scaled by sqrt(d_model) and added to sinusoidal positions.

    Sequences are right-padded with `config.pad_id`; source lengths default to the count of non-pad tokens.
    forward(src (B, S), tgt_in (B, T), src_lengths (B,) or None) -> logits (B, T, vocab_size), tgt_in starting
    with bos. For decoding: `encode`, `memory_kv` (cross-attention keys/values, computed once per source) and
    `decode` with a KVCache from `new_cache`. Token ids are not checked against the vocabulary here (the check
    would wait for the GPU at every training step): others fail as nn.Embedding fails; greedy_decode and
    beam_search check theirs."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.register_buffer("positions", sinusoidal_positions(c.max_length, c.d_model), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_decoder_layers))
        # Pre-norm leaves the residual stream unnormalised; post-norm's last sub-layer already normalises.
        self.encoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c.d_model) if c.norm_first else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Scaled by sqrt(d_model) on input, so N(0, 1/d_model) gives unit-variance embeddings and unit-scale
        # logits through the tied output projection.
        nn.init.normal_(self.embedding.weight, std=self.config.d_model**-0.5)

    def _embed(self, name, tokens, offset=0):
        check_token_ids(name, tokens)
        T = tokens.shape[1]
        if offset + T > self.config.max_length:
            raise ValueError(f"{name}: sequence length {offset + T} exceeds max_length {self.config.max_length}")
        x = self.embedding(tokens) * math.sqrt(self.config.d_model) + self.positions[offset : offset + T]
        return self.dropout(x)  # (B, T, C)

    def source_lengths(self, src):
        """(B,) int64 count of non-pad tokens of each right-padded source row."""
        return (src != self.config.pad_id).sum(dim=1)

    def encode(self, src, src_lengths=None):
        """src (B, S) -> memory (B, S, d_model); padded positions take no part as keys."""
        x = self._embed("src", src)
        if src_lengths is None:
            src_lengths = self.source_lengths(src)
        check_src_lengths(src_lengths, src.shape[0])
        for layer in self.encoder_layers:
            x = layer(x, src_lengths)
        return self.encoder_norm(x)

    def memory_kv(self, memory):
        """Cross-attention keys/values of every decoder layer: a list of (k, v), each (B, H, S, D)."""
        return [layer.cross_attention.memory_kv(memory) for layer in self.decoder_layers]

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty self-attention cache of the decoder for `max_length` (default: config's) positions."""
        return KVCache(self.config.n_decoder_layers, self.config.max_length if max_length is None else max_length)

    def decode(self, tgt, memory_kv, src_lengths, cache: KVCache | None = None):
        """tgt (B, T) -> logits (B, T, vocab_size). memory_kv: the list from `memory_kv`, or the memory
        (B, S, d_model) itself, which every layer then projects. With a cache, tgt holds only the positions after
        the cached ones."""
        past = cache.length if cache is not None else 0
        x = self._embed("tgt", tgt, past)
        check_src_lengths(src_lengths, tgt.shape[0])
        for index, layer in enumerate(self.decoder_layers):
            layer_kv = memory_kv if isinstance(memory_kv, torch.Tensor) else memory_kv[index]
            x = layer(x, layer_kv, src_lengths, cache, index)
        if cache is not None:
            cache.advance(tgt.shape[1])
        return F.linear(self.decoder_norm(x), self.embedding.weight)  # (B, T, V)

    def forward(self, src, tgt_in, src_lengths=None):
        check_token_ids("src", src)
        check_token_ids("tgt_in", tgt_in)
        if src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"src and tgt_in must have the same batch size; got {src.shape[0]} and {tgt_in.shape[0]}")
        if src_lengths is None:
            src_lengths = self.source_lengths(src)
        memory = self.encode(src, src_lengths)
        return self.decode(tgt_in, memory, src_lengths)
