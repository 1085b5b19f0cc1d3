"""Key/value cache for incremental decoding."""

import torch


class KVCache:
    """Keys and values of every layer's self-attention for the tokens decoded so far.

    Storage is preallocated on the first `update` as keys/values of shape (n_layers, B, H, max_length, D) in
    the dtype and device of the first keys written; `length` counts the cached positions. A forward pass
    calls `update(layer, k, v)` in every layer with the new positions' keys/values (B, H, n, D), gets back
    views of all positions so far (B, H, length + n, D) — nothing is recomputed or copied besides the new
    rows — and then `advance(n)` once. `reorder(indices)` selects batch rows (beam search)."""

    def __init__(self, n_layers: int, max_length: int):
        self.n_layers = n_layers
        self.max_length = max_length
        self.length = 0
        self.keys = None
        self.values = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v (B, H, n, D) at positions [length, length + n) of `layer`; returns the cached keys and
        values (B, H, length + n, D) of that layer as views."""
        B, H, n, D = k.shape
        end = self.length + n
        if end > self.max_length:
            raise ValueError(
                f"KVCache holds at most {self.max_length} positions; {self.length} cached + {n} new = {end}"
            )
        if self.keys is None:
            shape = (self.n_layers, B, H, self.max_length, D)
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape[:-1] + (v.shape[-1],))
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # (B, H, end, D) views

    def advance(self, n: int):
        """Marks n more positions as cached (after every layer has written them)."""
        self.length += n

    def reorder(self, indices: torch.Tensor):
        """Keeps batch rows `indices` (B',) in order: beam search follows each surviving beam's parent."""
        if self.keys is not None:
            self.keys = self.keys.index_select(1, indices)
            self.values = self.values.index_select(1, indices)
