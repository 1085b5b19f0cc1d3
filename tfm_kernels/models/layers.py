"""Attention blocks of the models: self-attention (with a key/value cache) and cross-attention, on the
package's kernels (`tfm_kernels.scaled_dot_product_attention`). Their feed-forward network is
`tfm_kernels.nn.FusedMLP`."""

import torch
from torch import nn

from ..attention import scaled_dot_product_attention


def _attend(q, k, v, past_length, causal, key_lengths, dropout_p):
    """Attention of new queries q (B, H, n, D) over keys k, v (B, H, past_length + n, D).

    Causal attention lets new position i (absolute past_length + i) see keys 0..past_length + i: a prefill
    (past_length 0) is plain top-left causal attention, and a single new query sees the whole cache, so it
    needs no mask at all. Only a multi-token chunk appended to a cache needs a (bottom-right) mask."""
    n = q.shape[2]
    if not causal or past_length == 0 or n == 1:
        return scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal and past_length == 0, key_lengths=key_lengths
        )
    positions = torch.arange(past_length + n, device=q.device)
    sees = positions[None, :] <= past_length + torch.arange(n, device=q.device)[:, None]  # (n, past + n)
    return scaled_dot_product_attention(q, k, v, attn_mask=sees, dropout_p=dropout_p, key_lengths=key_lengths)


class SelfAttention(nn.Module):
    """Multi-head self-attention on a packed q/k/v projection; heads are split as views, never copied.

    forward(x (B, T, d_model), causal, key_lengths (B,) or None, cache (KVCache) or None, layer index)
    -> (B, T, d_model). With a cache, x holds only the new positions; their keys/values are appended and the
    queries attend every cached position."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x, causal=False, key_lengths=None, cache=None, layer=0):
        B, T, C = x.shape
        H = self.n_heads
        qkv = self.qkv(x).view(B, T, 3, H, C // H)  # (B, T, 3, H, D)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, T, D), strided views
        past_length = 0
        if cache is not None:
            past_length = cache.length
            k, v = cache.update(layer, k, v)  # (B, H, past + T, D)
        dropout_p = self.dropout if self.training else 0.0
        y = _attend(q, k, v, past_length, causal, key_lengths, dropout_p)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class CrossAttention(nn.Module):
    """Multi-head attention of decoder positions over the encoder output (memory).

    `memory_kv(memory (B, S, d_model))` projects the memory to keys and values (B, H, S, D) once per source;
    forward(x (B, T, d_model), (k, v), key_lengths (B,) source lengths or None) -> (B, T, d_model)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, bias: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def memory_kv(self, memory):
        B, S, C = memory.shape
        kv = self.kv(memory).view(B, S, 2, self.n_heads, C // self.n_heads)  # (B, S, 2, H, D)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each (B, H, S, D)
        return k, v

    def forward(self, x, kv, key_lengths=None):
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)
        k, v = kv
        dropout_p = self.dropout if self.training else 0.0
        y = scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, key_lengths=key_lengths
        )  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
