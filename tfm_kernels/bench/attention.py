"""Attention cases: our backends against torch SDPA's backends, compiled FlexAttention, and
nn.MultiheadAttention against tfm_kernels.nn.MultiheadAttention."""

import functools
import re
import warnings

import torch
import torch.nn.functional as F

from .. import backends
from ..attention import scaled_dot_product_attention
from . import configs
from .suite import Case, Provider, Unavailable, raise_recompile_limit, timed_step, untimed_reason
from .timing import randn, random_inputs

# torch SDPA backends by provider name; math only where its (B, H, L, S) score matrices fit (see _math_fits).
SDPA_PEERS = {"cuda": ("flash", "efficient", "cudnn", "math"), "cpu": ("flash", "math")}
SDPA_ENUM_NAMES = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}
OUR_BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton")}
MATH_MEMORY_LIMIT = 8 * 2**30  # bytes of score-sized tensors the math backend may materialise
FLEX_RECOMPILE_LIMIT = 64  # one compiled FlexAttention per (shape, causal, grad mode) of a sweep


def _qkv_maker(shape: configs.AttentionShape, device):
    qkv_shape = (shape.batch, shape.heads, shape.seq, shape.head_dim)  # (B, H, S, D)
    return random_inputs(qkv_shape, qkv_shape, qkv_shape, dtype=shape.dtype, device=device)


def ours(shape, mode, device, backend) -> Provider:
    def prepare():
        probe = torch.empty(
            shape.batch, shape.heads, shape.seq, shape.head_dim, dtype=shape.dtype, device=device
        )
        reasons = backends.not_supported_reasons(backend, probe, probe, probe, None, None, shape.dropout,
                                                 shape.causal)
        if reasons:
            raise Unavailable("; ".join(reasons))

        def forward(q, k, v):
            return scaled_dot_product_attention(q, k, v, dropout_p=shape.dropout, is_causal=shape.causal,
                                                backend=backend)

        return timed_step(forward, _qkv_maker(shape, device), mode, device)

    return Provider(f"ours-{backend}", True, prepare, untimed=untimed_reason(backend, device),
                    triton_module="attention" if backend == "triton" else "")


def _math_fits(shape, mode) -> tuple[bool, int]:
    """Whether torch's math backend may run: it stores scores and probabilities (and their grads)."""
    copies = 2 if mode == "fwd" else 4
    needed = shape.batch * shape.heads * shape.seq * shape.seq * 4 * copies  # float32 worst case
    return needed <= MATH_MEMORY_LIMIT, needed


# The C++ source line torch's warnings end with, "(Triggered internally at .../sdp_utils_cpp.cpp:99.)".
_TORCH_SOURCE = re.compile(r"\s*\(Triggered internally at [^)]*\)")


def torch_sdpa(shape, mode, device, name) -> Provider:
    def prepare():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_ENUM_NAMES[name], None)
        if backend is None:
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{SDPA_ENUM_NAMES[name]}")
        if name == "math":
            fits, needed = _math_fits(shape, mode)
            if not fits:
                raise Unavailable(f"math materialises {needed / 2**30:.0f} GiB of scores")

        def forward(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=shape.dropout, is_causal=shape.causal)

        make = _qkv_maker(shape, device)
        with warnings.catch_warnings(record=True) as caught:  # torch says why a backend refuses in warnings
            warnings.simplefilter("always")
            try:
                forward(*make(mode != "fwd"))
            except RuntimeError as error:
                why = [_TORCH_SOURCE.sub("", str(w.message).splitlines()[0]) for w in caught]
                raise Unavailable(" ".join(why or [str(error).splitlines()[0]])[:200]) from None
        return timed_step(forward, make, mode, device)

    return Provider(f"torch-{name}", False, prepare)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    raise_recompile_limit(FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention, dynamic=False)


def _causal(batch, head, q_index, kv_index):
    return q_index >= kv_index


def flex(shape, mode, device) -> Provider:
    def prepare():
        if device.type != "cuda":
            raise Unavailable("FlexAttention is timed on GPUs only (its CPU compile outlasts this table)")
        if shape.dropout:
            raise Unavailable("FlexAttention has no dropout")
        try:
            from torch.nn.attention.flex_attention import create_block_mask
        except ImportError as error:
            raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({error})") from None
        attend = _compiled_flex()
        block_mask = None
        if shape.causal:  # blocks above the diagonal are skipped, as our causal kernels skip them
            block_mask = create_block_mask(_causal, None, None, shape.seq, shape.seq, device=device)

        def forward(q, k, v):
            return attend(q, k, v, block_mask=block_mask)

        return timed_step(forward, _qkv_maker(shape, device), mode, device)

    return Provider("torch-flex (compiled)", False, prepare, compiles=True)


def attention_cases(shapes, modes, device, with_flex="headline", with_math=False) -> list[Case]:
    """Cases for every shape and mode. with_flex: "all", "headline" (the headline shapes only: each
    FlexAttention shape costs a compile) or "none"; with_math: time torch's math backend too (slow)."""
    device = torch.device(device)
    cases = []
    for shape in shapes:
        for mode in modes:
            providers = [ours(shape, mode, device, b) for b in OUR_BACKENDS[device.type]]
            providers += [
                torch_sdpa(shape, mode, device, name)
                for name in SDPA_PEERS[device.type]
                if name != "math" or with_math
            ]
            if with_flex == "all" or (with_flex == "headline" and shape.headline):
                providers.append(flex(shape, mode, device))
            cases.append(Case.of_shape("attention", shape, mode, device, providers))
    return cases


# ---------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention against the drop-in.


def _mha_module(cls, shape, device, mode):
    module = cls(shape.embed_dim, shape.heads, batch_first=True, device=device, dtype=shape.dtype)
    with torch.no_grad():
        for p in module.parameters():  # torch initialises biases to zero; benchmark weights are never zeros
            p.copy_(randn(*p.shape, dtype=p.dtype, device=device, scale=p.shape[-1] ** -0.5))
    return module.train(mode != "fwd")  # eval for inference lets torch take its fast path, as users get


def mha(shape: configs.MHAShape, mode, device, which) -> Provider:
    def prepare():
        if which == "ours":
            try:
                from ..nn import MultiheadAttention
            except ImportError as error:
                raise Unavailable(f"tfm_kernels.nn.MultiheadAttention is not available ({error})") from None
        else:
            MultiheadAttention = torch.nn.MultiheadAttention
        module = _mha_module(MultiheadAttention, shape, device, mode)
        mask = None
        if shape.causal:  # MultiheadAttention takes is_causal only as a hint beside the mask itself
            mask = torch.nn.Transformer.generate_square_subsequent_mask(
                shape.seq, device=device, dtype=shape.dtype
            )

        def forward(x):
            return module(x, x, x, need_weights=False, attn_mask=mask, is_causal=shape.causal)[0]

        x_shape = (shape.batch, shape.seq, shape.embed_dim)  # (B, S, E)
        make = random_inputs(x_shape, dtype=shape.dtype, device=device)
        return timed_step(forward, make, mode, device, params=list(module.parameters()))

    name = "ours nn.MultiheadAttention" if which == "ours" else "torch nn.MultiheadAttention"
    on_gpu = torch.device(device).type == "cuda"  # where the module's attention may run our Triton kernels
    return Provider(name, which == "ours", prepare, triton_module="attention" if which == "ours" and on_gpu else "")


def mha_cases(shapes, modes, device) -> list[Case]:
    device = torch.device(device)
    return [
        Case.of_shape("mha", shape, mode, device, [mha(shape, mode, device, w) for w in ("ours", "torch")])
        for shape in shapes
        for mode in modes
    ]
