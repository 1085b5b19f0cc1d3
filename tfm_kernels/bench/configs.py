"""Named model configurations that every benchmark shape comes from.

Attention follows DESIGN.md's method: a fixed budget of B*S = 16k tokens and H*D = 2048 model width, so
that each head dim and sequence length fills the chip with the same amount of work per token. MLP shapes
are the projections of real models at 16k tokens. Nothing here is an ad-hoc size: a shape is a model plus a
sequence length.
"""

from dataclasses import dataclass

import torch

TOKENS = 16384  # B*S of every GPU shape (DESIGN.md)
MODEL_WIDTH = 2048  # H*D of every attention shape (DESIGN.md)


@dataclass(frozen=True)
class AttentionModel:
    """A model's attention geometry: head dim and head count (H*D = MODEL_WIDTH on the GPU sweeps)."""

    name: str
    head_dim: int
    heads: int


@dataclass(frozen=True)
class AttentionShape:
    """One attention problem: q (batch, heads, seq, head_dim), k and v the same (self-attention)."""

    model: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: torch.dtype
    headline: bool = (
        False  # a shape the performance bar is stated at; compile-heavy peers (FlexAttention) run here
    )
    dropout: float = 0.0  # dropout_p on the attention weights, as in training

    @property
    def label(self) -> str:
        dropout = f" dropout {self.dropout:g}" if self.dropout else ""
        return f"{self.model} b{self.batch} h{self.heads} s{self.seq} {'causal' if self.causal else 'full'}{dropout}"

    def flops(self, mode: str) -> float:
        """FLOPs of one call: forward 4*B*H*L*S*D (half when causal), backward 2.5x forward."""
        forward = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        if self.causal:
            forward /= 2
        return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "heads": self.heads,
            "seq": self.seq,
            "head_dim": self.head_dim,
            "causal": self.causal,
            "dropout": self.dropout,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


# GPT-2-like heads of 64 and Llama-like heads of 128, both at the 2048 model width of DESIGN.md.
GPT2_D64 = AttentionModel("gpt2-style d64", head_dim=64, heads=MODEL_WIDTH // 64)
LLAMA_D128 = AttentionModel("llama-style d128", head_dim=128, heads=MODEL_WIDTH // 128)
ATTENTION_MODELS = (GPT2_D64, LLAMA_D128)

CORE_SEQ_LENS = (1024, 4096)  # the device-check table
SWEEP_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)  # the plots
# The performance bar's shapes (bf16 d128 s4096, DESIGN.md's FlexAttention line): (head dim, seq, causal).
HEADLINE_SHAPES = {(128, 4096, False), (128, 4096, True)}


def attention_shapes(
    seq_lens=CORE_SEQ_LENS, models=ATTENTION_MODELS, causal=(False, True), dtype=torch.bfloat16, tokens=TOKENS
) -> list[AttentionShape]:
    """Every (model, seq, causal) combination at `tokens` tokens per batch (B = tokens // seq)."""
    return [
        AttentionShape(
            m.name,
            max(1, tokens // s),
            m.heads,
            s,
            m.head_dim,
            c,
            dtype,
            (m.head_dim, s, c) in HEADLINE_SHAPES,
        )
        for m in models
        for s in seq_lens
        for c in causal
    ]


# Training attention: GPT-2's geometry at s1024, causal, with its dropout of 0.1 on the attention weights (the
# attention of the LM training benchmark). Each dropout keep decision costs the kernels integer work beside the
# tensor cores' (tfm_kernels/rng.py), so the device-check table times it next to torch's kernels.
TRAINING_ATTENTION_SHAPES = [
    AttentionShape(GPT2_D64.name, TOKENS // 1024, GPT2_D64.heads, 1024, GPT2_D64.head_dim, True, torch.bfloat16,
                   dropout=0.1)
]

# The CPU table: (4, 8, 512, 64) float32, the size a 2-core machine times in seconds; --quick shrinks it.
CPU_ATTENTION = AttentionModel("cpu d64", head_dim=64, heads=8)
CPU_ATTENTION_SHAPES = [
    AttentionShape(CPU_ATTENTION.name, 4, 8, 512, 64, c, torch.float32) for c in (False, True)
] + [AttentionShape(CPU_ATTENTION.name, 4, 8, 512, 64, True, torch.float32, dropout=0.1)]
CPU_QUICK_ATTENTION_SHAPES = [
    AttentionShape(CPU_ATTENTION.name, 1, 4, 128, 64, c, torch.float32) for c in (False, True)
]


@dataclass(frozen=True)
class MLPShape:
    """A Transformer MLP: x (tokens, d_model) -> d_ff -> d_model. Gated: act(x Wg^T) * (x Wu^T) from a packed
    (2*d_ff, d_model) weight, no biases (Llama); else act(x W1^T + b1) W2^T + b2 (GPT-2)."""

    model: str
    tokens: int
    d_model: int
    d_ff: int
    activation: str
    gated: bool
    dtype: torch.dtype

    @property
    def label(self) -> str:
        gated = " gated" if self.gated else ""
        return f"{self.model} {self.tokens}x{self.d_model}->{self.d_ff} {self.activation}{gated}"

    def flops(self, mode: str) -> float:
        """2*M*N*K per GEMM: up (N = d_ff, twice when gated) and down; backward 2x forward."""
        up = 2.0 * self.tokens * self.d_ff * self.d_model * (2 if self.gated else 1)
        down = 2.0 * self.tokens * self.d_model * self.d_ff
        return (up + down) * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "activation": self.activation,
            "gated": self.gated,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


MLP_SHAPES = [
    MLPShape("gpt2-medium d1024", TOKENS, 1024, 4096, "gelu", False, torch.bfloat16),
    MLPShape("gpt-style d4096", TOKENS, 4096, 16384, "gelu", False, torch.bfloat16),  # DESIGN.md's MLP line
    MLPShape("llama-7b swiglu", TOKENS, 4096, 11008, "silu", True, torch.bfloat16),
]
HEADLINE_MLP = "gpt-style d4096"  # DESIGN.md's MLP reference (eager 675, compiled 698 TFLOP/s on an H200)
CPU_MLP_SHAPES = [
    MLPShape("cpu d256", 512, 256, 1024, "gelu", False, torch.float32),
    MLPShape("cpu d256 swiglu", 512, 256, 688, "silu", True, torch.float32),
]
CPU_QUICK_MLP_SHAPES = [
    MLPShape("cpu d128", 128, 128, 512, "gelu", False, torch.float32),
    MLPShape("cpu d128 swiglu", 128, 128, 344, "silu", True, torch.float32),
]


@dataclass(frozen=True)
class MHAShape:
    """Self-attention through nn.MultiheadAttention: x (batch, seq, embed_dim), batch_first."""

    model: str
    batch: int
    seq: int
    embed_dim: int
    heads: int
    causal: bool
    dtype: torch.dtype

    @property
    def label(self) -> str:
        kind = "causal" if self.causal else "full"
        return f"{self.model} b{self.batch} s{self.seq} e{self.embed_dim} h{self.heads} {kind}"

    def flops(self, mode: str) -> float:
        """Projections (in: 3 GEMMs, out: 1, each 2*T*E*E) plus attention (DESIGN.md's count)."""
        tokens = self.batch * self.seq
        projections = 8.0 * tokens * self.embed_dim * self.embed_dim
        attention = AttentionShape(
            self.model,
            self.batch,
            self.heads,
            self.seq,
            self.embed_dim // self.heads,
            self.causal,
            self.dtype,
        ).flops("fwd")
        return (
            projections * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]
            + attention * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
        )

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "seq": self.seq,
            "embed_dim": self.embed_dim,
            "heads": self.heads,
            "causal": self.causal,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


# The drop-in module's bar (d 1024, 16 heads, s 1024, batch 16, bf16, causal and not).
MHA_SHAPES = [MHAShape("encoder d1024", 16, 1024, 1024, 16, c, torch.bfloat16) for c in (False, True)]
CPU_MHA_SHAPES = [MHAShape("cpu e256", 2, 128, 256, 4, c, torch.float32) for c in (False, True)]


@dataclass(frozen=True)
class EncoderShape:
    """A stack of nn.TransformerEncoderLayer (pre-norm off, GELU), trained on (batch, seq, d_model)."""

    model: str
    layers: int
    d_model: int
    heads: int
    d_ff: int
    batch: int
    seq: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.model} {self.layers}x d{self.d_model} h{self.heads} b{self.batch} s{self.seq}"

    def tokens(self) -> int:
        return self.batch * self.seq

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "d_model": self.d_model,
            "heads": self.heads,
            "d_ff": self.d_ff,
            "batch": self.batch,
            "seq": self.seq,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


# DESIGN.md's nn.TransformerEncoder d1024, 12 layers, s1024, b16, but with bfloat16 parameters where DESIGN.md
# trained float32 ones under bf16 autocast: ours and torch's run alike, so their ratio holds, but tokens/s is
# not comparable with DESIGN.md's figures.
ENCODER_SHAPES = [EncoderShape("encoder d1024", 12, 1024, 16, 4096, 16, 1024, torch.bfloat16)]
CPU_ENCODER_SHAPES = [EncoderShape("cpu encoder d128", 2, 128, 4, 512, 2, 64, torch.float32)]
