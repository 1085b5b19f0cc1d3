"""Compares a tfm_kernels.nn module with the torch.nn module it replaces under the tolerance rule: the
oracle is torch's module in float64, the baseline torch's module in the test dtype, the result ours in the
test dtype, all holding the same (test-dtype) weights and fed the same inputs. Outputs and the gradients of
every input and parameter are checked."""

import copy

import torch
from tolerance import assert_within_tolerance


def randomize_parameters(module, scale=0.2):
    """Non-zero biases and norm weights (torch initialises biases to 0, which would hide their gradients)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() < 2:
                p.add_(scale * torch.randn_like(p))
    return module


def _prepare(inputs, dtype):
    prepared = {}
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t = t.detach().to(dtype)
            if "mask" not in name:
                t.requires_grad_()
        prepared[name] = t
    return prepared


def _run(module, inputs, call, dtype, grad_outs):
    prepared = _prepare(inputs, dtype)
    outs = [o for o in call(module, prepared) if o is not None]
    if grad_outs is None:
        grad_outs = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grad_outs))
    leaves = {f"grad {n}": t for n, t in prepared.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    leaves.update({f"grad {n}": p for n, p in module.named_parameters()})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    results = {f"out{i}": o.detach() for i, o in enumerate(outs)}
    results.update({n: g for n, g in zip(leaves, grads) if g is not None})
    return results, grad_outs


def check_against_torch(torch_module, ours, inputs, call, dtype=torch.float32, compare=None):
    """torch_module and ours: modules in `dtype` with equal state; inputs: name -> tensor (float tensors are
    cast to each run's dtype and, unless their name holds "mask", take gradients); call(module, inputs) ->
    tuple of outputs (None entries ignored). `compare(name, tensor)` may select the part of an output to
    compare (e.g. the positions where torch's output is defined). Returns ours' results by name."""
    oracle_module = copy.deepcopy(torch_module).double()
    ours_results, grad_outs = _run(ours, inputs, call, dtype, None)
    base_results, _ = _run(torch_module, inputs, call, dtype, grad_outs)
    oracle_results, _ = _run(oracle_module, inputs, call, torch.float64, grad_outs)
    assert ours_results.keys() == base_results.keys() == oracle_results.keys()
    for name in ours_results:
        result, base, oracle = ours_results[name], base_results[name], oracle_results[name]
        if compare is not None:
            result, base, oracle = (compare(name, t) for t in (result, base, oracle))
        assert_within_tolerance(name, result, base, oracle)
    return ours_results
