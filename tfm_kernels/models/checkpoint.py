"""Checkpoints: written atomically (a temporary file in the same folder, then os.replace), holding everything
needed to continue a run bit-identically — model, optimizer, schedule, step, configuration, and the random
number generator states (Python, torch CPU and CUDA) of every process."""

import contextlib
import os
import random
import zipfile

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
# What every checkpoint of a training run holds (training.Trainer.save writes them).
FIELDS = ("kind", "config", "train_config", "task", "model", "optimizer", "optimizer_layout", "scheduler", "step",
          "rng", "data_generator")
# The type of every field but the strings (kind, optimizer_layout), whose values are compared where they are read.
FIELD_TYPES = {"config": dict, "train_config": dict, "task": dict, "model": dict, "optimizer": dict,
               "scheduler": dict, "step": int, "rng": list, "data_generator": torch.Tensor}


class CheckpointWriteError(OSError):
    """The file system refused a checkpoint (disk full, no permission, ...); the message names the file and
    the operating system's reason."""


def checkpoint_path(directory: str) -> str:
    """The checkpoint file of a run's folder (one file, replaced at every save)."""
    return os.path.join(directory, CHECKPOINT_NAME)


def capture_rng(device: torch.device) -> dict:
    """This process's random number generator states: Python's, torch's CPU generator and, when the process
    trains on a GPU, that GPU's generator (only that one, so a checkpoint resumes on a machine with fewer GPUs)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device):
    """Puts back the generator states that capture_rng returned, the GPU one on `device`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def check_writable(directory: str):
    """Creates `directory` if needed and writes and removes a small file there, so that a folder the file system
    refuses is found before a run rather than at its first save. Raises CheckpointWriteError naming the reason."""
    probe = os.path.join(directory, f"{CHECKPOINT_NAME}.probe.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise CheckpointWriteError(f"cannot write checkpoints in {directory!r}: {error}") from error


def _remove_orphaned_temporaries(path: str):
    """Removes the temporary files `path`.tmp.<pid> of writers that died mid-write (killed, so their own
    cleanup never ran): those whose process no longer exists."""
    prefix = os.path.basename(path) + ".tmp."
    directory = os.path.dirname(os.path.abspath(path))
    for name in os.listdir(directory):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _process_exists(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_checkpoint(path: str, payload: dict):
    """Writes `payload` to `path` atomically: readers see the previous checkpoint or the new one, never part
    of one, even if the process dies while writing. Raises CheckpointWriteError when the file system refuses."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_orphaned_temporaries(path)
        with open(temporary, "wb") as file:
            torch.save({"format": FORMAT_VERSION, **payload}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise CheckpointWriteError(f"could not write the checkpoint {path!r}: {error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _check_checksums(path: str):
    """ValueError where a record of torch.save's zip archive fails its CRC-32 (torch.load does not check them,
    and would read changed bytes as weights). A file that is no zip archive is left to torch.load."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"checkpoint {path!r} is damaged: {error}") from error
    if damaged is not None:
        raise ValueError(f"checkpoint {path!r} is damaged: its record {damaged!r} fails its checksum")


def load_checkpoint(path: str, kind: str | None = None, config=None, map_location="cpu") -> dict:
    """Reads a checkpoint written by save_checkpoint.

    Raises FileNotFoundError if there is none at `path`, and ValueError if it is damaged (its bytes changed
    since torch.save wrote them), not a checkpoint of this package (naming the fields it lacks, if it has the
    format), is of another model `kind` ("lm" or "seq2seq"), or was trained with a model configuration other
    than `config` (naming the fields that differ)."""
    if os.path.isdir(path):
        path = checkpoint_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    _check_checksums(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch's message advises loading untrusted files unsafely: not repeated here
        raise ValueError(f"{path!r} is not a tfm_kernels checkpoint: torch.load cannot read it as tensors and "
                         f"plain data ({type(error).__name__})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path!r} is not a tfm_kernels checkpoint (format {FORMAT_VERSION})")
    missing = [name for name in FIELDS if name not in checkpoint]
    if missing:
        raise ValueError(f"{path!r} is not a complete tfm_kernels checkpoint: it has no {', '.join(missing)}")
    for name, expected in FIELD_TYPES.items():
        if not isinstance(checkpoint[name], expected) or isinstance(checkpoint[name], bool):
            raise ValueError(f"{path!r} is not a tfm_kernels checkpoint: its {name} is a "
                             f"{type(checkpoint[name]).__name__}, where {expected.__name__} is expected")
    if kind is not None and checkpoint["kind"] != kind:
        raise ValueError(f"checkpoint {path!r} holds a {checkpoint['kind']!r} model; expected {kind!r}")
    if config is not None:
        saved, wanted = checkpoint["config"], config.to_dict()
        differences = [
            f"{name}: checkpoint {saved.get(name)!r}, requested {wanted.get(name)!r}"
            for name in sorted(set(saved) | set(wanted))
            if saved.get(name) != wanted.get(name)
        ]
        if differences:
            raise ValueError(
                f"checkpoint {path!r} was trained with another model configuration ("
                + "; ".join(differences)
                + ")"
            )
    return checkpoint


def _same_kind(saved, fresh) -> bool:
    """Whether a restored setting can stand where this run has `fresh`: a number for a number (a 0-d tensor
    too), a bool or None for a bool or None, a sequence of as many such values for a sequence, else the type."""
    if isinstance(fresh, (bool, type(None))):
        return isinstance(saved, (bool, type(None)))
    if isinstance(fresh, (int, float)):
        scalar_tensor = isinstance(saved, torch.Tensor) and saved.dim() == 0
        return scalar_tensor or isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(fresh, (tuple, list)):
        return (isinstance(saved, (tuple, list)) and len(saved) == len(fresh)
                and all(_same_kind(a, b) for a, b in zip(saved, fresh)))
    return type(saved) is type(fresh)


def _check_settings(where, saved, fresh):
    """TypeError where a saved setting of fresh's names is not of the kind of this run's value."""
    if not isinstance(saved, dict):
        raise TypeError(f"{where} is of type {type(saved).__name__}, where a dict is expected")
    for name, value in fresh.items():
        if name in saved and not _same_kind(saved[name], value):
            raise TypeError(f"{where}[{name!r}] is {saved[name]!r}, where a value like {value!r} is expected")


def check_restorable_state(optimizer_state, optimizer):
    """TypeError naming the setting where a checkpoint's optimizer state (torch's state dict, keyed by parameter
    index) holds what torch's load_state_dict takes but the first step cannot use: a setting of another kind
    than this run's, a moment of another shape than its parameter, a step count that is not a number. What
    load_state_dict itself refuses is left to it."""
    parameters = {}  # saved index -> parameter, paired as load_state_dict pairs them
    for index, (saved, group) in enumerate(zip(optimizer_state.get("param_groups", []), optimizer.param_groups)):
        _check_settings(f"optimizer param_groups[{index}]", saved,
                        {name: value for name, value in group.items() if name != "params"})
        parameters.update(zip(saved.get("params", []), group["params"]))
    states = optimizer_state.get("state", {})
    for key, parameter in parameters.items():
        state = states.get(key, {}) if isinstance(states, dict) else {}
        where = f"optimizer state[{key!r}]"
        _check_settings(where, state, {})
        for name, value in state.items():
            if name == "step" and not _same_kind(value, 0):
                raise TypeError(f"{where}['step'] is {value!r}, where a number is expected")
            if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != parameter.shape):
                found = (f"has shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                         else f"is of type {type(value).__name__}")
                raise TypeError(f"{where}[{name!r}] {found}, where a tensor of its parameter's shape "
                                f"{tuple(parameter.shape)} is expected")


def check_restorable_schedule(schedule_state, scheduler):
    """TypeError naming the setting where a checkpoint's schedule state holds what torch's load_state_dict takes
    but the first step cannot use: a setting of another kind than this run's, or one this run's scheduler does
    not have (load_state_dict sets every key as an attribute, so "optimizer" would replace the optimizer)."""
    fresh = scheduler.state_dict()
    _check_settings("scheduler", schedule_state, fresh)
    unknown = sorted(map(repr, set(schedule_state) - set(fresh)))
    if unknown:
        raise TypeError(f"scheduler holds {', '.join(unknown)}, which this run's schedule does not have")


def load_model(module: torch.nn.Module, checkpoint: dict, path: str):
    """Loads checkpoint["model"] into `module`; ValueError naming the checkpoint where its weights do not fit the
    module built from its config (load_state_dict's RuntimeError would end the command lines with a traceback)."""
    try:
        module.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path!r} holds weights that do not fit its model configuration: "
                         f"{' '.join(str(error).split())}") from error
