"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes of the text, followed by three special ids."""

import numpy as np
import torch


class ByteTokenizer:
    """Text <-> token ids. Every str that UTF-8 can encode round-trips (every str but those holding a lone
    surrogate, which is how Python hands over bytes that are not UTF-8 from the command line or a file opened
    with errors="surrogateescape"; encoding one raises UnicodeEncodeError, a ValueError); no vocabulary file,
    no unknown tokens.

    Ids 0..255 are bytes; `pad_id` (256) pads batches, `bos_id` (257) starts and `eos_id` (258) ends a
    sequence. Decoding drops special ids and replaces invalid UTF-8 (a sampled byte sequence may cut a
    multi-byte character) with U+FFFD."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def _utf8(self, text: str) -> bytes:
        """The UTF-8 bytes of `text` (TypeError for a non-str, UnicodeEncodeError for a lone surrogate)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return text.encode("utf-8")

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids."""
        return list(self._utf8(text))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """(len(text.encode()),) int64 tensor of byte ids (empty for empty text)."""
        return torch.from_numpy(np.frombuffer(self._utf8(text), dtype=np.uint8).astype(np.int64))

    def decode(self, ids) -> str:
        """Text of byte ids (a list or 1-D tensor); special ids are dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
