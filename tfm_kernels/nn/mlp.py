"""Feed-forward modules on the fused MLP operators: FusedMLP (the linear1/linear2 block of
nn.TransformerEncoderLayer, state_dict compatible) and GatedMLP (SwiGLU / GeGLU with a packed gate+up
weight)."""

import torch
from torch import nn
from torch.nn import functional as F

from ..backends import check_backend
from ..mlp import ACTIVATIONS, mlp
from ..reference import activation
from .torchscript import refuse_torchscript

# The activation callables nn.TransformerEncoderLayer accepts, by the name the fused kernels use.
_CALLABLE_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.silu: "silu"}


def fused_activation_name(activation):
    """The name under which the fused MLP computes `activation` (a layer's callable), or None if it does not.

    relu: F.relu, torch.relu, nn.ReLU; gelu: F.gelu, nn.GELU(); gelu_tanh: nn.GELU(approximate="tanh");
    silu: F.silu, nn.SiLU. Modules count only as exactly these classes without hooks (subclasses may
    compute something else)."""
    if isinstance(activation, nn.Module):
        if not runs_as_its_class(activation, (nn.ReLU, nn.GELU, nn.SiLU)):
            return None
        if isinstance(activation, nn.GELU):
            return "gelu" if activation.approximate == "none" else "gelu_tanh"
        return "relu" if isinstance(activation, nn.ReLU) else "silu"
    return next((name for fn, name in _CALLABLE_ACTIVATIONS.items() if fn is activation), None)


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def runs_as_its_class(module, classes):
    """Whether calling `module` computes exactly what its class's forward does in `classes`: the class itself (no
    subclass, e.g. a quantized or LoRA Linear), and no hooks of the module or global ones (which may change
    inputs or outputs, or expect to run: spectral_norm's pre-hook, a profiler's forward hook)."""
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    return (type(module) in classes and not any(own)
            and not any(getattr(torch.nn.modules.module, name) for name in _GLOBAL_HOOKS))


def _activation_name(activation):
    """A name from ACTIVATIONS, or the one the fused MLP computes a layer's activation callable under
    (fused_activation_name: F.relu, F.gelu, F.silu, nn.ReLU(), nn.GELU(approximate=...), nn.SiLU())."""
    if activation is None or isinstance(activation, str):
        name, known = activation, activation in ACTIVATIONS
    else:
        name = fused_activation_name(activation)
        known = name is not None
    if not known:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, F.relu, F.gelu, F.silu, or an nn.ReLU, nn.GELU "
                         f"or nn.SiLU module without hooks; got {activation!r}")
    return name


def linears_as_modules(*linears):
    """Whether a module's linears must be called rather than read (weight, bias) by the fused MLP: one is not
    exactly nn.Linear, or has hooks (a forward hook, spectral_norm's or torch.nn.utils.prune's pre-hook, a
    global hook)."""
    return not all(runs_as_its_class(linear, (nn.Linear,)) for linear in linears)


def _check_dropout(dropout):
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")


class FusedMLP(nn.Module):
    """linear2(dropout(act(linear1(x)))) in fused kernels: the feed-forward of nn.TransformerEncoderLayer.

    Parameters are `linear1` (d_ff, d_model) and `linear2` (d_model, d_ff) nn.Linear modules, so the
    state_dict keys (`linear1.weight`, `linear1.bias`, `linear2.weight`, `linear2.bias`) are those of the
    encoder layer's feed-forward. Dropout (probability `dropout`, training mode only) follows the
    activation; the layer's second dropout, after linear2, is not part of this module. Linears with hooks
    (spectral_norm, torch.nn.utils.prune) or of a subclass are called as modules, in torch ops (dropout then
    from torch's generator), as the Transformer layers' feed-forward does; GatedMLP likewise.

    Args:
        d_model: input and output features; d_ff: hidden features.
        activation: "relu" (default, as nn.TransformerEncoderLayer), "gelu" (erf), "gelu_tanh", "silu",
            None, the callables F.relu, F.gelu, F.silu, or an nn.ReLU, nn.GELU (either approximation) or nn.SiLU
            module without hooks, as a torch layer's `activation` holds them.
        dropout: in [0, 1). bias: whether both linears have a bias.
        backend: "auto", "cuda", "triton", "cpu" or "torch" (see tfm_kernels.fused_linear).
    Input (..., d_model) in the parameters' dtype -> output (..., d_model) in that dtype (under autocast: the
    autocast dtype).
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, d_model, d_ff, activation="relu", dropout=0.1, bias=True, device=None, dtype=None, *,
                 backend="auto"):
        super().__init__()
        activation = _activation_name(activation)
        _check_dropout(dropout)
        check_backend(backend)
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.dropout = float(dropout)
        self.backend = backend

    def forward(self, x):
        dropout_p = self.dropout if self.training else 0.0
        if linears_as_modules(self.linear1, self.linear2):  # torch ops, so that hooks and subclasses run
            hidden = activation(self.linear1(x), self.activation)  # (..., d_ff)
            return self.linear2(F.dropout(hidden, dropout_p, training=dropout_p > 0.0))
        return mlp(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                   self.activation, dropout_p, backend=self.backend)

    def extra_repr(self):
        return f"activation={self.activation!r}, dropout={self.dropout}, backend={self.backend!r}"


class GatedMLP(nn.Module):
    """down_proj(dropout(act(x Wg^T) * (x Wu^T))): SwiGLU ("silu", default), GeGLU ("gelu", "gelu_tanh").

    Parameters: `gate_up_proj` nn.Linear(d_model, 2 d_ff) whose weight rows [0, d_ff) are the gate projection
    and rows [d_ff, 2 d_ff) the up projection, and `down_proj` nn.Linear(d_ff, d_model).

    Separate gate/up weights load in either of two ways:
      - `module.load_gate_up(gate_weight, up_weight, gate_bias=None, up_bias=None)` copies them in;
      - `module.load_state_dict(sd)` where sd holds `gate_proj.weight` and `up_proj.weight` (and biases) in
        place of `gate_up_proj.*`, the layout of LLaMA-style MLPs (gate_proj, up_proj, down_proj): a load
        hook packs them as torch.cat([gate, up]).

    Args:
        d_model: input and output features; d_ff: hidden features (width of the gated product).
        activation: as FusedMLP; dropout: after the gated product, training mode only; bias: on both linears.
        backend: as FusedMLP.
    Input (..., d_model) -> output (..., d_model).
    """

    __prepare_scriptable__ = refuse_torchscript

    def __init__(self, d_model, d_ff, activation="silu", dropout=0.0, bias=False, device=None, dtype=None, *,
                 backend="auto"):
        super().__init__()
        activation = _activation_name(activation)
        _check_dropout(dropout)
        check_backend(backend)
        self.gate_up_proj = nn.Linear(d_model, 2 * d_ff, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.dropout = float(dropout)
        self.backend = backend
        self.register_load_state_dict_pre_hook(_pack_gate_up_keys)

    def forward(self, x):
        gate_up, down = self.gate_up_proj, self.down_proj
        dropout_p = self.dropout if self.training else 0.0
        if linears_as_modules(gate_up, down):  # torch ops, so that hooks and subclasses run
            gate, up = gate_up(x).chunk(2, dim=-1)  # (..., d_ff) each
            hidden = activation(gate, self.activation) * up  # (..., d_ff)
            return down(F.dropout(hidden, dropout_p, training=dropout_p > 0.0))
        return mlp(x, gate_up.weight, gate_up.bias, down.weight, down.bias, self.activation, dropout_p, gated=True,
                   backend=self.backend)

    @torch.no_grad()
    def load_gate_up(self, gate_weight, up_weight, gate_bias=None, up_bias=None):
        """Copies separate gate (d_ff, d_model) and up (d_ff, d_model) weights (and (d_ff,) biases) into
        gate_up_proj. Every argument is checked before anything is copied."""
        has_bias = self.gate_up_proj.bias is not None
        if (gate_bias is not None) != has_bias or (up_bias is not None) != has_bias:
            raise ValueError(f"gate_bias and up_bias must both be given iff the module has biases "
                             f"(bias={has_bias}); got gate_bias "
                             f"{'set' if gate_bias is not None else 'None'}, up_bias "
                             f"{'set' if up_bias is not None else 'None'}")
        for name, t in (("gate_weight", gate_weight), ("up_weight", up_weight), ("gate_bias", gate_bias),
                        ("up_bias", up_bias)):
            expected = _half_shape(self, name.split("_")[1])
            if t is None and name.endswith("weight"):
                raise TypeError(f"{name} must be a tensor of shape {expected}; got None")
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a tensor of shape {expected}; got {type(t).__name__}")
            if t is not None and tuple(t.shape) != expected:
                raise ValueError(f"{name} must have shape {expected}; got {tuple(t.shape)}")
        self.gate_up_proj.weight.copy_(torch.cat([gate_weight, up_weight]))  # (2 d_ff, d_model)
        if has_bias:
            self.gate_up_proj.bias.copy_(torch.cat([gate_bias, up_bias]))  # (2 d_ff,)

    def extra_repr(self):
        return f"activation={self.activation!r}, dropout={self.dropout}, backend={self.backend!r}"


def _half_shape(module, kind):
    """The shape of the gate or the up half of module.gate_up_proj's `kind` ("weight" or "bias"):
    (d_ff, d_model) or (d_ff,)."""
    d_ff2, d_model = module.gate_up_proj.weight.shape
    return (d_ff2 // 2, d_model) if kind == "weight" else (d_ff2 // 2,)


def _pack_gate_up_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    """Load hook: `gate_proj.*` + `up_proj.*` entries become one packed `gate_up_proj.*` entry where each has
    its half's shape; otherwise the load fails with a size mismatch that names them."""
    for kind in ("weight", "bias"):
        gate_key, up_key = f"{prefix}gate_proj.{kind}", f"{prefix}up_proj.{kind}"
        if gate_key in state_dict and up_key in state_dict:
            gate, up = state_dict.pop(gate_key), state_dict.pop(up_key)
            expected = _half_shape(module, kind)
            if tuple(gate.shape) == tuple(up.shape) == expected:
                state_dict[f"{prefix}gate_up_proj.{kind}"] = torch.cat([gate, up])  # (2 d_ff, ...)
            else:
                error_msgs.append(f"size mismatch for {gate_key} and {up_key}: each must have shape {expected}; "
                                  f"got {tuple(gate.shape)} and {tuple(up.shape)}")
