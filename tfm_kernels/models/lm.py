"""Decoder-only Transformer language model on the package's attention and MLP kernels."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.mlp import FusedMLP
from .cache import KVCache
from .config import LMConfig, check_token_ids
from .layers import SelfAttention


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x)), with dropout on both residual branches."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attention = SelfAttention(config.d_model, config.n_heads, config.dropout, config.bias)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.feed_forward = FusedMLP(
            config.d_model, config.d_ff, config.activation, config.dropout, config.bias
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        x = x + self.dropout(self.attention(self.norm1(x), causal=True, cache=cache, layer=layer))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


def check_tokens(tokens, context_length, past=0) -> int:
    """Checks token ids (batch, length) of int64 or int32 that fit the context after `past` cached positions;
    returns their length."""
    check_token_ids("tokens", tokens)
    T = tokens.shape[1]
    if past + T > context_length:
        raise ValueError(f"sequence length {past + T} ({past} cached + {T} new) exceeds the context length "
                         f"{context_length}")
    return T


class TransformerLM(nn.Module):
    """GPT-style language model: token + learned position embeddings, `n_layers` pre-norm decoder blocks, a
    final LayerNorm and an output head tied to the token embedding.

    forward(tokens (B, T) int64 or int32, cache=None) -> logits (B, T, vocab_size). With a KVCache (`new_cache`),
    `tokens` are the positions after the cached ones and only they are computed. forward does not check that
    the ids are in [0, vocab_size) (the check would wait for the GPU at every training step): others fail as
    nn.Embedding fails; `generation.generate` checks its prompt."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self._init_weights()

    def _init_weights(self):
        # GPT-2's scheme: N(0, 0.02) weights, zero biases, and the projections that add into the residual
        # stream scaled by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attention.out.weight, std=residual_std)
            nn.init.normal_(block.feed_forward.linear2.weight, std=residual_std)

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty key/value cache for up to `max_length` (default: the context length) positions."""
        return KVCache(self.config.n_layers, self.config.context_length if max_length is None else max_length)

    def forward(self, tokens, cache: KVCache | None = None):
        past = cache.length if cache is not None else 0
        T = check_tokens(tokens, self.config.context_length, past)
        positions = torch.arange(past, past + T, device=tokens.device)  # (T,)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.advance(T)
        return F.linear(self.final_norm(x), self.token_embedding.weight)  # (B, T, V)
