"""Learning-rate schedules as multipliers of the optimizer's base learning rate (for LambdaLR)."""

import math


def warmup_cosine(warmup_steps: int, decay_steps: int, min_ratio: float = 0.1):
    """Linear warm-up over `warmup_steps` to the base rate, then cosine decay to min_ratio * base at
    `decay_steps`, constant after. Returns step -> multiplier."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= decay_steps:
            return min_ratio
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def inverse_sqrt(d_model: int, warmup_steps: int):
    """The paper's schedule: lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), step counted
    from 1 — linear warm-up, then decay with the inverse square root of the step. Returns step -> multiplier
    (of a base rate that scales it, 1.0 for the paper's)."""

    def multiplier(step: int) -> float:
        step = step + 1
        return d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)

    return multiplier
