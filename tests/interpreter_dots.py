"""The Triton interpreter's float16/float32 dots, as the suite models them: each output element summed exactly and
rounded once to float32 (with the accumulator), whatever the operands' shapes.

The interpreter computes tl.dot with numpy's float32 matmul, whose summation order depends on the block shapes
and layouts. The attention backward recomputes the forward's scores (and the dO v^T product that
rowsum(dO * O) must equal in a row that sees one key) with other block shapes and operand orders; a GPU sums each
of them in one fixed order, so they agree bit for bit there, while numpy's sums differ and the weights rebuilt
from the saved log-sum-exp miss the forward's (at scores near 100, dv 5x torch's float32 error). The GPU's own
float32 dot rounding is checked on the GPU (the `gpu` tests). bfloat16 dots stay the interpreter's own."""

import numpy as np
from triton.runtime import interpreter

_EXACT_TYPES = (np.float16, np.float32)


def _rounded_once(builder_dot):
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype not in _EXACT_TYPES or b.data.dtype not in _EXACT_TYPES or d.data.dtype != np.float32:
            return builder_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data
        return interpreter.TensorHandle(exact.astype(np.float32), d.dtype.scalar)

    return create_dot


def model_gpu_dots():
    """Replaces the interpreter's dot for the rest of the process."""
    interpreter.InterpreterBuilder.create_dot = _rounded_once(interpreter.InterpreterBuilder.create_dot)
