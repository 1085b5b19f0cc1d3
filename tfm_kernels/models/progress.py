"""A dependency-free progress line on stderr: rewritten in place with carriage returns, so a terminal shows
one updating line and a log file keeps every update."""

import sys
import time


class ProgressLine:
    """Shows "step s/total | loss | lr | tokens/s"; `message` prints a line of its own (evaluations)."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.last_time = time.perf_counter()
        self.tokens_since = 0
        self.open_line = False

    def count_tokens(self, tokens: int):
        self.tokens_since += tokens

    def update(self, step: int, loss: float, lr: float):
        """Shows step `step`; tokens/s is measured over the tokens counted since the previous update."""
        now = time.perf_counter()
        rate = self.tokens_since / max(now - self.last_time, 1e-9)
        self.last_time, self.tokens_since = now, 0
        if self.enabled:
            self.stream.write(
                f"\rstep {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} tokens/s "
            )
            self.stream.flush()
            self.open_line = True

    def message(self, text: str):
        if self.enabled:
            self.stream.write(("\n" if self.open_line else "") + text + "\n")
            self.stream.flush()
            self.open_line = False

    def close(self):
        if self.enabled and self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False
