"""Launching a Triton kernel that has a short list of tile configs.

Problems of at least `min_work` (a kernel-defined measure: score elements for attention, multiply-adds for a
GEMM) are autotuned: every config that fits the device's shared memory is compiled and timed once per autotune
key and size class. Before a new key is timed, its configs are compiled in parallel threads
(parallel_compilation; compiles release the GIL and run ptxas as a subprocess: 8 sm_90 compiles took 3.3 s on
2 threads against 7.2 s in turn on the development machine), so tuning costs about one compile's time rather
than one per config. Smaller problems, and every call with TFM_KERNELS_AUTOTUNE=0, take the first listed
config that fits, so tests and small calls compile one config instead of the whole list (a GPU test suite of a
few hundred shapes would otherwise compile thousands of variants).
"""

import contextlib
import functools
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
from triton.runtime import _async_compile
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backends import triton_interpreting
from .replay import ReplayedLaunches

AUTOTUNE = os.environ.get("TFM_KERNELS_AUTOTUNE", "1") != "0"
# Off the GPU (the interpreter) there is no device limit; the largest any supported device gives is 227 KiB.
SHARED_MEMORY_OFF_GPU = 227 * 1024
COMPILE_THREADS = os.cpu_count() or 1
# The block size of every dimension of a tensor descriptor that a launch does not read (see unread_descriptors).
UNREAD_BLOCK = 16


def device_guard(t):
    """Makes `t`'s CUDA device the current one: Triton launches on the current device, whatever device the
    arguments are on."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@contextlib.contextmanager
def parallel_compilation():
    """Triton's AsyncCompileMode over a thread pool: kernels warmed up inside compile in parallel, all of them
    finished on exit. Triton 3.6 leaves the mode active when its exit is interrupted (Ctrl-C while it waits for
    the compiles), and every later compile in this thread would go to the closed pool; the mode is cleared
    here whatever happens."""
    with ThreadPoolExecutor(COMPILE_THREADS) as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=True)
        try:
            with mode:
                yield
        finally:
            if _async_compile.active_mode.get() is mode:
                _async_compile.active_mode.set(None)


def shared_memory_budget(device, margin):
    """Bytes of shared memory a config's estimate may take on `device`: the per-block opt-in limit less
    `margin` (what the kernel's estimate leaves out, e.g. layout-conversion scratch)."""
    if device.type != "cuda":
        return SHARED_MEMORY_OFF_GPU - margin
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin - margin


def device_kind(device):
    """What a tuned config depends on in `device`: the GPU model and its SM count (a MIG slice has fewer SMs
    than the whole card), or the interpreter. Devices of one kind share their autotuning results."""
    if device.type != "cuda":
        return "interpreter"
    properties = torch.cuda.get_device_properties(device)
    return properties.name, properties.multi_processor_count


def tensor_descriptors_supported(device):
    """Whether kernels on `device` may load through tensor descriptors (TMA): Hopper (sm_90) and newer, and the
    interpreter (which emulates them, so CPU tests cover those code paths)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return triton_interpreting()


def cdiv(a, b):
    """ceil(a / b) of positive integers, for launch grids: triton.cdiv is a constexpr function, whose wrapper
    costs the host about 2 us a call."""
    return -(-a // b)


def next_power_of_2(n):
    """The least power of 2 >= n (n >= 1), as triton.next_power_of_2 without its wrapper's host cost."""
    return 1 << (n - 1).bit_length()


def descriptor(t, shape, strides):
    """A tensor descriptor over `t`'s memory with this shape and element strides, or None where TMA might not
    read it: not 16-bit elements, a base or a stride not 16-byte aligned, an empty dimension, or a layout that
    is not row-major in the given dimension order (each stride at least the extent of the dimensions inside
    it: broadcast zero strides and permuted views; a caller that knows another order passes the view in that
    order). Size-1 dimensions get the row-major stride, as their stride is never used. Its block shape is a placeholder
    that the config's pre_hook sets at launch (unread_descriptors for configs that do not read it)."""
    if t.element_size() != 2 or strides[-1] != 1 or t.data_ptr() % 16 or 0 in shape:
        return None
    strides = list(strides)
    for i in range(len(shape) - 2, -1, -1):
        if shape[i] == 1:
            strides[i] = strides[i + 1] * shape[i + 1]
        elif strides[i] < strides[i + 1] * shape[i + 1]:
            return None  # not row-major in this order
        if strides[i] % 8:  # 8 two-byte elements: 16 bytes
            return None
    return TensorDescriptor(t, list(shape), strides, [UNREAD_BLOCK] * len(shape))


def unread_descriptors(*names):
    """The pre_hook of a config that reads none of the tensor descriptors `names`: gives each the placeholder
    block shape. A descriptor's block shape is part of the kernel's argument types, which Triton compiles a
    kernel for; without this hook such a config would compile again for whatever block shape the last TMA
    config's pre_hook left (when autotuning: once in parallel before the timing, again while timing)."""
    def hook(args):
        for name in names:
            if isinstance(args[name], TensorDescriptor):
                args[name].block_shape = [UNREAD_BLOCK] * len(args[name].shape)

    return hook


def config_label(config):
    """A tile config in a few characters, e.g. "128x64 w8 s3 tma": its block sizes, warps and pipeline stages,
    and "tma" where it loads through tensor descriptors."""
    kw = config.kwargs
    tiles = "x".join(str(kw[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in kw)
    return f"{tiles} w{config.num_warps} s{config.num_stages}" + (" tma" if kw.get("TMA") else "")


def needs_descriptors(*names):
    """A `usable` predicate: configs with TMA=True run only where the arguments `names` are tensor
    descriptors (the launcher passes plain tensors where it could make none)."""
    def usable(config, args):
        return not config.kwargs.get("TMA") or all(isinstance(args[n], TensorDescriptor) for n in names)

    return usable


class TunedKernel:
    """A Triton kernel with its config list.

    shared_bytes(config, args) estimates one program's shared memory from the launch's named arguments and
    constexprs; configs over the device budget are never run, nor those for which usable(config, args) is
    false. Both read the constexprs and the arguments' kinds and dtypes, never the value of an int argument:
    launches that differ only in ints replay one another's config (replay.py), unless they autotune.
    `fallback` runs where no config fits (default: the usable config with the smallest estimate). `probe`
    names the tensor argument whose device and element size matter. A config's pre_hook runs before each
    launch with it. `size_class(args)`, where given, names the size class of a launch (e.g. its sequence
    lengths rounded up to a power of 2): each class is timed on its own, with its own autotuner, because the
    best tiles of a short loop and of a long one differ, while a key of exact sizes would time every new size."""

    def __init__(self, kernel, configs, key, shared_bytes, *, min_work, probe, fallback=None, margin=0,
                 usable=None, size_class=None):
        self.kernel = kernel
        self.configs = configs
        self.fallback = fallback
        self.shared_bytes = shared_bytes
        self.usable = usable or (lambda config, args: True)
        self.key = key
        self._tuned = {}  # (device kind, size class, autotune key) -> the config the autotuner chose
        self._tuners = {}  # (device kind, size class) -> Triton autotuner
        self.size_class = size_class or (lambda args: ())
        self.min_work = min_work
        self.probe = probe
        self.margin = margin
        self._timed_configs = configs if fallback is None or fallback in configs else [*configs, fallback]
        self.replays = ReplayedLaunches(kernel)
        # The configs of the launches since forget_launches(). Replays are not counted: each runs the config of
        # an earlier launch through Triton, which was.
        self.launched = set()

    def fitting(self, args, budget):
        """The configs whose shared-memory estimate fits `budget` bytes, in list order (never empty)."""
        usable = [c for c in self.configs if self.usable(c, args)]
        fits = [c for c in usable if self.shared_bytes(c, args) <= budget]
        if fits:
            return fits
        if self.fallback is not None:
            return [self.fallback]
        return [min(usable, key=lambda c: self.shared_bytes(c, args))]

    def tuner(self, device, size_class=()):
        """The autotuner of launches of `size_class` on `device`. Each device kind has its own, so its timings,
        and the configs that fit its shared memory, are never reused on another GPU model in the same process."""
        place = (device_kind(device), size_class)
        if place not in self._tuners:
            self._tuners[place] = triton.autotune(configs=self._timed_configs, key=self.key,
                                                  prune_configs_by={"early_config_prune": self._prune})(self.kernel)
        return self._tuners[place]

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return self.fitting(args, shared_memory_budget(args[self.probe].device, self.margin))

    def forget_launches(self):
        """Empties `launched` and forgets the recorded launches (replay.py), so that from now on `launched`
        names the config of every launch, a replayed fingerprint's included."""
        self.launched.clear()
        self.replays.clear()

    def autotunes(self, work):
        """Whether a launch of this much work goes through the autotuner."""
        return AUTOTUNE and not triton_interpreting() and work >= self.min_work

    def may_read_descriptors(self, work):
        """Whether a launch of this much work may run a TMA config: the autotuner times every config, a fixed
        launch runs the first that fits, a TMA one only where the list starts with one. Launchers build tensor
        descriptors (host work on every call) only then."""
        return self.autotunes(work) or bool(self.configs[0].kwargs.get("TMA"))

    def launch(self, grid, work, args, constexprs):
        """Runs the kernel on positional `args` and keyword `constexprs` (the config's tile sizes excluded).
        A launch of a fingerprint seen before, or of its family, replays its compiled kernel and config
        (replay.py): the config is a function of the fingerprint's kinds and dtypes, of whether the launch
        autotunes (and then of `_autotune_inputs`), and of the objects in `_choice`."""
        autotunes = self.autotunes(work)
        fingerprint = self.replays.fingerprint(args, constexprs, autotunes)
        choice = self._choice()
        choice_inputs = functools.partial(self._autotune_inputs, args, constexprs) if autotunes else tuple
        if self.replays.replay(fingerprint, grid, args, choice, choice_inputs):
            return
        named = {**dict(zip(self.kernel.arg_names, args)), **constexprs}
        device = named[self.probe].device
        if autotunes:
            config = self._tuned_config(grid, args, constexprs, named, device)
            if config is None:
                return  # the autotuner timed the configs and ran the best one
        else:
            config = self.fitting(named, shared_memory_budget(device, self.margin))[0]
        self.launched.add(config)
        if config.pre_hook is not None:
            config.pre_hook({**named, **config.kwargs})
        constants = {**constexprs, **config.all_kwargs()}
        self.replays.record(fingerprint, self.kernel[grid](*args, **constants), args, constants, config.pre_hook,
                            choice, choice_inputs)

    def _autotune_inputs(self, args, constexprs):
        """What an autotuned launch's config is chosen by besides the fingerprint's kinds and dtypes: its size
        class and `key` values (a launch that does not autotune runs the first fitting config, whose rules read
        no int argument)."""
        named = {**dict(zip(self.kernel.arg_names, args)), **constexprs}
        return self.size_class(named), *(named[k] for k in self.key)

    def _choice(self):
        """What a launch's config is chosen from besides its arguments: the lists and rules, and the tuned
        configs (which never change once chosen, unless the whole dict is replaced)."""
        return (self.configs, self.fallback, self.margin, self.usable, self.shared_bytes, self.size_class,
                self.key, self._tuned)

    def _tuned_config(self, grid, args, constexprs, named, device):
        """The config the autotuner chose for this launch's key; None after a launch of a new key, which the
        autotuner timed and ran. Later launches of the key run the kernel directly: the autotuner's own lookup
        costs more host time than the launch itself."""
        # As the autotuner's key (triton.runtime.autotuner.Autotuner.run): the `key` arguments and the dtype of
        # every tensor argument (tensor descriptors, which TMA configs need, have none).
        size_class = self.size_class(named)
        key = (device_kind(device), size_class, *(named[k] for k in self.key),
               *(a.dtype for a in args if isinstance(a, torch.Tensor)))
        config = self._tuned.get(key)
        if config is not None:
            return config
        self._precompile(grid, args, constexprs, named, shared_memory_budget(device, self.margin))
        tuner = self.tuner(device, size_class)
        tuner[grid](*args, **constexprs)
        self._tuned[key] = tuner.best_config
        self.launched.add(tuner.best_config)
        return None

    def _precompile(self, grid, args, constexprs, named, budget):
        """Compiles, in parallel, every config the autotuner is about to time. A config that fails to compile
        is left to the autotuner, which reports or skips it as it always does; a failure of this step itself
        costs only time (the autotuner then compiles each config), so it warns and goes on."""
        try:
            with parallel_compilation():
                for config in self.fitting(named, budget):
                    if config.pre_hook is not None:
                        config.pre_hook({**named, **config.kwargs})
                    self.kernel.warmup(*args, grid=grid, **constexprs, **config.all_kwargs())
        except Exception as error:  # any compiler or runtime failure: reported, not hidden
            warnings.warn(f"parallel compilation of {self.kernel.fn.__name__}'s configs failed ({error!r}); the "
                          f"autotuner compiles them one by one", RuntimeWarning, stacklevel=4)
