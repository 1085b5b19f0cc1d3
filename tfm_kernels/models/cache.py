"""Key/value cache for incremental decoding."""

import torch

from .config import is_int


class KVCache:
    """Keys and values of every layer's self-attention for the tokens decoded so far.

    Storage is preallocated on the first `update` as keys/values of shape (n_layers, B, H, max_length, D) in
    the dtype and device of the first keys written; `length` counts the cached positions. A forward pass
    calls `update(layer, k, v)` in every layer with the new positions' keys/values (B, H, n, D), gets back
    views of all positions so far (B, H, length + n, D) — nothing is recomputed or copied besides the new
    rows — and then `advance(n)` once. `reorder(indices)` selects batch rows (beam search)."""

    def __init__(self, n_layers: int, max_length: int):
        for name, value in (("n_layers", n_layers), ("max_length", max_length)):
            if not is_int(value) or value < 1:
                raise ValueError(f"KVCache {name} must be an int >= 1; got {value!r}")
        self.n_layers = n_layers
        self.max_length = max_length
        self.length = 0
        self.keys = None
        self.values = None
        self._spare = None  # (keys, values) that `reorder` gathers into

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v (B, H, n, D) at positions [length, length + n) of `layer`; returns the cached keys and
        values (B, H, length + n, D) of that layer as views."""
        self._check_step(layer, k, v)
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

    def _check_step(self, layer, k, v):
        """ValueError unless `layer` is one of the cache's and k, v are (B, H, n, D) / (B, H, n, Dv) tensors that
        agree in everything but the head dim and match what the cache holds. Without it, a v of another batch or
        length was broadcast into the buffers silently, a layer past the last failed with an IndexError, a batch
        of another size failed in the copy with torch's message, and another dtype (after an autocast prefill)
        was cast silently and failed later in attention."""
        if not is_int(layer) or not 0 <= layer < self.n_layers:
            raise ValueError(f"KVCache layer must be an int in [0, n_layers={self.n_layers}); got {layer!r}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"KVCache {name} must be a 4-D (B, H, n, D) tensor; got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if k.shape[:3] != v.shape[:3] or k.dtype != v.dtype or k.device != v.device:
            raise ValueError(f"KVCache k and v must agree in (B, H, n), dtype and device; got keys {tuple(k.shape)} "
                             f"{k.dtype} on {k.device} and values {tuple(v.shape)} {v.dtype} on {v.device}")
        if self.keys is None:
            return
        _, B, H, _, D = self.keys.shape
        Dv = self.values.shape[-1]
        if (k.shape[:2], k.shape[3], v.shape[3], k.dtype, k.device) != ((B, H), D, Dv, self.keys.dtype,
                                                                        self.keys.device):
            raise ValueError(
                f"KVCache holds keys (B={B}, H={H}, n, D={D}) and values (B={B}, H={H}, n, D={Dv}) of "
                f"{self.keys.dtype} on {self.keys.device}; got keys {tuple(k.shape)} {k.dtype} on {k.device} and "
                f"values {tuple(v.shape)} {v.dtype} on {v.device}"
            )

    def advance(self, n: int):
        """Marks n more positions as cached (after every layer has written them)."""
        if not is_int(n) or not 0 <= n <= self.max_length - self.length:
            raise ValueError(f"KVCache advance n must be an int in [0, {self.max_length - self.length}] (max_length "
                             f"{self.max_length} - {self.length} cached); got {n!r}")
        self.length += n

    def reorder(self, indices: torch.Tensor):
        """Keeps batch rows `indices` (B',) in order: beam search follows each surviving beam's parent. The rows
        are gathered into a second pair of buffers, kept for the next reorder, and only the cached positions are
        copied: a reorder costs what has been decoded, not the capacity."""
        self._check_indices(indices)
        if self.keys is None:
            return
        if self._spare is None or self._spare[0].shape[1] != indices.shape[0]:
            self._spare = tuple(t.new_empty((t.shape[0], indices.shape[0], *t.shape[2:]))
                                for t in (self.keys, self.values))
        cached = slice(0, self.length)
        for spare, buffer in zip(self._spare, (self.keys, self.values)):
            spare[:, :, :, cached] = buffer[:, :, :, cached].index_select(1, indices)
        self._spare, (self.keys, self.values) = (self.keys, self.values), self._spare

    def _check_indices(self, indices):
        """ValueError unless `indices` is a 1-D integer tensor of rows the cache holds, on its device (index_select
        would raise torch's message naming neither the cache nor the argument, or, on the GPU, a device-side
        assert that ends the process's CUDA context)."""
        if (not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64,
                                                                                                 torch.int32)):
            raise ValueError(f"KVCache reorder indices must be a 1-D int64 or int32 tensor; got "
                             f"{getattr(indices, 'shape', type(indices).__name__)} {getattr(indices, 'dtype', '')}")
        if self.keys is None:
            return
        if indices.device != self.keys.device:
            raise ValueError(f"KVCache reorder indices must be on the cache's device {self.keys.device}; got "
                             f"{indices.device}")
        rows = self.keys.shape[1]
        if indices.numel():
            low, high = (bound.item() for bound in torch.aminmax(indices))
            if low < 0 or high >= rows:
                raise ValueError(f"KVCache reorder indices must be rows in [0, {rows}); got {low} to {high}")
