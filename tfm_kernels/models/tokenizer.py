"""Byte-level tokenizer: ids 0-255 are the UTF-8 bytes of the text, followed by three special ids."""

import torch


class ByteTokenizer:
    """Text <-> token ids. Every string round-trips; no vocabulary file, no unknown tokens.

    Ids 0..255 are bytes; `pad_id` (256) pads batches, `bos_id` (257) starts and `eos_id` (258) ends a
    sequence. Decoding drops special ids and replaces invalid UTF-8 (a sampled byte sequence may cut a
    multi-byte character) with U+FFFD."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """(len(text.encode()),) int64 tensor of byte ids."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)

    def decode(self, ids) -> str:
        """Text of byte ids (a list or 1-D tensor); special ids are dropped."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
