"""vmap rules for the operators (torch.library.register_vmap).

Without a rule, vmap runs an operator once per vmapped element through torch's fallback, and warns. These rules
fold the vmapped dimension into one the kernels already have: the attention operators' batch (B -> n * B) and
the MLP forwards' rows (M -> n * M). One kernel call then serves all n elements.

Where folding would change a result, a rule runs one call per element, as the fallback does:
- with dropout: a keep-mask depends on the batch or row index (tfm_kernels.rng), so a folded call would draw
  other masks than the per-element calls (which give every element the same mask under vmap's
  randomness="same", and each its own seed under "different");
- for the MLP backwards: each element needs its own weight gradient, and the kernels sum over all rows;
- for vmapped MLP weights.
"""

import torch


def _merge_leading(t):
    """(n, B, ...) -> (n * B, ...). Zero-stride (broadcast) dims after the first two stay broadcast: only the
    first two dims are ever copied."""
    n, B, *inner = t.shape
    compact = t
    for dim, (size, stride) in enumerate(zip(inner, t.stride()[2:]), start=2):
        if stride == 0 and size > 1:
            compact = compact.narrow(dim, 0, 1)
    return compact.reshape(n * B, *compact.shape[2:]).expand(n * B, *inner)


def _fold(t, dim, n):
    """One element's (B, ...), vmapped at `dim` (None: shared by all n elements) -> (n * B, ...)."""
    t = t.expand(n, *t.shape) if dim is None else t.movedim(dim, 0)  # (n, B, ...)
    return _merge_leading(t)


def _per_element(op, info, in_dims, args):
    """The operator once per vmapped element; every output stacked along a new dim 0."""
    calls = [op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
    outputs = tuple(torch.stack(parts) for parts in zip(*calls))
    return outputs, (0,) * len(outputs)


def _no_elements(op, in_dims, args):
    """vmap over zero elements: empty outputs of each output's per-element shape (the fake kernel's, on the meta
    device) behind a dim of size 0."""
    def element(a, d):  # one element's tensor, as a meta tensor
        if not isinstance(a, torch.Tensor):
            return a
        shape = a.shape if d is None else a.shape[:d] + a.shape[d + 1:]
        return torch.empty(shape, dtype=a.dtype, device="meta")

    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    outputs = op(*(element(a, d) for a, d in zip(args, in_dims)))
    return tuple(torch.empty((0, *o.shape), dtype=o.dtype, device=device) for o in outputs), (0,) * len(outputs)


def _register(name, folded, per_element_when, max_batch=None):
    """A rule for tfm_kernels::`name`: the arguments at the indices `folded` are folded (their first dim
    times n), and every output is unfolded ((n * B, ...) -> (n, B, ...), a view unless chunked); or one call per
    element where per_element_when(in_dims, args) is true. With `max_batch`, a folded batch larger than that runs
    in chunks of elements, their outputs concatenated."""
    op = getattr(torch.ops.tfm_kernels, name)

    def folded_call(n, in_dims, args):  # the op once for n elements
        args = [_fold(a, d, n) if i in folded and a is not None else a for i, (a, d) in enumerate(zip(args, in_dims))]
        return tuple(o.unflatten(0, (n, -1)) for o in op(*args))

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            return _no_elements(op, in_dims, args)
        if per_element_when(in_dims, args):
            return _per_element(op, info, in_dims, args)
        n = info.batch_size
        batch = args[folded[0]].shape[1 if in_dims[folded[0]] == 0 else 0]  # one element's B
        total = n * batch
        # One call, without a loop over n, where the folded batch fits or is symbolic (torch.compile(dynamic=True),
        # export): n stays symbolic, and a CUDA kernel refuses a batch past its limit with a clear error.
        if max_batch is None or not isinstance(total, int) or total <= max_batch:
            outputs = folded_call(n, in_dims, args)
            return outputs, (0,) * len(outputs)
        step = max(1, max_batch // batch)
        chunks = []
        for start in range(0, n, step):
            size = min(step, n - start)
            chunk = [a if d is None else a.narrow(d, start, size) for a, d in zip(args, in_dims)]
            chunks.append(folded_call(size, in_dims, chunk))
        outputs = chunks[0] if len(chunks) == 1 else tuple(torch.cat(parts) for parts in zip(*chunks))
        return outputs, (0,) * len(outputs)

    torch.library.register_vmap(f"tfm_kernels::{name}", rule)


def _always(in_dims, args):
    return True


def _attention_per_element(in_dims, args):  # args end with dropout_p, is_causal, scale, seed
    return args[-4] > 0.0


def register_attention(forward_name, backward_name, max_batch=None):
    """forward (q, k, v, mask, key_lengths, dropout_p, is_causal, scale, seed): folds q, k, v, mask and
    key_lengths, the (B, ...) tensors; backward (grad_out, q, k, v, out, lse, mask, key_lengths, ...) likewise.
    max_batch: the most batch entries one call takes (the CUDA kernels' grid limit, applied on every device the
    operators serve)."""
    _register(forward_name, range(5), _attention_per_element, max_batch)
    _register(backward_name, range(8), _attention_per_element, max_batch)


def _mlp_forward_per_element(weights):
    def per_element(in_dims, args):  # args end with activation, dropout_p, seed
        return args[-2] > 0.0 or any(d is not None for d in in_dims[1:1 + weights])

    return per_element


def register_mlp(forward_name, backward_name, weights):
    """forward (x, *the `weights` weights and biases, activation, dropout_p, seed): folds x (M, K), the rows;
    backward: one call per element."""
    _register(forward_name, range(1), _mlp_forward_per_element(weights))
    _register(backward_name, (), _always)
