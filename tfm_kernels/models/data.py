"""Training data: the text corpus (a file, or the English corpus shipped in the package), its
train/validation split, random context windows sharded over processes, and the copy task."""

import os
from importlib import resources

import torch

DEFAULT_CORPUS = "corpus.txt"  # tfm_kernels/data/corpus.txt


def load_corpus(path: str | None = None) -> str:
    """The text at `path`, or the package's default English corpus when path is None.

    Raises FileNotFoundError for a missing path, ValueError for a directory, a file that cannot be read
    (permissions, an I/O error), an empty file, or text that is not UTF-8."""
    if path is None:
        return resources.files("tfm_kernels").joinpath("data", DEFAULT_CORPUS).read_text(encoding="utf-8")
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"corpus must be a text file; {path!r} is a directory")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus {path!r} is not UTF-8 text: {error}") from error
    except OSError as error:
        raise ValueError(f"corpus {path!r} cannot be read: {error.strerror or error}") from error
    if not text.strip():
        raise ValueError(f"corpus {path!r} is empty")
    return text


def split_tokens(tokens: torch.Tensor, val_fraction: float, context_length: int):
    """(train, val) slices of a 1-D token tensor: the last `val_fraction` of the text is held out. Each part
    must hold at least one window of context_length + 1 tokens."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    needed = context_length + 1
    if len(train) < needed or len(val) < needed:
        raise ValueError(
            f"corpus too small: {len(tokens)} tokens give {len(train)} for training and {len(val)} "
            f"for validation with val_fraction {val_fraction}; each needs at least context_length + 1 "
            f"= {needed}"
        )
    return train, val


def _windows(tokens, starts, length):
    """(len(starts), length) inputs and next-token targets cut from the 1-D `tokens` at `starts`."""
    offsets = torch.arange(length + 1)
    window = tokens[starts[:, None] + offsets]  # (N, length + 1)
    return window[:, :-1], window[:, 1:]


def _check_window_fits(tokens, context_length):
    """A window needs context_length inputs and the target after the last of them."""
    if len(tokens) < context_length + 1:
        raise ValueError(f"a window of context_length {context_length} needs at least {context_length + 1} tokens "
                         f"(inputs and the next token as target); got {len(tokens)}")


class LMBatches:
    """Random context windows of a token stream, sharded over processes.

    Every process draws the same global batch of `global_batch` window starts from `generator` (so the stream
    does not depend on the number of processes) and keeps its rank's contiguous slice of it: the processes
    together train on exactly the batch one process would with the same seed."""

    def __init__(self, tokens, context_length, global_batch, rank=0, world_size=1, generator=None):
        if global_batch % world_size:
            raise ValueError(
                f"batch size {global_batch} must be divisible by the number of processes {world_size}"
            )
        _check_window_fits(tokens, context_length)
        self.tokens = tokens
        self.context_length = context_length
        self.global_batch = global_batch
        self.local = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
        self.generator = generator if generator is not None else torch.Generator()

    def next(self):
        """(inputs, targets), each (global_batch / world_size, context_length) int64."""
        high = len(self.tokens) - self.context_length
        starts = torch.randint(0, high, (self.global_batch,), generator=self.generator)
        return _windows(self.tokens, starts[self.local], self.context_length)


def validation_windows(tokens, context_length, count, rank=0, world_size=1):
    """This process's share of `count` evenly spaced, fixed validation windows (inputs, targets)."""
    _check_window_fits(tokens, context_length)
    high = len(tokens) - context_length - 1
    starts = torch.arange(count) * high // max(count - 1, 1)  # integers: linspace's float32 rounds above 2**24
    return _windows(tokens, starts[rank::world_size], context_length)


def copy_task_batch(batch_size, min_length, max_length, symbols, pad_id, bos_id, eos_id, generator=None):
    """A batch of the copy task: random sequences of `symbols` (a 1-D int64 tensor of token ids) with lengths
    uniform in [min_length, max_length], to be reproduced by the decoder.

    Returns src (B, max_length) right-padded with pad_id, tgt_in (B, max_length + 1) = bos + sequence, and
    tgt_out (B, max_length + 1) = sequence + eos, both padded with pad_id."""
    lengths = torch.randint(min_length, max_length + 1, (batch_size,), generator=generator)  # (B,)
    picks = torch.randint(0, len(symbols), (batch_size, max_length), generator=generator)
    sequence = symbols[picks]  # (B, max_length)
    position = torch.arange(max_length + 1)[None, :]  # (1, max_length + 1)
    src = torch.where(position[:, :-1] < lengths[:, None], sequence, pad_id)
    padded = torch.cat([src, torch.full((batch_size, 1), pad_id)], dim=1)  # (B, max_length + 1)
    tgt_in = torch.cat([torch.full((batch_size, 1), bos_id), src], dim=1)
    tgt_out = torch.where(position == lengths[:, None], eos_id, padded)
    return src, tgt_in, tgt_out


def copy_symbols() -> torch.Tensor:
    """The lowercase letters a-z as byte ids: the copy task's alphabet."""
    return torch.arange(ord("a"), ord("z") + 1)
