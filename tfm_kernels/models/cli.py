"""Command lines: `python -m tfm_kernels train | generate | train-copy`.

Each runs unchanged under `torchrun --nproc-per-node N -m tfm_kernels train ...`
(DistributedDataParallel, or FSDP with --fsdp). Bad input ends with a one-line error naming the argument
and exit status 2; a checkpoint the file system refuses (disk full), a training whose loss becomes NaN or
infinite, or memory that runs out ends with a one-line error and exit status 1."""

import argparse
import gc
import math
import sys

import torch

from . import checkpoint, distributed
from .config import LMConfig, Seq2SeqConfig
from .generation import generate
from .lm import TransformerLM
from .tokenizer import ByteTokenizer
from .training import (
    DEFAULT_LR,
    LR_LIMIT,
    SEED_LIMIT,
    TrainConfig,
    TrainingDiverged,
    format_metric,
    train_copy,
    train_lm,
)

DEFAULT_NEW_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8
DEFAULT_SEED = 0


def _int_at_least(minimum, maximum=None):
    """An argparse type: an int in [minimum, maximum] (no upper bound for None), so that errors name the flag."""
    expected = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


def _positive_number(maximum=math.inf):
    """An argparse type: a finite float in (0, maximum]."""
    expected = "a finite number > 0" + (f" and <= {maximum:.4g}" if math.isfinite(maximum) else "")

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
        return value

    return parse


POSITIVE = _int_at_least(1)
SEED = _int_at_least(0, SEED_LIMIT - 1)


def _add_common_training_args(parser, config_class, default_steps, default_batch, default_lr, lr_help):
    parser.add_argument("--preset", default="tiny", choices=sorted(config_class.PRESETS),
                        help="model preset (default: tiny)")
    parser.add_argument(
        "--steps",
        type=POSITIVE,
        default=default_steps,
        help="total optimizer steps (default: %(default)s; with --resume it may differ from the checkpoint's, not "
        "below its step, where the run then equals an uninterrupted one of the new total: always for train-copy; "
        "for train only from a checkpoint still within the warm-up, as its learning rate decays over --steps)",
    )
    parser.add_argument(
        "--batch-size",
        type=POSITIVE,
        default=default_batch,
        help="global batch (sequences per step over all processes; default: %(default)s)",
    )
    parser.add_argument("--lr", type=_positive_number(LR_LIMIT), default=default_lr,
                        help=f"{lr_help} (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--checkpoint-dir", default=None, help="folder for checkpoint.pt (none: no checkpoint)"
    )
    parser.add_argument(
        "--checkpoint-interval", type=_int_at_least(0), default=0, help="save every N steps (0: at the end)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir as the uninterrupted run would (bit for bit on "
        "the same device and number of processes): flags that change training (--batch-size, --lr, --seed, "
        "--no-amp, the data and schedule flags) must be the checkpoint's; checkpoint, logging and evaluation "
        "flags and --device may change",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh over the checkpoint in --checkpoint-dir (without it, a fresh run refuses a folder "
        "that holds one)",
    )
    parser.add_argument("--eval-interval", type=POSITIVE, default=100,
                        help="steps between validation evaluations (default: %(default)s)")
    parser.add_argument("--log-interval", type=POSITIVE, default=10,
                        help="steps between training-loss reports (default: %(default)s)")
    parser.add_argument("--seed", type=SEED, default=0,
                        help="seed of the initial weights, the data order and dropout (default: %(default)s)")
    parser.add_argument(
        "--no-amp", action="store_true", help="train in float32 on GPUs (default: bf16 autocast)"
    )
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP instead of DDP under torchrun")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def _train_config(args, **extra) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_interval=args.checkpoint_interval,
        resume=args.resume,
        overwrite=args.overwrite,
        eval_interval=args.eval_interval,
        log_interval=args.log_interval,
        seed=args.seed,
        amp=not args.no_amp,
        fsdp=args.fsdp,
        progress=not args.no_progress,
        **extra,
    )


# What torch's CPU allocator raises (a RuntimeError) when a tensor does not fit in memory.
CPU_ALLOCATOR_FAILURE = "can't allocate memory"


def _out_of_memory(error) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or CPU_ALLOCATOR_FAILURE in str(error)


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _run(parser, job):
    """Runs job(start) — start(device) joins the process group — and turns bad input into
    `prog: error: ...` with exit status 2; a checkpoint that cannot be written, a diverged training or memory
    that runs out into the same line with exit status 1; the process group is left cleanly either way."""
    started = []

    def start(device):
        started.append(distributed.init_from_env(device))
        return started[-1]

    try:
        return job(start)
    except (ValueError, FileNotFoundError) as error:
        status, message = 2, str(error)
    except (checkpoint.CheckpointWriteError, TrainingDiverged) as error:
        status, message = 1, str(error)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(error):
            raise
        status, message = 1, f"out of memory ({_first_line(error)}); a smaller batch, evaluation or model may fit"
    finally:
        # The failed job's objects (its DistributedDataParallel model among them) go before the process group
        # they use: left for the interpreter's exit, they outlived it and could abort the process there.
        gc.collect()
        for env in started:
            distributed.shutdown(env)
    parser.exit(status, f"{parser.prog}: error: {message}\n")


def train_main(argv=None):
    """`python -m tfm_kernels train`: trains the language model and prints the final validation loss."""
    parser = argparse.ArgumentParser(
        prog="python -m tfm_kernels train",
        description="Train the byte-level Transformer language model on a text corpus.",
    )
    _add_common_training_args(parser, LMConfig, default_steps=2000, default_batch=32, default_lr=DEFAULT_LR["lm"],
                              lr_help="peak learning rate (linear warm-up, cosine decay to 0.1x)")
    parser.add_argument(
        "--corpus", default=None, help="UTF-8 text file (default: the corpus shipped in the package)"
    )
    parser.add_argument(
        "--context-length", type=POSITIVE, default=None, help="override the preset's context length"
    )
    parser.add_argument("--warmup-steps", type=POSITIVE, default=100,
                        help="steps of linear learning-rate warm-up (default: %(default)s)")
    parser.add_argument("--eval-windows", type=POSITIVE, default=64, help="validation windows per evaluation")
    args = parser.parse_args(argv)

    def job(start):
        overrides = {} if args.context_length is None else {"context_length": args.context_length}
        model_config = LMConfig.preset(args.preset, **overrides)
        config = _train_config(
            args, corpus=args.corpus, warmup_steps=args.warmup_steps, eval_windows=args.eval_windows
        )
        env = start(config.device)
        result = train_lm(model_config, config, env)
        if env.is_main:
            metrics = result.evaluations[-1][1]
            print(
                f"step {result.step}: validation loss {format_metric(metrics['val_loss'])}, perplexity "
                f"{format_metric(metrics['val_ppl'], 2)}"
            )
        return 0

    return _run(parser, job)


def _encode_prompt(prompt, context_length):
    """--prompt as (1, T) byte ids; ValueError naming --prompt when it is empty, not UTF-8 text (a byte that is
    not UTF-8 on the command line reaches Python as a lone surrogate) or longer than the context."""
    try:
        ids = ByteTokenizer().encode_tensor(prompt)[None]  # (1, T)
    except UnicodeEncodeError as error:
        raise ValueError(f"--prompt is not UTF-8 text: {error}") from error
    if ids.shape[1] == 0:
        raise ValueError("--prompt must not be empty")
    if ids.shape[1] > context_length:
        raise ValueError(
            f"--prompt is {ids.shape[1]} bytes, longer than the model's context length {context_length}"
        )
    return ids


def generate_main(argv=None):
    """`python -m tfm_kernels generate`: continues --prompt from a language-model checkpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m tfm_kernels generate",
        description="Sample text from a language-model checkpoint (KV-cached).",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt or the folder holding it")
    parser.add_argument("--prompt", default="The ", help="text to continue (default: %(default)r)")
    parser.add_argument(
        "--max-new-tokens",
        type=_int_at_least(0),
        default=None,
        help=f"bytes to generate (default: {DEFAULT_NEW_TOKENS}, or what fits the context)",
    )
    parser.add_argument("--temperature", type=_positive_number(), default=None,
                        help=f"sampling temperature (default {DEFAULT_TEMPERATURE})")
    parser.add_argument("--top-k", type=POSITIVE, default=None,
                        help="sample among the k most likely bytes (default: all)")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely byte")
    parser.add_argument("--seed", type=SEED, default=None, help=f"seed of the sampling (default {DEFAULT_SEED})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    args = parser.parse_args(argv)
    sampling = [flag for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                         ("--seed", args.seed)) if value is not None]
    if args.greedy and sampling:
        parser.error(f"--greedy takes the most likely byte; {', '.join(sampling)} would have no effect")

    def job(start):
        device = distributed.resolve_device(args.device)
        saved = checkpoint.load_checkpoint(args.checkpoint, kind="lm")
        try:
            model_config = LMConfig.from_dict(saved["config"])
        except ValueError as error:
            raise ValueError(f"checkpoint {args.checkpoint!r} holds a model configuration this version cannot "
                             f"build: {error}") from error
        model = TransformerLM(model_config)
        checkpoint.load_model(model, saved, args.checkpoint)
        diverged = [name for name, weight in saved["model"].items()
                    if weight.is_floating_point() and not torch.isfinite(weight).all()]
        if diverged:  # its logits would be NaN: sampling fails in torch, greedy picks byte 0 at every step
            raise ValueError(f"checkpoint {args.checkpoint!r} holds non-finite weights (NaN or inf; the training "
                             f"diverged) in {', '.join(diverged[:3])}{', ...' if len(diverged) > 3 else ''}")
        model.to(device).eval()
        prompt = _encode_prompt(args.prompt, model_config.context_length).to(device)  # (1, T)
        new_tokens = args.max_new_tokens
        if new_tokens is None:
            room = model_config.context_length - prompt.shape[1]
            if room == 0:
                raise ValueError(f"--prompt is {prompt.shape[1]} bytes and fills the model's context length: "
                                 f"no byte fits after it")
            new_tokens = min(DEFAULT_NEW_TOKENS, room)
        generator = torch.Generator(device=device).manual_seed(DEFAULT_SEED if args.seed is None else args.seed)
        tokens = generate(
            model,
            prompt,
            new_tokens,
            greedy=args.greedy,
            temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
            top_k=args.top_k,
            generator=generator,
            use_cache=not args.no_cache,
        )
        sys.stdout.write(ByteTokenizer().decode(tokens[0]) + "\n")
        return 0

    return _run(parser, job)


def train_copy_main(argv=None):
    """`python -m tfm_kernels train-copy`: trains the encoder-decoder to copy; prints its accuracy."""
    parser = argparse.ArgumentParser(
        prog="python -m tfm_kernels train-copy",
        description="Train the encoder-decoder Transformer to copy random strings.",
    )
    _add_common_training_args(parser, Seq2SeqConfig, default_steps=600, default_batch=64,
                              default_lr=DEFAULT_LR["seq2seq"],
                              lr_help="multiplier of the paper's inverse-sqrt schedule (1.0: the paper's)")
    parser.set_defaults(eval_interval=200)
    parser.add_argument("--warmup-steps", type=POSITIVE, default=None, help="override the preset's warm-up steps")
    parser.add_argument("--min-length", type=POSITIVE, default=1,
                        help="shortest string to copy, in symbols (default: %(default)s)")
    parser.add_argument("--max-length", type=POSITIVE, default=10,
                        help="longest string to copy, in symbols (default: %(default)s)")
    parser.add_argument("--eval-examples", type=POSITIVE, default=256, help="held-out strings per evaluation")
    args = parser.parse_args(argv)

    def job(start):
        overrides = {} if args.warmup_steps is None else {"warmup_steps": args.warmup_steps}
        model_config = Seq2SeqConfig.preset(args.preset, **overrides)
        config = _train_config(args)
        env = start(config.device)
        result = train_copy(
            model_config,
            config,
            min_length=args.min_length,
            max_length=args.max_length,
            eval_examples=args.eval_examples,
            env=env,
        )
        if env.is_main:
            metrics = result.evaluations[-1][1]
            print(
                f"step {result.step}: copy token accuracy {metrics['token_accuracy']:.4f}, sequence accuracy "
                f"{metrics['sequence_accuracy']:.4f}"
            )
        return 0

    return _run(parser, job)
