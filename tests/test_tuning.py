"""Tile configs of the Triton kernels (tfm_kernels/triton/tuning.py).

CPU: which config a launch takes (the first that fits the shared-memory budget; the fallback, or the smallest,
where none fits); the GEMM's tensor-descriptor (TMA) persistent configs under the interpreter (on the GPU:
Hopper and newer); autotuned launches through Triton's autotuner and our parallel compilation (under the
interpreter with a stand-in for the timing). GPU: every config of every attention kernel and of the MLP GEMM
against the float64 oracle, each forced in turn (the rest of the suite runs with autotuning off and so sees
only the first config that fits), and one autotuned launch of each, through Triton's autotuner and our
pruning."""

import copy
import itertools
import warnings
from collections import defaultdict

import pytest
import torch
import triton
import triton.language as tl
from test_attention import check_against_oracle as check_attention
from test_attention import check_nan_past_key_lengths
from test_attention_ops import check_dropout_against_reference
from test_mlp import check_against_oracle as check_mlp
from test_mlp import linear_inputs
from triton.runtime import _async_compile
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from tfm_kernels import rng
from tfm_kernels.triton import attention, mlp, tuning
from tfm_kernels.triton.precision import dot_precision

KIB = 1024
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _write_block(out_ptr, BLOCK: tl.constexpr):
    tl.store(out_ptr, BLOCK)


def block_configs(*blocks):
    return [triton.Config({"BLOCK": b}) for b in blocks]


def kib_per_block(config, args):
    """A made-up estimate: BLOCK KiB of shared memory."""
    return config.kwargs["BLOCK"] * KIB


def write_block_kernel(configs, budget, fallback=None):
    """A TunedKernel over _write_block whose budget off the GPU is `budget` bytes."""
    margin = tuning.SHARED_MEMORY_OFF_GPU - budget
    return tuning.TunedKernel(_write_block, configs, [], kib_per_block, min_work=1, probe="out_ptr",
                              fallback=fallback, margin=margin)


def test_fitting_keeps_list_order_and_drops_what_overflows():
    kernel = write_block_kernel(block_configs(64, 16, 128, 32), 40 * KIB)
    assert [c.kwargs["BLOCK"] for c in kernel.fitting({}, 40 * KIB)] == [16, 32]
    assert [c.kwargs["BLOCK"] for c in kernel.fitting({}, 1000 * KIB)] == [64, 16, 128, 32]


def test_fitting_falls_back_when_nothing_fits():
    without = write_block_kernel(block_configs(64, 32), 8 * KIB)
    assert [c.kwargs["BLOCK"] for c in without.fitting({}, 8 * KIB)] == [32]  # the smallest
    with_fallback = write_block_kernel(block_configs(64, 32), 8 * KIB, fallback=triton.Config({"BLOCK": 4}))
    assert [c.kwargs["BLOCK"] for c in with_fallback.fitting({}, 8 * KIB)] == [4]


def test_budget_is_the_limit_less_the_margin():
    assert tuning.shared_memory_budget(torch.device("cpu"), 27 * KIB) == 200 * KIB
    if torch.cuda.is_available():
        limit = torch.cuda.get_device_properties(0).shared_memory_per_block_optin
        assert tuning.shared_memory_budget(torch.device("cuda", 0), 5) == limit - 5


# Opt-in shared memory per block: H100 (sm_90), A100 (sm_80), RTX 30xx/40xx, A10, L4, L40S (sm_86, sm_89).
DEVICE_SHARED_MEMORY = {"sm90": 232448, "sm80": 166912, "sm86": 101376}


@pytest.mark.parametrize("limit", DEVICE_SHARED_MEMORY.values(), ids=DEVICE_SHARED_MEMORY.keys())
def test_gemm_launches_within_every_device_budget(monkeypatch, limit):
    """The GPU config list (not the interpreter's single config): for every dtype, gated or not, the config a
    launch takes has an estimate within the device's budget. Float32 gated on sm_86 fits no listed config and
    so needs the fallback; without one it took the smallest, 128x128x32 in 4 stages (196608 bytes)."""
    monkeypatch.setattr(mlp, "triton_interpreting", lambda: False)
    configs, fallback = mlp._gemm_configs()
    monkeypatch.setattr(mlp._GEMM, "configs", configs)
    monkeypatch.setattr(mlp._GEMM, "fallback", fallback)
    for dtype, gated in itertools.product((torch.float16, torch.bfloat16, torch.float32), (False, True)):
        a = torch.empty(0, dtype=dtype)
        args = {"a_ptr": a, "GATED": gated, "INPUT_PRECISION": dot_precision(dtype),
                "a_desc": a, "b_desc": a}  # no tensor descriptors: TMA unusable
        config = mlp._GEMM.fitting(args, limit - mlp._GEMM.margin)[0]
        assert mlp._GEMM.shared_bytes(config, args) <= limit - mlp._GEMM.margin, (dtype, gated, config)


def test_exact_float32_gated_gemm_runs_small_tiles(monkeypatch):
    """The GPU config list on sm_90's budget: float32 gated with exact dots runs only 64x64x64, whose two
    accumulators fit a thread's registers (128x128x32 and 64x128x64 compile to 32 registers and tens of KB of
    spills); with TF32 dots the larger tiles still run."""
    monkeypatch.setattr(mlp, "triton_interpreting", lambda: False)
    configs, fallback = mlp._gemm_configs()
    monkeypatch.setattr(mlp._GEMM, "configs", configs)
    monkeypatch.setattr(mlp._GEMM, "fallback", fallback)
    a = torch.empty(0, dtype=torch.float32)
    args = {"a_ptr": a, "GATED": True, "a_desc": a, "b_desc": a}
    budget = DEVICE_SHARED_MEMORY["sm90"] - mlp._GEMM.margin
    exact = mlp._GEMM.fitting({**args, "INPUT_PRECISION": "ieee"}, budget)
    assert [tuning.config_label(c) for c in exact] == ["64x64x64 w4 s4"]
    tf32 = mlp._GEMM.fitting({**args, "INPUT_PRECISION": "tf32"}, budget)
    assert [tuning.config_label(c) for c in tf32] == ["128x128x32 w4 s4", "64x64x64 w4 s4"]


def test_launch_runs_the_first_config_that_fits():
    budget = tuning.shared_memory_budget(torch.device(DEVICE), 0)
    kernel = write_block_kernel(block_configs(512, 128, 64), 100 * KIB)
    kernel.margin = budget - 100 * KIB  # the same 100 KiB budget on the GPU
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kernel.launch((1,), 0, (out,), {})  # work below min_work: no autotuning, on any device
    assert int(out) == 64


@pytest.mark.parametrize("kind", ["linear", "gated"])
def test_tma_persistent_gemm_config(monkeypatch, kind):
    """The GEMM's tensor-descriptor (TMA) configs, persistent: every operand layout of forward and backward
    (x @ W^T reads W transposed, dz @ W row-major, dz^T @ x a transposed dz; gated: the up half at
    gate_offset). On the CPU there are 3 programs for 12 tiles, so each program loops."""
    if not tuning.tensor_descriptors_supported(torch.device(DEVICE)):
        pytest.skip("tensor descriptors need Hopper or newer")
    config = mlp._gemm_config(32, 32, 32, 4, 1, group_m=2, tma=True)
    layouts = []
    set_blocks = config.pre_hook
    config.pre_hook = lambda args: (layouts.append((args["A_T"], args["B_T"])), set_blocks(args))
    monkeypatch.setattr(mlp._GEMM, "configs", [config])  # with no descriptor, no config is usable: an error
    x, weight, bias = linear_inputs((3, 37), 48, 80, torch.float16, device=DEVICE)
    check_mlp(kind, "triton", x, weight, bias, activation="gelu", dropout_p=0.1)
    assert set(layouts) == {(False, True), (False, False), (True, False)}


ATTENTION_KERNELS = {"forward": attention._FORWARD, "dk_dv": attention._BACKWARD_KV, "dq": attention._BACKWARD_Q}
ATTENTION_DESCRIPTORS = {"forward": attention.FORWARD_DESCRIPTORS, "dk_dv": attention.BACKWARD_KV_DESCRIPTORS,
                         "dq": attention.BACKWARD_Q_DESCRIPTORS}


@pytest.mark.parametrize("name", list(ATTENTION_DESCRIPTORS))
def test_exact_float32_attention_runs_the_fallback(name):
    """A listed config that fits runs with TF32 dots; with exact float32 dots the fallback's small tiles run
    instead (the listed ones compile to 32 registers and tens of KB of spills a thread)."""
    descriptors = ATTENTION_DESCRIPTORS[name]
    tuned = ATTENTION_KERNELS[name]
    listed = attention._config(64, 32, 4, 2, descriptors)
    kernel = tuning.TunedKernel(tuned.kernel, [listed], tuned.key, tuned.shared_bytes, min_work=0, probe="Q",
                                fallback=tuned.fallback, usable=tuned.usable)
    q = torch.empty(0, dtype=torch.float32)
    args = {"Q": q, "BLOCK_D": 64, "BLOCK_DV": 64, "MASK_KIND": attention.MASK_NONE, **dict.fromkeys(descriptors, q)}
    budget = DEVICE_SHARED_MEMORY["sm90"]
    assert kernel.fitting({**args, "DOT_PRECISION": "tf32"}, budget) == [listed]
    assert kernel.fitting({**args, "DOT_PRECISION": "ieee"}, budget) == [tuned.fallback]


@pytest.mark.parametrize("case", ["gqa_causal_lengths", "mask_dropout_d40", "packed_views", "nan_past_lengths"])
@pytest.mark.parametrize("name", list(ATTENTION_DESCRIPTORS))
def test_tma_attention_config(monkeypatch, name, case):
    """Each attention kernel's TMA config (its streamed tiles through 4-D tensor descriptors), the other two
    kernels on their defaults: partial blocks, GQA, causal, key lengths, masks, dropout, a head dim below its
    padded block, strided views of a packed QKV (descriptors over (B, N, H, D) memory); and NaN in the keys and
    values past key_lengths, which the descriptors read whole, changes no bit of the output or any gradient
    (as in the pointer configs, which never load them)."""
    if not tuning.tensor_descriptors_supported(torch.device(DEVICE)):
        pytest.skip("tensor descriptors need Hopper or newer")
    tiles = (32, 16, 4, 1) if DEVICE == "cpu" else (64, 64, 4, 2)
    config = attention._config(*tiles, ATTENTION_DESCRIPTORS[name], tma=True)
    launches = []
    set_blocks = config.pre_hook
    config.pre_hook = lambda args: (launches.append(args["BLOCK_D"]), set_blocks(args))
    monkeypatch.setattr(ATTENTION_KERNELS[name], "configs", [config])  # with no descriptor, no config is usable
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    B, Hq, Hk, L, S, E = 2, 4, 2, 37, 53, 64
    if case == "packed_views":  # heads inside rows: descriptors over (B, N, H, D) memory
        qkv = torch.randn(B, L, 3, Hq, E, dtype=dtype, device=DEVICE)  # (B, L, 3, H, E)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, E) views
        check_attention("triton", q, k, v, is_causal=True)
    elif case == "mask_dropout_d40":
        E = 40
        q, k, v = (torch.randn(B, h, n, E, dtype=dtype, device=DEVICE) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
        mask = torch.rand(B, 1, L, S, device=DEVICE) > 0.3
        check_attention("triton", q, k, v, attn_mask=mask, enable_gqa=True)
        check_dropout_against_reference("triton", q, k, v, 0.3, attn_mask=mask)
    elif case == "nan_past_lengths":
        check_nan_past_key_lengths("triton", dtype, DEVICE)
    else:
        q, k, v = (torch.randn(B, h, n, E, dtype=dtype, device=DEVICE) for h, n in ((Hq, L), (Hk, S), (Hk, S)))
        lengths = torch.tensor([S, 20], device=DEVICE)
        check_attention("triton", q, k, v, is_causal=True, enable_gqa=True, key_lengths=lengths)
    assert launches, "the TMA config never ran"


# ---------------------------------------------------------------------------------------------------------
# The autotuned path on any device: Triton's autotuner, after our parallel compilation


def autotuning(monkeypatch, module, name, configs):
    """Replaces the TunedKernel module.<name> by one over `configs` that autotunes every launch, also under the
    interpreter (which cannot time a kernel: each timing runs the config once, and the first config timed
    wins). Returns, per launch variant (the sorted constexprs and options: config and launch), the calls of
    the kernel: (warmup, the types of its tensor-descriptor arguments), a warmup being a compilation of our
    parallel step."""
    tuned = getattr(module, name)
    kernel = tuning.TunedKernel(tuned.kernel, configs, tuned.key, tuned.shared_bytes, min_work=0,
                                probe=tuned.probe, margin=tuned.margin, usable=tuned.usable,
                                size_class=tuned.size_class)
    kernel.autotunes = lambda work: True
    order = itertools.count()
    make_tuner = kernel.tuner

    def tuner(device, size_class=()):
        made = make_tuner(device, size_class)
        made.do_bench = lambda kernel_call, quantiles: (kernel_call(), [float(next(order))] * 3)[1]
        return made

    kernel.tuner = tuner
    monkeypatch.setattr(module, name, kernel)
    calls = defaultdict(list)
    run = kernel.kernel.run

    def recording_run(*args, **kwargs):
        types = tuple(mangle_type(a) for a in args if isinstance(a, TensorDescriptor))
        variant = tuple(sorted((k, v) for k, v in kwargs.items() if k not in ("grid", "warmup")))
        calls[variant].append((kwargs["warmup"], types))
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel.kernel, "run", recording_run)
    return calls


@pytest.mark.parametrize("name", ["attention", "gemm"])
def test_autotuned_configs_keep_their_argument_types(monkeypatch, name):
    """Triton compiles a kernel per argument types, and a tensor descriptor's type includes its block shape,
    which a TMA config's pre_hook sets. Every config must see the same types in our parallel compilation, in
    the autotuner's timing and in the launches after it, or it compiles again there: the configs without TMA
    read no descriptor but saw the block shape of the TMA config set last."""
    if not tuning.tensor_descriptors_supported(torch.device(DEVICE)):
        pytest.skip("tensor descriptors need Hopper or newer")
    if name == "attention":
        tiles = [(32, 16, False), (16, 16, True), (32, 32, True)]
        calls = autotuning(monkeypatch, attention, "_FORWARD", [
            attention._config(m, n, 4, 1, attention.FORWARD_DESCRIPTORS, tma=tma) for m, n, tma in tiles])
        dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16
        q, k, v = (torch.randn(2, h, 37, 32, dtype=dtype, device=DEVICE) for h in (4, 2, 2))
        check_attention("triton", q, k, v, is_causal=True, enable_gqa=True)  # timed, then the best (the first)
        check_attention("triton", q, k, v, enable_gqa=True)  # the autotuner's choice, new descriptors
    else:
        tiles = [(32, 32, False), (16, 32, True), (32, 16, True)]
        calls = autotuning(monkeypatch, mlp, "_GEMM", [
            mlp._gemm_config(m, n, 32, 4, 1, group_m=2, tma=tma) for m, n, tma in tiles])
        x, weight, bias = linear_inputs((3, 37), 48, 80, torch.float16, device=DEVICE)
        check_mlp("linear", "triton", x, weight, bias, activation="gelu")
        check_mlp("linear", "triton", x, weight, bias, activation="gelu")
    assert {(v["BLOCK_M"], v["BLOCK_N"], v["TMA"]) for v in map(dict, calls)} == set(tiles)
    for variant, runs in calls.items():
        assert any(warmup for warmup, _ in runs) and not all(warmup for warmup, _ in runs), variant
        assert len({types for _, types in runs}) == 1, (variant, runs)


def test_parallel_compilation_once_per_autotune_key(monkeypatch):
    """Our parallel compilation runs only for a key the autotuner is about to time. The GEMM's key names its
    epilogue (here dropout), which changes a config's speed, so a new epilogue is timed again; a launch that
    differs only in arguments outside the key (the dropout probability) runs the config chosen for it."""
    if not tuning.tensor_descriptors_supported(torch.device(DEVICE)):
        pytest.skip("tensor descriptors need Hopper or newer")
    calls = autotuning(monkeypatch, mlp, "_GEMM", [mlp._gemm_config(32, 32, 32, 4, 1, group_m=2, tma=tma)
                                                  for tma in (False, True)])
    x, weight, bias = linear_inputs((111,), 48, 80, torch.float16, device=DEVICE)

    def warmups():
        return sum(warmup for runs in calls.values() for warmup, _ in runs)

    mlp.linear_forward(x, weight, bias, "gelu", 0.0, rng.seed_for(0.0, x.device))
    assert warmups() == 2
    mlp.linear_forward(x, weight, bias, "gelu", 0.0, rng.seed_for(0.0, x.device))
    assert warmups() == 2
    out, _ = mlp.linear_forward(x, weight, bias, "gelu", 0.5, rng.seed_for(0.5, x.device))
    assert warmups() == 4
    assert 0.3 < float((out == 0).float().mean()) < 0.7  # the dropout variant ran
    mlp.linear_forward(x, weight, bias, "gelu", 0.25, rng.seed_for(0.25, x.device))
    assert warmups() == 4


def test_attention_is_timed_once_per_sequence_class(monkeypatch):
    """Attention launches are tuned per power-of-2 class of their sequence lengths: a launch of a new class
    is timed (our parallel compilation runs first), one of a class timed before runs its chosen config."""
    calls = autotuning(monkeypatch, attention, "_FORWARD", [attention._config(16, 16, 4, 1,
                                                                              attention.FORWARD_DESCRIPTORS)])
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16

    def forward(L, S):
        q, k, v = (torch.randn(1, 2, n, 16, dtype=dtype, device=DEVICE) for n in (L, S, S))
        attention.attention_forward(q, k, v, None, None, 0.0, False, 0.25, rng.seed_for(0.0, q.device))
        return sum(warmup for runs in calls.values() for warmup, _ in runs)

    assert forward(20, 20) == 1
    assert forward(32, 17) == 1  # classes (32, 32), as before
    assert forward(20, 33) == 2  # key length class 64
    assert forward(33, 20) == 3  # query length class 64
    assert attention._sequence_class({"L": 1, "S": 100_000}) == (1, attention.LONGEST_SEQUENCE_CLASS)


def test_gemm_is_timed_once_per_size_class(monkeypatch):
    """GEMM launches are tuned per power-of-2 class of M, N and K, not per exact size: the token count varies
    from call to call (prompts, packed batches), and each new count would be timed again."""
    calls = autotuning(monkeypatch, mlp, "_GEMM", [mlp._gemm_config(32, 32, 32, 4, 1, group_m=2)])

    def forward(tokens, out_features=48):
        x, weight, bias = linear_inputs((tokens,), 40, out_features, torch.float16, device=DEVICE)
        mlp.linear_forward(x, weight, bias, "gelu", 0.0, rng.seed_for(0.0, x.device))
        return sum(warmup for runs in calls.values() for warmup, _ in runs)

    assert forward(20) == 1
    assert forward(31) == 1  # class (32, 64, 64), as before
    assert forward(33) == 2  # M class 64
    assert forward(33, out_features=80) == 3  # N class 128
    assert mlp._gemm_size_class({"M": 1000, "N": 4096, "K": 11008}) == (1024, 4096, 16384)


def test_interrupted_parallel_compilation_runs_again_at_the_next_launch(monkeypatch):
    """An interrupt (Ctrl-C) during our parallel compilation propagates, and the next launch of the same key
    compiles its configs in parallel again instead of leaving them to the autotuner one by one."""
    if not tuning.tensor_descriptors_supported(torch.device(DEVICE)):
        pytest.skip("tensor descriptors need Hopper or newer")
    calls = autotuning(monkeypatch, mlp, "_GEMM", [mlp._gemm_config(32, 32, 32, 4, 1, group_m=2, tma=tma)
                                                  for tma in (False, True)])
    x, weight, bias = linear_inputs((111,), 48, 80, torch.float16, device=DEVICE)
    warmup = mlp._GEMM.kernel.warmup

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mlp._GEMM.kernel, "warmup", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mlp.linear_forward(x, weight, bias, "gelu", 0.0, rng.seed_for(0.0, x.device))
    monkeypatch.setattr(mlp._GEMM.kernel, "warmup", warmup)
    mlp.linear_forward(x, weight, bias, "gelu", 0.0, rng.seed_for(0.0, x.device))
    assert sum(warmup for runs in calls.values() for warmup, _ in runs) == 2


def test_each_device_kind_and_size_class_has_its_own_autotuner(monkeypatch):
    """Timings and shared-memory pruning are per GPU model and size class: a second kind of device, or a
    second class, gets a new autotuner."""
    kernel = tuning.TunedKernel(_write_block, block_configs(16, 32), ["BLOCK"], lambda config, args: 0,
                                min_work=0, probe="out_ptr")
    device = torch.device(DEVICE)
    assert kernel.tuner(device) is kernel.tuner(device)
    first = kernel.tuner(device)
    assert kernel.tuner(device, (64,)) is not first
    assert kernel.tuner(device, (64,)) is kernel.tuner(device, (64,))
    monkeypatch.setattr(tuning, "device_kind", lambda device: ("another GPU", 1))
    assert kernel.tuner(device) is not first
    assert kernel.tuner(device) is kernel.tuner(device)


def test_interrupted_parallel_compilation_leaves_no_compile_mode_active():
    """An interrupt (Ctrl-C) while the parallel compiles finish propagates, and leaves Triton's compile mode
    inactive: triton 3.6 left it active, so entering it again raised and every later compile in the thread went
    to the closed pool."""
    def interrupted_compile():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with tuning.parallel_compilation():
            _async_compile.active_mode.get().submit("interrupted", interrupted_compile, lambda kernel: None)
    assert _async_compile.active_mode.get() is None
    with tuning.parallel_compilation():
        assert _async_compile.active_mode.get() is not None
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _write_block[(1,)](out, BLOCK=7)
    assert int(out) == 7


# ---------------------------------------------------------------------------------------------------------
# GPU: every config against the oracle



def every_config(kernel):
    extra = kernel.fallback is not None and kernel.fallback not in kernel.configs
    return [*kernel.configs, *([kernel.fallback] if extra else [])]


def config_id(config):
    return tuning.config_label(config).replace(" ", "-")


def attention_case(head_dim):
    """bf16 GQA, sizes off every block multiple; causal at head dim 128, an additive mask at 64."""
    B, Hq, Hk, L, S = 2, 4, 2, 299, 317
    q, k, v = (torch.randn(B, h, n, head_dim, dtype=torch.bfloat16, device="cuda")
               for h, n in ((Hq, L), (Hk, S), (Hk, S)))
    options = {"enable_gqa": True}
    if head_dim == 128:
        options["is_causal"] = True
    else:
        options["attn_mask"] = torch.randn(L, S, dtype=torch.bfloat16, device="cuda")
    return q, k, v, options


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", list(ATTENTION_KERNELS))
def test_gpu_every_attention_config(monkeypatch, name, head_dim):
    """Each config the device can hold, forced in turn, against the oracle; each must really launch (a config
    that is unusable for the inputs, e.g. a TMA one without descriptors, would give way to another)."""
    kernel = ATTENTION_KERNELS[name]
    q, k, v, options = attention_case(head_dim)
    budget = tuning.shared_memory_budget(q.device, kernel.margin)
    shape_args = {"Q": q, "BLOCK_D": head_dim, "BLOCK_DV": head_dim}
    for listed in every_config(kernel):
        if kernel.shared_bytes(listed, shape_args) > budget:
            continue  # pruned on this device: never runs
        launches = []
        config = copy.copy(listed)
        config.pre_hook = lambda args, hook=listed.pre_hook, seen=launches: (seen.append(args["BLOCK_M"]), hook(args))
        monkeypatch.setattr(kernel, "configs", [config])
        check_attention("triton", q, k, v, **options)
        assert launches, f"{config_id(listed)} never launched"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "gated"])
@pytest.mark.parametrize("config", every_config(mlp._GEMM), ids=config_id)
def test_gpu_every_gemm_config(monkeypatch, config, kind):
    """3999 tokens, 1040 -> 2000 (gated: 2 x 1000): more output tiles than an H100/H200 has SMs in the forward
    and in both gradient GEMMs, so the persistent programs of the TMA configs each loop over several tiles;
    no size a multiple of its block. The config must really launch: one that is unusable for the inputs (a TMA
    config without descriptors) would give way to the fallback."""
    x, weight, bias = linear_inputs((3, 1333), 1040, 2000, torch.bfloat16, device="cuda")
    estimate = mlp._shared_memory_bytes(config, {"GATED": kind == "gated", "a_ptr": x})
    budget = tuning.shared_memory_budget(x.device, mlp._GEMM.margin)
    if estimate > budget:
        pytest.skip(f"pruned on this device ({estimate} > {budget} bytes of shared memory): the launcher never runs it")
    launches = []
    forced = copy.copy(config)
    forced.pre_hook = lambda args, hook=config.pre_hook: (launches.append(args["BLOCK_M"]), hook(args))
    monkeypatch.setattr(mlp._GEMM, "configs", [forced])
    activation = "gelu" if kind == "linear" else "silu"
    check_mlp(kind, "triton", x, weight, bias, activation=activation, dropout_p=0.1)
    assert len(launches) == 3, f"{config_id(config)} launched {len(launches)} times, not in every GEMM"


@pytest.mark.gpu
def test_gpu_autotuned_launches(monkeypatch):
    """Through Triton's autotuner, after our parallel compilation of the configs (which must not fail)."""
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    for kernel in (*ATTENTION_KERNELS.values(), mlp._GEMM):
        monkeypatch.setattr(kernel, "min_work", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, k, v, options = attention_case(128)
        check_attention("triton", q, k, v, **options)
        x, weight, bias = linear_inputs((1000,), 512, 2048, torch.bfloat16, device="cuda")
        check_mlp("linear", "triton", x, weight, bias, activation="gelu_tanh")
    failures = [str(w.message) for w in caught if "parallel compilation" in str(w.message)]
    assert not failures, failures
