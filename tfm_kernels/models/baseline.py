"""The language model built from PyTorch's own layers, for comparisons: same architecture and parameter count
as TransformerLM, with nn.TransformerEncoderLayer (norm_first, causal mask) in place of the package's attention
and fused MLP; build_torch_lm also gives it TransformerLM's initialisation. Benchmarks time both; tests check
that they compute the same logits from the same weights."""

import torch
from torch import nn

from .config import LMConfig
from .lm import TransformerLM, check_tokens


class TorchLM(nn.Module):
    """forward(tokens (B, T) int64) -> logits (B, T, vocab_size), as TransformerLM without a cache."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.context_length, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.d_ff, config.dropout,
                                           activation=config.activation, batch_first=True, norm_first=True,
                                           bias=config.bias)
        # config.bias drops the linear layers' biases only: TransformerLM's LayerNorms always have one, where
        # torch's bias=False drops the norms' too.
        layer.norm1, layer.norm2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(config.d_model)

    def forward(self, tokens):
        T = check_tokens(tokens, self.config.context_length)
        positions = torch.arange(T, device=tokens.device)
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))  # (B, T, C)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=x.dtype)
        x = self.encoder(x, mask=causal, is_causal=True)
        return nn.functional.linear(self.final_norm(x), self.token_embedding.weight)  # (B, T, V)

    @torch.no_grad()
    def copy_weights_from(self, model: TransformerLM):
        """Takes every parameter of `model` (packed q/k/v and MLP weights map one to one)."""
        self.token_embedding.weight.copy_(model.token_embedding.weight)
        self.position_embedding.weight.copy_(model.position_embedding.weight)
        self.final_norm.load_state_dict(model.final_norm.state_dict())
        for ours, theirs in zip(model.blocks, self.encoder.layers):
            attention = theirs.self_attn
            attention.in_proj_weight.copy_(ours.attention.qkv.weight)  # rows: q, k, v — the same packing
            attention.out_proj.weight.copy_(ours.attention.out.weight)
            if self.config.bias:
                attention.in_proj_bias.copy_(ours.attention.qkv.bias)
                attention.out_proj.bias.copy_(ours.attention.out.bias)
            theirs.norm1.load_state_dict(ours.norm1.state_dict())
            theirs.norm2.load_state_dict(ours.norm2.state_dict())
            theirs.linear1.load_state_dict(ours.feed_forward.linear1.state_dict())
            theirs.linear2.load_state_dict(ours.feed_forward.linear2.state_dict())
        return self


def build_torch_lm(config: LMConfig) -> TorchLM:
    """The peer of TransformerLM(config) from torch's layers, initialised with TransformerLM's weights
    (the same seed gives the same starting point for both)."""
    ours = TransformerLM(config)  # first, so that a seed gives both models the weights TransformerLM gets
    return TorchLM(config).copy_weights_from(ours)
