"""Transformers built on the package's kernels: a decoder-only language model and the encoder-decoder of
"Attention Is All You Need", with key/value-cached generation, training and checkpoints."""

from .cache import KVCache
from .config import LMConfig, Seq2SeqConfig
from .lm import TransformerLM
from .seq2seq import EncoderDecoderTransformer
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "EncoderDecoderTransformer",
    "KVCache",
    "LMConfig",
    "Seq2SeqConfig",
    "TransformerLM",
]
