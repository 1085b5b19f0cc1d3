"""Replaying a Triton kernel's compiled launches without Triton's per-launch work.

Each `kernel[grid](*args)` call binds and specialises every argument, looks the compiled kernel up, checks the
globals the kernel reads and only then calls the compiled launcher. On the development machine that path took
32 us of host time per attention launch, where the compiled launcher's own call (stand-in driver) takes under
1 us; an attention forward+backward makes four launches. The launchers of this package call the same kernel
with the same few shapes again and again (a layer's every step), so each kernel keeps the compiled kernels of
its launches here, by a fingerprint of the arguments, and later launches of an equal fingerprint call the
compiled launcher directly, with the argument values Triton would pass it.

The fingerprint holds everything Triton's specialisation of a launch can depend on (a superset):
  tensors       dtype and whether the address is 16-byte aligned;
  tensor descriptors   the base's dtype, the block shape, the padding and rounding options (the descriptor's
                shape and strides are read by the launcher at each launch, not compiled in);
  ints          the exact value;
  floats        the type only (always passed as fp32), so that a changing scale replays;
  bools, str, None   the value;
plus the keyword constexprs and the current device. A caller that chooses a tile config per launch adds what
the choice depends on, and the objects it chooses from as a guard (a replay needs the same objects). An
argument of any other kind makes the launch go through Triton every time.

Launches whose fingerprints differ only in ints that Triton specialises alike (1 is compiled in; others by
width, i32, i64 or u64, and by whether 16 divides them) form a family, and share one compiled kernel: a new
fingerprint replays its family's kernel and is kept from then on. So a sequence length that grows by one at
each step (decoding against a key/value cache) replays. A caller whose choices read the exact value of ints
(an autotuned config, chosen per size class) adds what its choice reads of them to the family.

What a replay skips: Triton's check that the globals a kernel reads have not changed since it compiled, and
Triton's knobs (debug, instrumentation), read at the fingerprint's first launch. Interpreted kernels
(TRITON_INTERPRET) are never replayed, nor a kernel with pre-run hooks (Triton runs them at every launch),
nor anything with TFM_KERNELS_REPLAY=0.
"""

import os

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

REPLAY = os.environ.get("TFM_KERNELS_REPLAY", "1") != "0"
# Fingerprints kept per kernel; past this the cache starts over (a workload whose shapes never repeat).
MAX_REPLAYED_LAUNCHES = 64


def argument_fingerprint(args):
    """The fingerprint of positional launch arguments (see the module docstring); None where one is of a kind
    that is not replayed."""
    prints = []
    for a in args:
        kind = type(a)
        if kind is int or kind is str or a is None:
            prints.append(a)
        elif isinstance(a, torch.Tensor):
            prints.append((a.dtype, a.data_ptr() % 16 == 0))
        elif kind is float:
            prints.append(float)
        elif kind is bool:
            prints.append((bool, a))  # apart from the ints 0 and 1, which Triton specialises otherwise
        elif kind is TensorDescriptor:
            prints.append((kind, a.base.dtype, tuple(a.block_shape), a.padding,
                           getattr(a, "round_f32_to_tf32", False)))
        else:
            return None
    return tuple(prints)


def _int_specialisation(n):
    """What Triton compiles an int argument for: the constant 1, or the width and whether 16 divides it."""
    if n == 1:
        return 1
    width = "i32" if -0x80000000 <= n <= 0x7FFFFFFF else "i64" if n <= 0x7FFFFFFFFFFFFFFF else "u64"
    return width, n % 16 == 0


def family(fingerprint, choice_inputs):
    """The family of a launch (see the module docstring): its fingerprint with each int argument replaced by
    what Triton specialises of it, and `choice_inputs`, what the caller's choices read of the ints."""
    device, prints, constants, extra = fingerprint
    specialised = tuple([_int_specialisation(p) if type(p) is int else p for p in prints])
    return device, specialised, constants, extra, choice_inputs


class ReplayedLaunches:
    """The compiled launches of one Triton kernel, by fingerprint.

    `launch(grid, args, constants)` is `kernel[grid](*args, **constants)`, replayed where it can. Callers that
    choose a tile config per launch (TunedKernel) use the steps: fingerprint, replay, and after a launch
    through Triton, record. Their `guard` is a tuple of the objects the choice was made from: a replay needs
    each to be the same object (not an equal one), so that replacing a config list (as tests do, to force a
    config) is never answered with a config of the old list. Their `choice_inputs()` gives what the choice
    reads of the int arguments (their family, in the module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled = isinstance(kernel, JITFunction)  # not an interpreted one
        # fingerprint -> (compiled kernel, trailing argument values, constants, pre_hook, guard)
        self._entries = {}
        self._families = {}  # family -> the entry of its latest launch through Triton

    def __len__(self):
        return len(self._entries)

    def launch(self, grid, args, constants):
        fingerprint = self.fingerprint(args, constants)
        if not self.replay(fingerprint, grid, args):
            self.record(fingerprint, self.kernel[grid](*args, **constants), args, constants)

    def fingerprint(self, args, constants, *extra):
        """The launch's fingerprint: the current device, `args`' fingerprint, the keyword `constants` and
        whatever else the caller's choices depend on (`extra`); None where the launch is not replayed."""
        if not (self._compiled and REPLAY) or self.kernel.pre_run_hooks:
            return None
        prints = argument_fingerprint(args)
        if prints is None:
            return None
        return driver.active.get_current_device(), prints, tuple(constants.items()), extra

    def replay(self, fingerprint, grid, args, guard=(), choice_inputs=tuple):
        """Launches the compiled kernel recorded for `fingerprint` (or its family) and `guard` on `args`; False
        (nothing launched) where none is. `grid` is a tuple, or a callable of the named arguments (tile sizes
        included) as Triton calls it."""
        entry = self._entries.get(fingerprint)
        new = entry is None and fingerprint is not None
        if new:
            entry = self._families.get(family(fingerprint, choice_inputs()))
        if entry is None or any(kept is not now for kept, now in zip(entry[4], guard, strict=True)):
            return False
        if new:
            self._keep(fingerprint, entry)
        compiled, trailing, constants, pre_hook, _ = entry
        if pre_hook is not None or callable(grid):
            named = dict(zip(self.kernel.arg_names, args))
            named.update(constants)
            if pre_hook is not None:
                pre_hook(named)
            if callable(grid):
                grid = grid(named)
        stream = driver.active.get_current_stream(fingerprint[0])
        values = (*args, *trailing)
        runtime = knobs.runtime
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, compiled.launch_metadata(grid, stream, *values),
                     runtime.launch_enter_hook, runtime.launch_exit_hook, *values)
        return True

    def record(self, fingerprint, compiled, args, constants, pre_hook=None, guard=(), choice_inputs=tuple):
        """Keeps `compiled`, what a launch through Triton of `args` and the keyword `constants` (a config's
        tile sizes and options included) returned, for replays of `fingerprint`, of its family, and `guard`;
        `pre_hook` (a config's) runs before each replay. Nothing is kept without a fingerprint or a compiled
        kernel, or where a parameter was left to its default."""
        if fingerprint is None or compiled is None:
            return
        names = self.kernel.arg_names[len(args):]
        if any(name not in constants for name in names):
            return
        entry = (compiled, tuple(constants[name] for name in names), dict(constants), pre_hook, guard)
        self._keep(fingerprint, entry)
        self._families[family(fingerprint, choice_inputs())] = entry

    def clear(self):
        """Forgets every recorded launch: the next launch of each fingerprint goes through Triton again."""
        self._entries.clear()
        self._families.clear()

    def _keep(self, fingerprint, entry):
        if len(self._entries) >= MAX_REPLAYED_LAUNCHES:
            self.clear()
        self._entries[fingerprint] = entry
