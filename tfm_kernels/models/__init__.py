"""Transformers built on the package's kernels: a decoder-only language model and the encoder-decoder of
"Attention Is All You Need", with key/value-cached generation, training and checkpoints."""

from .baseline import TorchLM, build_torch_lm
from .cache import KVCache
from .config import LMConfig, Seq2SeqConfig
from .generation import beam_search, generate, greedy_decode
from .lm import TransformerLM
from .seq2seq import EncoderDecoderTransformer
from .tokenizer import ByteTokenizer
from .training import TrainConfig, TrainResult, train_copy, train_lm

__all__ = ["ByteTokenizer", "EncoderDecoderTransformer", "KVCache", "LMConfig", "Seq2SeqConfig", "TorchLM",
           "TrainConfig", "TrainResult", "TransformerLM", "beam_search", "build_torch_lm", "generate",
           "greedy_decode", "train_copy", "train_lm"]
