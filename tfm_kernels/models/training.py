"""Training loops: the language model on a text corpus and the encoder-decoder on the copy task.

One `Trainer` runs both: AdamW, a LambdaLR schedule, gradient clipping, bf16 autocast on GPUs, a progress
line, periodic evaluation, and atomic checkpoints that resume bit-identically. Under torchrun
(WORLD_SIZE > 1) it trains with DistributedDataParallel (or FSDP with fsdp=True); `batch_size` is the global
batch, split evenly over the processes, so a job computes the same updates on any number of processes."""

import dataclasses
import hashlib
import math
import os
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import data, distributed
from .config import LMConfig, Seq2SeqConfig, check_bool, check_positive, check_real, is_int
from .generation import greedy_decode
from .lm import TransformerLM
from .progress import ProgressLine
from .schedules import inverse_sqrt, warmup_cosine
from .seq2seq import EncoderDecoderTransformer
from .tokenizer import ByteTokenizer

# TrainConfig.lr of None: each trainer's own. The copy task's 0.5 multiplies the paper's schedule: the tiny preset
# learned to copy more reliably than with the paper's 1.0 (0.98 vs 0.90-0.95 token accuracy after 400 steps of 32
# strings, two seeds each).
DEFAULT_LR = {"lm": 1e-3, "seq2seq": 0.5}
# Adam's first step divides the rate by 1 - beta1 (0.1 in both trainers' optimizers) and applies it to float32
# weights: a larger rate fails to convert there.
LR_LIMIT = 0.1 * torch.finfo(torch.float32).max
# Seeds are below 2**63: the runs seed torch with seed + rank + step, which must stay below 2**64.
SEED_LIMIT = 2**63


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run.

    batch_size is the global batch (sequences per step over all processes). For the language model `lr` is the
    peak of a linear warm-up (`warmup_steps`) + cosine decay to `min_lr_ratio * lr` at `decay_steps` (default:
    `steps`); for the encoder-decoder it multiplies the paper's inverse-square-root schedule (1.0: the
    paper's). lr None takes the trainer's DEFAULT_LR (1e-3 for the language model, 0.5 for the copy task).
    checkpoint_interval 0 saves only at the end; a fresh run refuses a checkpoint_dir that holds a checkpoint
    unless `overwrite`; resume continues from checkpoint_dir's checkpoint, and must repeat every setting that
    shapes the computation (RESUME_SETTINGS; ValueError naming those that differ).
    `steps` may differ (not behind the checkpoint) where the resumed run then equals an uninterrupted run of
    the new total: always for the encoder-decoder, whose schedule has no end; for the language model while the
    learning rates of the steps taken stay the same (decay_steps set, or the run still in its warm-up; the
    cosine decay otherwise spans `steps`). Checkpointing, logging, evaluation (which draws no random numbers),
    the device and the number of processes may change; with another number of processes, dropout draws fresh
    numbers."""

    steps: int = 200
    batch_size: int = 16
    lr: float | None = None
    warmup_steps: int = 20
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_windows: int = 64
    log_interval: int = 10
    checkpoint_dir: str | None = None
    checkpoint_interval: int = 0
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    corpus: str | None = None
    val_fraction: float = 0.1
    amp: bool = True
    fsdp: bool = False
    progress: bool = True

    def __post_init__(self):
        check_positive(self, "steps", "batch_size", "warmup_steps", "eval_interval", "eval_windows", "log_interval")
        if self.decay_steps is not None and (not is_int(self.decay_steps) or self.decay_steps < 1):
            raise ValueError(
                f"TrainConfig.decay_steps must be a positive int or None; got {self.decay_steps!r}"
            )
        if not is_int(self.checkpoint_interval) or self.checkpoint_interval < 0:
            raise ValueError(
                f"TrainConfig.checkpoint_interval must be an int >= 0; got {self.checkpoint_interval!r}"
            )
        if not is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"TrainConfig.seed must be an int in [0, 2**63); got {self.seed!r}")
        if self.lr is not None:
            check_real(self, "lr", lambda value: 0 < value <= LR_LIMIT, f"a number in (0, {LR_LIMIT:.4g}] or None")
        for name in ("grad_clip", "weight_decay"):
            check_real(self, name, lambda value: math.isfinite(value) and value >= 0, "a finite number >= 0")
        check_real(self, "min_lr_ratio", lambda value: 0 <= value <= 1, "a number in [0, 1]")
        check_real(self, "val_fraction", lambda value: 0 < value < 1, "a number in (0, 1)")
        check_bool(self, "resume", "overwrite", "amp", "fsdp", "progress")
        for name in ("checkpoint_dir", "corpus"):  # a path object is stored as its string: checkpoints hold plain data
            value = getattr(self, name)
            if value is not None:
                # "" would read as no path: a run given --checkpoint-dir "" trained and saved nothing, unsaid
                if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str) or not value:
                    raise ValueError(f"TrainConfig.{name} must be a non-empty path (str or os.PathLike) or None; got "
                                     f"{value!r}")
                setattr(self, name, os.fspath(value))
        if self.resume and not self.checkpoint_dir:
            raise ValueError("TrainConfig.resume needs checkpoint_dir (the folder holding the checkpoint)")
        if self.overwrite and not self.checkpoint_dir:
            raise ValueError("TrainConfig.overwrite (--overwrite) needs checkpoint_dir (the folder whose checkpoint "
                             "it replaces)")
        if self.overwrite and self.resume:
            raise ValueError("TrainConfig.overwrite (--overwrite) starts afresh over the checkpoint, resume "
                             "(--resume) continues it: give one of them")
        if self.checkpoint_interval and not self.checkpoint_dir:
            raise ValueError(f"TrainConfig.checkpoint_interval ({self.checkpoint_interval}) needs checkpoint_dir (the "
                             "folder to save in)")


class TrainingDiverged(ArithmeticError):
    """A loss of the run became NaN or infinite; the message names it, the step and the learning rate."""


@dataclass
class TrainResult:
    """What a run leaves: the trained model (unwrapped), the steps done, and (step, value) histories."""

    model: torch.nn.Module
    step: int
    train_losses: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)  # (step, {metric: value})


def lm_loss(model, inputs, targets):
    """Mean next-token cross-entropy in nats; inputs, targets (B, T)."""
    logits = model(inputs)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def seq2seq_loss(model, src, tgt_in, tgt_out, label_smoothing, pad_id, env=None):
    """Label-smoothed cross-entropy averaged over the non-pad target positions of the global batch, of which
    src (B, S), tgt_in/tgt_out (B, T) are this process's share (env: the job; None: one process).

    Processes hold different numbers of target tokens, so the sum over this process's tokens is divided by the
    count over all processes and multiplied by their number: DDP's and FSDP's averaging of gradients then gives
    the gradient of the global mean, and the mean of the processes' values is the global mean."""
    env = env or distributed.DistributedEnv()
    logits = model(src, tgt_in)  # (B, T, V)
    loss_sum = F.cross_entropy(
        logits.float().flatten(0, 1),
        tgt_out.flatten(),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    count = distributed.all_reduce_sum((tgt_out != pad_id).sum(), env)  # non-pad target tokens, all processes
    return loss_sum * env.world_size / count


def _param_groups(model, weight_decay):
    """Weight decay on matrices (linear weights, embeddings); none on biases and LayerNorm parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """The optimisation loop shared by both models.

    next_batch() -> tuple of CPU tensors for this process; loss_fn(wrapped model, *batch) -> scalar loss whose
    mean over the processes is the global batch's (DDP and FSDP average the gradients); evaluate(model) ->
    {metric: value} (the model itself, not its DDP wrapper; run on every process; called at step 0 of a fresh
    run, every eval_interval steps and at the end); tokens_per_step: global tokens per step for the progress
    line; task: the settings of the task outside train_config, saved with them."""

    def __init__(
        self,
        *,
        kind,
        model,
        model_config,
        train_config,
        env,
        optimizer_factory,
        schedule,
        next_batch,
        loss_fn,
        evaluate,
        data_generator,
        tokens_per_step,
        task,
    ):
        self.kind = kind
        self.model_config = model_config
        self.config = train_config
        self.env = env
        self.module = model
        self.model = distributed.wrap_model(model, env, train_config.fsdp)
        self.optimizer = optimizer_factory(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.next_batch = next_batch
        self.loss_fn = loss_fn
        self.evaluate = evaluate
        self.data_generator = data_generator
        self.tokens_per_step = tokens_per_step
        self.task = task
        self.step = 0
        # FSDP keys optimizer state by parameter name, torch's optimizers by index: a checkpoint resumes only
        # under the layout that wrote it (its model weights load anywhere).
        self.optimizer_layout = "fsdp" if train_config.fsdp and env.distributed else "torch"
        self.autocast = torch.autocast(
            env.device.type, dtype=torch.bfloat16, enabled=train_config.amp and env.device.type == "cuda"
        )

    # ----- checkpoints

    def _state_dicts(self):
        """(model, optimizer) state dicts with full, unsharded tensors (collective under FSDP)."""
        if self.optimizer_layout == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            return get_state_dict(
                self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.module.state_dict(), self.optimizer.state_dict()

    def save(self):
        """Writes the checkpoint from the main process (every process takes part in gathering its state). When the
        file system refuses it, every process raises the main one's CheckpointWriteError, so the whole job ends
        with that one error."""
        model_state, optimizer_state = self._state_dicts()
        rng_states = distributed.all_gather_objects(ckpt.capture_rng(self.env.device), self.env)
        failure = None
        if self.env.is_main:
            try:
                ckpt.save_checkpoint(
                    ckpt.checkpoint_path(self.config.checkpoint_dir),
                    {
                        "kind": self.kind,
                        "config": self.model_config.to_dict(),
                        "train_config": dataclasses.asdict(self.config),
                        "task": self.task,
                        "model": model_state,
                        "optimizer": optimizer_state,
                        "optimizer_layout": self.optimizer_layout,
                        "scheduler": self.scheduler.state_dict(),
                        "step": self.step,
                        "rng": rng_states,
                        "data_generator": self.data_generator.get_state(),
                    },
                )
            except ckpt.CheckpointWriteError as error:
                failure = str(error)
        # every process waits here until the main one has written the checkpoint or failed to
        failure = distributed.all_gather_objects(failure, self.env)[0]
        if failure is not None:
            raise ckpt.CheckpointWriteError(failure)

    def load(self, checkpoint):
        """Continues from a checkpoint's state: parameters, optimizer, schedule, step, data stream, RNGs. A state
        that torch cannot restore (a checkpoint written by hand or by another program) is a ValueError naming
        the checkpoint, as the command lines report bad input."""
        try:
            self._restore(checkpoint)
        except (KeyError, TypeError, IndexError, RuntimeError) as error:
            raise ValueError(f"checkpoint {ckpt.checkpoint_path(self.config.checkpoint_dir)!r} holds a training "
                             f"state this run cannot restore ({type(error).__name__}: "
                             f"{' '.join(str(error).split())})") from error

    def _restore(self, checkpoint):
        if checkpoint["optimizer_layout"] != self.optimizer_layout:
            saved = checkpoint["optimizer_layout"]
            raise ValueError(f"the checkpoint's optimizer state was written by a {saved!r} run; resume it as "
                             f"one (fsdp=True under torchrun for 'fsdp'), not as {self.optimizer_layout!r}")
        if self.optimizer_layout == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=checkpoint["model"],
                optim_state_dict=checkpoint["optimizer"],
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            ckpt.check_restorable_state(checkpoint["optimizer"], self.optimizer)
            ckpt.load_model(self.module, checkpoint, ckpt.checkpoint_path(self.config.checkpoint_dir))
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        ckpt.check_restorable_schedule(checkpoint["scheduler"], self.scheduler)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.step = checkpoint["step"]
        self.data_generator.set_state(checkpoint["data_generator"])
        if len(checkpoint["rng"]) == self.env.world_size:
            ckpt.restore_rng(checkpoint["rng"][self.env.rank], self.env.device)
        else:  # another number of processes: the data stream continues exactly, dropout draws fresh numbers
            _seed_everything(self.config.seed + self.env.rank + self.step)

    # ----- the loop

    def _evaluate(self, progress, result):
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = self.evaluate(self.module)
        self.model.train()
        result.evaluations.append((self.step, metrics))
        shown = ", ".join(f"{name} {format_metric(value)}" for name, value in metrics.items())
        progress.message(f"step {self.step}: {shown}")

    def _check_finite(self, name, value, lr, progress):
        """TrainingDiverged where a loss read at this step is NaN or infinite (before it could be saved)."""
        if not math.isfinite(value):
            progress.close()
            kept = (f"; the checkpoint in {self.config.checkpoint_dir!r} was saved before step {self.step}"
                    if self.config.checkpoint_dir and os.path.exists(ckpt.checkpoint_path(self.config.checkpoint_dir))
                    else "")
            raise TrainingDiverged(f"training diverged: the {name} is {value} at step {self.step} (learning rate "
                                   f"{lr:.3g}); a lower learning rate or a longer warm-up may train{kept}")

    def run(self) -> TrainResult:
        """Trains from the current step to config.steps; evaluates, logs and saves on the way. Raises
        TrainingDiverged where the training loss (read every log_interval steps and before each save) or the
        language model's validation loss is NaN or infinite."""
        config = self.config
        result = TrainResult(model=self.module, step=self.step)
        progress = ProgressLine(config.steps, enabled=config.progress and self.env.is_main)
        self.model.train()
        if self.step == 0:
            self._evaluate(progress, result)
        while self.step < config.steps:
            batch = tuple(t.to(self.env.device, non_blocking=True) for t in self.next_batch())
            with self.autocast:
                loss = self.loss_fn(self.model, *batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            step_lr = self.optimizer.param_groups[0]["lr"]  # this step's rate; the scheduler moves to the next
            self.scheduler.step()
            self.step += 1
            progress.count_tokens(self.tokens_per_step)
            logging = self.step % config.log_interval == 0 or self.step == config.steps
            saving = config.checkpoint_dir and (
                self.step == config.steps
                or (config.checkpoint_interval and self.step % config.checkpoint_interval == 0)
            )
            if logging or saving:  # the loss is read (a device sync) only here, and checked before a save
                loss_value = (
                    distributed.all_reduce_sum(loss.detach().float(), self.env).item() / self.env.world_size
                )
                self._check_finite("training loss", loss_value, step_lr, progress)
                if logging:
                    result.train_losses.append((self.step, loss_value))
                    progress.update(self.step, loss_value, step_lr)
            if self.step % config.eval_interval == 0 or self.step == config.steps:
                self._evaluate(progress, result)
                if "val_loss" in result.evaluations[-1][1]:
                    self._check_finite("validation loss", result.evaluations[-1][1]["val_loss"], step_lr, progress)
            if saving:
                self.save()
        if not result.evaluations or result.evaluations[-1][0] != self.step:
            self._evaluate(progress, result)  # a resumed run with no steps left still reports where it stands
        progress.close()
        result.step = self.step
        return result


def _seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# The settings that shape each kind of run's computation (TrainConfig fields and the task's), which a resumed
# run must repeat; the language model's steps and decay_steps are compared by the learning rates they give
# (_schedule_difference), the corpus by the sha256 of its text (wherever it is read from). The command-line flag of
# each that has one names it in errors.
RESUME_SETTINGS = {
    "lm": ("batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip", "seed",
           "corpus_sha256", "val_fraction", "amp"),
    "seq2seq": ("batch_size", "lr", "grad_clip", "seed", "amp", "min_length", "max_length"),
}
_FLAGS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "warmup_steps": "--warmup-steps",
          "seed": "--seed", "corpus_sha256": "--corpus", "amp": "--no-amp", "min_length": "--min-length",
          "max_length": "--max-length"}


def _difference(name, saved, given):
    """'name (--flag): checkpoint <saved value>, given <value>'."""
    label = f"{name} ({_FLAGS[name]})" if name in _FLAGS else name
    return f"{label}: checkpoint {saved.get(name)!r}, given {given[name]!r}"


def _lm_schedule(settings):
    """The language model's learning-rate multiplier (step -> float) for TrainConfig fields (a dict)."""
    return warmup_cosine(
        settings["warmup_steps"], settings["decay_steps"] or settings["steps"], settings["min_lr_ratio"]
    )


def _schedule_difference(saved, given, step):
    """[the differing steps/decay_steps, explained] when they change the language model's learning rates of the
    checkpoint's `step` steps or of the next (which the optimizer state holds); else []: the resumed run is
    then an uninterrupted run of the given total."""
    differing = [name for name in ("steps", "decay_steps") if saved[name] != given[name]]
    old, new = _lm_schedule(saved), _lm_schedule(given)
    if not differing or all(old(s) == new(s) for s in range(step + 1)):
        return []
    listed = ", ".join(_difference(name, saved, given) for name in differing)
    return [f"{listed} (the cosine decay ends at decay_steps, or at steps when decay_steps is None: the "
            f"learning rates of the {step} steps taken would not be those of a run of the given total)"]


def _check_resume_settings(path, kind, saved, config: TrainConfig, task):
    """ValueError naming every setting of this run that differs from the checkpoint's where it changes the
    computation (RESUME_SETTINGS, and the learning-rate schedule's length)."""
    recorded = {**saved["train_config"], **saved.get("task", {})}
    given = {**dataclasses.asdict(config), **task}
    differences = [_difference(name, recorded, given) for name in RESUME_SETTINGS[kind]
                   if recorded.get(name) != given[name]]
    if kind == "lm":
        missing = [name for name in ("steps", "decay_steps") if name not in recorded]
        if missing:
            raise ValueError(f"checkpoint {path!r} records no {' or '.join(missing)} in its train_config, which the "
                             "learning-rate schedule of a resumed run needs (written by another program?)")
        differences += _schedule_difference(recorded, given, saved["step"])
    if differences:
        raise ValueError(
            f"checkpoint {path!r} was trained with other settings ({'; '.join(differences)}); a resumed run "
            "continues the checkpoint's computation, so these must be the checkpoint's"
        )


def _prepare_resume(config: TrainConfig, kind, model_config, task):
    """The checkpoint to resume from (validated against the model configuration and the training and task
    settings), or None for a fresh run."""
    if not config.resume:
        return None
    path = ckpt.checkpoint_path(config.checkpoint_dir)
    saved = ckpt.load_checkpoint(path, kind, model_config)
    if saved["step"] < 0:
        raise ValueError(f"checkpoint {path!r} is at step {saved['step']}; a training step count is >= 0")
    if saved["step"] > config.steps:
        raise ValueError(f"steps {config.steps} is behind the checkpoint, which is at step {saved['step']}")
    _check_resume_settings(path, kind, saved, config, task)
    return saved


def _check_fsdp(config: TrainConfig, env):
    """FSDP shards the model over the job's processes: with one process it would do nothing."""
    if config.fsdp and not env.distributed:
        raise ValueError("fsdp (--fsdp) shards over processes and needs a job of several (torchrun "
                         "--nproc-per-node N); this is one process")


def _check_checkpoint_dir(config: TrainConfig):
    """Fails before training when config.checkpoint_dir, in a fresh run without overwrite, holds a checkpoint, or
    cannot be written (it is created, and a probe file written and removed there)."""
    if not config.checkpoint_dir:
        return
    if not (config.resume or config.overwrite) and os.path.exists(ckpt.checkpoint_path(config.checkpoint_dir)):
        raise ValueError(
            f"checkpoint_dir (--checkpoint-dir) {config.checkpoint_dir!r} already holds a checkpoint: continue it "
            "with resume (--resume), or replace it with a fresh run with overwrite (--overwrite)"
        )
    try:
        ckpt.check_writable(config.checkpoint_dir)
    except ckpt.CheckpointWriteError as error:
        raise ValueError(f"checkpoint_dir (--checkpoint-dir) {config.checkpoint_dir!r} cannot hold checkpoints: "
                         f"{error.__cause__}") from error


def _with_default_lr(config: TrainConfig, kind):
    """config with lr None replaced by the trainer's DEFAULT_LR."""
    return config if config.lr is not None else dataclasses.replace(config, lr=DEFAULT_LR[kind])


def format_metric(value, digits=4):
    """A metric for a log line: `digits` decimals, or in exponent notation past a million (a perplexity
    of 1e160 would otherwise print 160 digits)."""
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.{digits}e}"


def _perplexity(loss):
    """exp(loss), inf where that overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _train(kind, model, model_config, config, env, resume_from, **parts) -> TrainResult:
    """Wraps `model` for the job, continues from `resume_from` if given, and runs the Trainer."""
    trainer = Trainer(kind=kind, model=model, model_config=model_config, train_config=config, env=env,
                      **parts)
    if resume_from is not None:
        trainer.load(resume_from)
    return trainer.run()


def _build(model_class, model_config, config, env):
    """The model, built identically on every process from config.seed, then each process's own RNG stream."""
    _seed_everything(config.seed)
    model = model_class(model_config).to(env.device)
    _seed_everything(config.seed + env.rank)  # dropout masks differ between processes, as their data does
    return model


def train_lm(
    model_config: LMConfig, config: TrainConfig, env: distributed.DistributedEnv | None = None
) -> TrainResult:
    """Trains the language model on config.corpus (None: the package's English corpus), byte-tokenised, with
    the last val_fraction of the text held out. Evaluations report validation loss and perplexity over
    `eval_windows` fixed windows. Inputs are checked (corpus, checkpoint folder, configuration) before training
    starts."""
    config = _with_default_lr(config, "lm")
    env = env or distributed.init_from_env(config.device)
    _check_fsdp(config, env)
    if model_config.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"LMConfig.vocab_size must be at least the byte tokenizer's {ByteTokenizer.vocab_size} "
                         f"(the ids it trains on); got {model_config.vocab_size}")
    text = data.load_corpus(config.corpus)
    task = {"corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}  # the corpus, wherever read from
    tokens = ByteTokenizer().encode_tensor(text)
    train_tokens, val_tokens = data.split_tokens(tokens, config.val_fraction, model_config.context_length)
    if config.eval_windows < env.world_size:
        raise ValueError(
            f"eval_windows {config.eval_windows} must be at least the number of processes {env.world_size}"
        )
    resume_from = _prepare_resume(config, "lm", model_config, task)  # first: a mistyped folder is not created
    _check_checkpoint_dir(config)
    model = _build(TransformerLM, model_config, config, env)
    generator = torch.Generator().manual_seed(config.seed)
    batches = data.LMBatches(
        train_tokens, model_config.context_length, config.batch_size, env.rank, env.world_size, generator
    )
    val_inputs, val_targets = data.validation_windows(
        val_tokens, model_config.context_length, config.eval_windows, env.rank, env.world_size
    )
    local_batch = config.batch_size // env.world_size

    def evaluate(wrapped):
        total = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of token losses, token count)
        for start in range(0, len(val_inputs), local_batch):
            inputs = val_inputs[start : start + local_batch].to(env.device)
            targets = val_targets[start : start + local_batch].to(env.device)
            total[0] += lm_loss(wrapped, inputs, targets).double() * targets.numel()
            total[1] += targets.numel()
        loss_sum, count = distributed.all_reduce_sum(total, env).tolist()
        val_loss = loss_sum / count
        return {"val_loss": val_loss, "val_ppl": _perplexity(val_loss)}

    def optimizer_factory(wrapped):
        return torch.optim.AdamW(_param_groups(wrapped, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))

    schedule = _lm_schedule(dataclasses.asdict(config))
    return _train("lm", model, model_config, config, env, resume_from, optimizer_factory=optimizer_factory,
                  schedule=schedule, next_batch=batches.next, loss_fn=lm_loss, evaluate=evaluate,
                  data_generator=generator, tokens_per_step=config.batch_size * model_config.context_length,
                  task=task)


def copy_accuracy(model: EncoderDecoderTransformer, src, tgt_out):
    """Greedy-decoding accuracy on the copy task: (token accuracy over the non-pad target positions, eos
    included; sequence accuracy: fraction of rows reproduced exactly)."""
    pad_id = model.config.pad_id
    decoded = greedy_decode(model, src, tgt_out.shape[1])  # (B, n), n <= T
    padded = torch.full_like(tgt_out, pad_id)
    padded[:, : decoded.shape[1]] = decoded
    target = tgt_out != pad_id
    correct = (padded == tgt_out) & target
    token_accuracy = correct.sum().item() / target.sum().item()
    sequence_accuracy = (correct | ~target).all(dim=1).float().mean().item()
    return token_accuracy, sequence_accuracy


def _check_copy_vocabulary(model_config: Seq2SeqConfig, symbols):
    """The copy task's letters (`symbols`, byte ids) must be in the model's vocabulary and none of its special
    ids."""
    first, last = symbols.min().item(), symbols.max().item()
    if model_config.vocab_size <= last:
        raise ValueError(f"Seq2SeqConfig.vocab_size must be at least {last + 1} to hold the copy task's letters "
                         f"a-z (ids {first}-{last}); got {model_config.vocab_size}")
    for name in ("pad_id", "bos_id", "eos_id"):
        value = getattr(model_config, name)
        if value in symbols.tolist():
            raise ValueError(f"Seq2SeqConfig.{name} must not be one of the copy task's letters a-z (ids "
                             f"{first}-{last}); got {value}")


def train_copy(
    model_config: Seq2SeqConfig,
    config: TrainConfig,
    *,
    min_length=1,
    max_length=10,
    eval_examples=256,
    env: distributed.DistributedEnv | None = None,
) -> TrainResult:
    """Trains the encoder-decoder to copy random strings of lowercase letters (lengths uniform in
    [min_length, max_length]) with label smoothing (model_config.label_smoothing) and the paper's schedule
    (Adam betas (0.9, 0.98), eps 1e-9; config.lr multiplies the rate, None: by 0.5). Evaluations report greedy-decoding
    token and sequence accuracy on `eval_examples` held-out strings. A resumed run must keep min_length and
    max_length (TrainConfig describes the rest)."""
    config = _with_default_lr(config, "seq2seq")
    env = env or distributed.init_from_env(config.device)
    _check_fsdp(config, env)
    if not is_int(eval_examples) or eval_examples < 1:
        raise ValueError(f"eval_examples (--eval-examples) must be an int >= 1; got {eval_examples!r}")
    if not (is_int(min_length) and is_int(max_length) and 1 <= min_length <= max_length):
        raise ValueError(
            f"copy lengths must be ints with 1 <= min_length <= max_length; got {min_length!r}, {max_length!r}"
        )
    if max_length + 1 > model_config.max_length:
        raise ValueError(
            f"copy max_length {max_length} + 1 (eos) exceeds the model's max_length {model_config.max_length}"
        )
    if config.batch_size % env.world_size:
        raise ValueError(
            f"batch size {config.batch_size} must be divisible by the number of processes {env.world_size}"
        )
    symbols = data.copy_symbols()
    _check_copy_vocabulary(model_config, symbols)
    task = {"min_length": min_length, "max_length": max_length}
    resume_from = _prepare_resume(config, "seq2seq", model_config, task)  # first: a mistyped folder is not created
    _check_checkpoint_dir(config)
    model = _build(EncoderDecoderTransformer, model_config, config, env)
    c = model_config
    generator = torch.Generator().manual_seed(config.seed)
    held_out = data.copy_task_batch(eval_examples, min_length, max_length, symbols, c.pad_id, c.bos_id,
                                    c.eos_id, torch.Generator().manual_seed(config.seed + 1))
    local = slice(
        env.rank * config.batch_size // env.world_size, (env.rank + 1) * config.batch_size // env.world_size
    )

    def next_batch():
        batch = data.copy_task_batch(
            config.batch_size, min_length, max_length, symbols, c.pad_id, c.bos_id, c.eos_id, generator
        )
        return tuple(t[local] for t in batch)

    def loss_fn(wrapped, src, tgt_in, tgt_out):
        return seq2seq_loss(wrapped, src, tgt_in, tgt_out, c.label_smoothing, c.pad_id, env)

    def evaluate(trained):
        src, _, tgt_out = (t.to(env.device) for t in held_out)
        with distributed.unsharded(trained):  # decoding calls encode/memory_kv/decode, not forward
            token_accuracy, sequence_accuracy = copy_accuracy(trained, src, tgt_out)
        return {"token_accuracy": token_accuracy, "sequence_accuracy": sequence_accuracy}

    def optimizer_factory(wrapped):
        return torch.optim.Adam(wrapped.parameters(), lr=config.lr, betas=(0.9, 0.98), eps=1e-9)

    return _train("seq2seq", model, model_config, config, env, resume_from,
                  optimizer_factory=optimizer_factory, schedule=inverse_sqrt(c.d_model, c.warmup_steps),
                  next_batch=next_batch, loss_fn=loss_fn, evaluate=evaluate, data_generator=generator,
                  tokens_per_step=config.batch_size * (max_length + 1), task=task)
