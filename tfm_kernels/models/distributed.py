"""Multi-process training under torchrun: process-group set-up from the environment, model wrapping with
DistributedDataParallel or FSDP, and the collectives the training loop needs.

A single process (WORLD_SIZE unset or 1) runs with no process group and an unwrapped model, so the same code
runs on one device and under `torchrun --nproc-per-node N`."""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedEnv:
    """This process's place in the job: rank, world size, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda if available, else cpu; anything else must name a device that this machine and build of
    torch have (ValueError naming --device otherwise, before anything runs there)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from error
    if resolved.type == "meta":  # holds shapes, not values
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    if resolved.type == "cpu" and resolved.index not in (None, 0):  # torch takes any index and ignores it
        raise ValueError(f"--device {device!r}: the CPU is one device, 'cpu'")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.zeros(0).to(resolved)  # a valid name of a device this machine or build lacks: mps, xpu, ...
    except (RuntimeError, AssertionError, ImportError) as error:  # what torch raises, by device type
        reason = str(error).splitlines()[0]
        raise ValueError(f"--device {device!r} is not available: {reason}") from error
    return resolved


def _environment_int(name, default=None) -> int:
    """torchrun's integer environment variable `name` (`default` when unset; ValueError when unset without a
    default, or not an integer)."""
    value = os.environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it); got {value!r}") from None


def init_from_env(device: str = "auto") -> DistributedEnv:
    """Joins the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) when WORLD_SIZE > 1: nccl on GPUs (one per local rank), gloo on CPU. Otherwise returns a
    single-process environment on `device`."""
    world_size = _environment_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedEnv(device=resolve_device(device))
    rank = _environment_int("RANK")
    local_rank = _environment_int("LOCAL_RANK", 0)
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return DistributedEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown(env: DistributedEnv):
    """Leaves the process group joined by init_from_env (nothing to do in one process)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistributedEnv, fsdp: bool = False) -> nn.Module:
    """DistributedDataParallel (gradients all-reduced, averaged) or, with fsdp=True, FSDP2's fully_shard on
    every block and the root (parameters, gradients and optimizer state sharded). Unchanged in one process."""
    if not env.distributed:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as error:
            raise RuntimeError("fsdp=True needs torch.distributed.fsdp.fully_shard (torch >= 2.6)") from error
        for block in _repeated_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Full parameters in every FSDP module of `model` inside the block, for code that calls the model's methods
    other than forward (encode, memory_kv, decode): FSDP gathers a module's parameters only around its forward.
    Nothing to do without FSDP."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = ()
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if sharded:
        # FSDP takes the first module whose forward runs as its root, and decoding may run a block's forward
        # first (the evaluation at step 0); FSDP has no public call that settles the root beforehand
        model._get_fsdp_state()._lazy_init()
    for module in sharded:
        module.unshard()
    try:
        yield model
    finally:
        for module in sharded:
            module.reshard()


def _repeated_blocks(model: nn.Module):
    """The layers of the model's nn.ModuleLists (blocks, encoder/decoder layers): FSDP's units."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            yield from module


def all_reduce_sum(values: torch.Tensor, env: DistributedEnv) -> torch.Tensor:
    """Sum of `values` over all processes (itself in one process)."""
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def all_gather_objects(obj, env: DistributedEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
