"""Training: the tiny language model learns, the encoder-decoder learns to copy, checkpoints resume
bit-identically and are written atomically, two gloo processes compute the gradients of one, the command
lines run, and bad input fails cleanly before anything is written."""

import contextlib
import hashlib
import io
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from threads import one_thread  # noqa: F401  (fixture)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tfm_kernels.__main__ import main as tfm_main
from tfm_kernels.models import (
    EncoderDecoderTransformer,
    LMConfig,
    Seq2SeqConfig,
    TransformerLM,
    checkpoint,
    cli,
    data,
    distributed,
    training,
)
from tfm_kernels.models.cli import generate_main, train_copy_main, train_main
from tfm_kernels.models.generation import generate
from tfm_kernels.models.progress import ProgressLine
from tfm_kernels.models.schedules import inverse_sqrt, warmup_cosine
from tfm_kernels.models.tokenizer import ByteTokenizer
from tfm_kernels.models.training import TrainConfig, lm_loss, seq2seq_loss, train_copy, train_lm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(context_length=32, d_model=32, n_layers=2, n_heads=2, d_ff=64)


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(**overrides):
    return TrainConfig(**{"progress": False, "device": "cpu", **overrides})


def test_tiny_lm_lowers_validation_loss_on_the_default_corpus():
    """From log(259) = 5.56 nats at initialisation, 150 steps must bring validation loss below 2.75 nats
    (below the ~2.9 nats of a byte-unigram model of English): a drop of more than 2.8 nats."""
    result = train_lm(LMConfig.preset("tiny"), _quiet(steps=150, batch_size=16, lr=3e-3, warmup_steps=10,
                                                      eval_interval=150, eval_windows=32))
    first, last = result.evaluations[0][1]["val_loss"], result.evaluations[-1][1]["val_loss"]
    assert first == pytest.approx(5.56, abs=0.05)
    assert last < 2.75, f"validation loss {first:.3f} -> {last:.3f}"
    assert result.evaluations[-1][1]["val_ppl"] == pytest.approx(torch.tensor(last).exp().item(), rel=1e-6)


def test_copy_task_reaches_high_accuracy():
    result = train_copy(Seq2SeqConfig.preset("tiny", warmup_steps=100),
                        _quiet(steps=400, batch_size=32, lr=0.5, eval_interval=400), max_length=8,
                        eval_examples=128)
    accuracy = result.evaluations[-1][1]["token_accuracy"]
    assert result.evaluations[0][1]["token_accuracy"] < 0.2
    assert accuracy >= 0.9, f"copy token accuracy {accuracy:.3f}"


def test_default_learning_rate_is_each_trainers_own(tmp_path):
    """lr None: the language model's peak 1e-3, the copy task's 0.5 times the paper's schedule (what the command
    lines use); a resumed run with lr None repeats the checkpoint's."""
    train_lm(LMConfig.preset("tiny", **TINY), _quiet(steps=1, batch_size=2, eval_windows=2,
                                                     checkpoint_dir=str(tmp_path / "lm")))
    copy_run = dict(batch_size=2, checkpoint_dir=str(tmp_path / "copy"))
    train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=1, **copy_run), max_length=4, eval_examples=2)
    for name, lr in [("lm", 1e-3), ("copy", 0.5)]:
        saved = checkpoint.load_checkpoint(str(tmp_path / name))
        assert saved["train_config"]["lr"] == lr and set(saved["scheduler"]["base_lrs"]) == {lr}, name
    resumed = train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=2, resume=True, **copy_run), max_length=4,
                         eval_examples=2)
    assert resumed.step == 2


@pytest.mark.parametrize("loss, perplexity", [(60.0, math.exp(60.0)), (800.0, math.inf)])
def test_perplexity_is_the_exponential_of_the_validation_loss(monkeypatch, loss, perplexity):
    """Not capped: inf only where exp overflows a float."""
    real_loss = training.lm_loss
    monkeypatch.setattr(training, "lm_loss", lambda *args: real_loss(*args) * 0 + loss)
    result = train_lm(LMConfig.preset("tiny", **TINY), _quiet(steps=1, batch_size=2, eval_windows=2))
    metrics = result.evaluations[-1][1]
    assert metrics["val_loss"] == loss and metrics["val_ppl"] == perplexity


def _loss_nan_from_step(monkeypatch, first_nan_step):
    """Makes the language model's training loss NaN from step `first_nan_step` (1-based) on."""
    real_loss, calls = training.lm_loss, []

    def loss(model, inputs, targets):
        calls.append(model.training)
        value = real_loss(model, inputs, targets)
        return value * math.nan if model.training and calls.count(True) >= first_nan_step else value

    monkeypatch.setattr(training, "lm_loss", loss)


def test_a_loss_that_becomes_nan_stops_training_before_a_save(tmp_path, monkeypatch):
    """A diverged run (a learning rate far too high) ran on to its last step, saved NaN weights and printed a
    NaN perplexity with exit status 0; the loss is now checked where it is read and before each save."""
    _loss_nan_from_step(monkeypatch, 3)
    config = _quiet(steps=6, batch_size=2, eval_windows=2, checkpoint_dir=str(tmp_path), checkpoint_interval=2,
                    log_interval=4)
    with pytest.raises(training.TrainingDiverged, match=r"^training diverged: the training loss is nan at step 4 "
                       r"\(learning rate .*\); a lower learning rate or a longer warm-up may train; the checkpoint "
                       rf"in {re.escape(repr(str(tmp_path)))} was saved before step 4$"):
        train_lm(LMConfig.preset("tiny", **TINY), config)
    assert torch.load(tmp_path / checkpoint.CHECKPOINT_NAME, weights_only=True)["step"] == 2


def test_train_command_of_a_diverged_run_is_one_line_with_status_1(tmp_path, monkeypatch, capsys):
    _loss_nan_from_step(monkeypatch, 1)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--steps", "3", "--batch-size", "2", "--eval-windows", "2", "--device", "cpu", "--no-progress",
                    "--log-interval", "1"])
    assert exit_info.value.code == 1
    assert re.fullmatch(r"python -m tfm_kernels train: error: training diverged: the training loss is nan at "
                        r"step 1 \(learning rate .*\); a lower learning rate or a longer warm-up may train",
                        capsys.readouterr().err.strip())


@pytest.mark.parametrize("error, status", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"), 1),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 1),
    (RuntimeError("another error"), None),
], ids=["cpu-allocator", "cuda", "not-memory"])
def test_memory_that_runs_out_is_one_line(monkeypatch, capsys, error, status):
    """--batch-size 1000000000000 ended in the allocator's traceback; other errors still raise as they are."""
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(cli, "train_lm", out_of_memory)
    argv = ["--steps", "1", "--device", "cpu", "--no-progress"]
    if status is None:
        with pytest.raises(RuntimeError, match="another error"):
            train_main(argv)
        return
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == status
    message = capsys.readouterr().err.strip()
    assert message.startswith("python -m tfm_kernels train: error: out of memory (") and "\n" not in message
    assert message.endswith("); a smaller batch, evaluation or model may fit")


def test_interrupted_command_is_one_line_with_the_sigint_status(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train_main", interrupted)
    assert tfm_main(["train"]) == 130
    assert capsys.readouterr().err == "python -m tfm_kernels train: interrupted\n"


def test_a_huge_metric_is_shown_in_exponent_notation():
    assert training.format_metric(3.14159) == "3.1416"
    assert training.format_metric(1.5e160, 2) == "1.50e+160"


@pytest.mark.parametrize("model_config, message", [
    (LMConfig.preset("tiny", **{**TINY, "vocab_size": 100}),
     "LMConfig.vocab_size must be at least the byte tokenizer's 259 (the ids it trains on); got 100"),
    (Seq2SeqConfig.preset("tiny", vocab_size=50, pad_id=0, bos_id=1, eos_id=2),
     "Seq2SeqConfig.vocab_size must be at least 123 to hold the copy task's letters a-z (ids 97-122); got 50"),
    (Seq2SeqConfig.preset("tiny", pad_id=ord("a")),
     "Seq2SeqConfig.pad_id must not be one of the copy task's letters a-z (ids 97-122); got 97"),
    (Seq2SeqConfig.preset("tiny", eos_id=ord("z")),
     "Seq2SeqConfig.eos_id must not be one of the copy task's letters a-z (ids 97-122); got 122"),
], ids=["lm-vocab_size", "copy-vocab_size", "copy-pad_id", "copy-eos_id"])
def test_model_vocabulary_must_hold_the_training_tokens(tmp_path, model_config, message):
    """Checked before anything is trained or written: ids outside the vocabulary would fail deep in the
    embedding, and a special id among the letters would silently train on another task."""
    run = _quiet(steps=1, batch_size=2, eval_windows=2, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=re.escape(message)):
        if isinstance(model_config, LMConfig):
            train_lm(model_config, run)
        else:
            train_copy(model_config, run, max_length=4, eval_examples=2)
    assert not (tmp_path / "run").exists()


def _parameters(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_continues_bit_identically(tmp_path, dropout):
    """N + M steps in one run equal N steps, a checkpoint, and M resumed steps: same parameters and the same
    logged losses, bit for bit (dropout makes the RNG state part of the bargain)."""
    config = LMConfig.preset("tiny", dropout=dropout, **TINY)
    common = dict(batch_size=4, lr=3e-3, warmup_steps=3, decay_steps=12, log_interval=1, eval_interval=100,
                  eval_windows=4)
    straight = train_lm(config, _quiet(steps=12, **common))
    first = train_lm(config, _quiet(steps=7, checkpoint_dir=str(tmp_path), **common))
    resumed = train_lm(config, _quiet(steps=12, checkpoint_dir=str(tmp_path), resume=True, **common))
    assert resumed.step == 12 and first.step == 7
    assert first.train_losses + resumed.train_losses == straight.train_losses
    for name, value in _parameters(straight.model).items():
        assert torch.equal(value, _parameters(resumed.model)[name]), name
    saved = checkpoint.load_checkpoint(str(tmp_path))
    assert saved["step"] == 12 and set(saved) >= {"model", "optimizer", "scheduler", "rng", "config",
                                                  "data_generator", "train_config"}
    assert os.listdir(tmp_path) == [checkpoint.CHECKPOINT_NAME]
    again = train_lm(config, _quiet(steps=12, checkpoint_dir=str(tmp_path), resume=True, **common))
    assert again.step == 12 and again.evaluations[-1][0] == 12 and not again.train_losses
    with pytest.raises(ValueError, match="steps 5 is behind the checkpoint, which is at step 12"):
        train_lm(config, _quiet(steps=5, checkpoint_dir=str(tmp_path), resume=True, **common))


def test_checkpoint_from_another_config_is_refused(tmp_path):
    config = LMConfig.preset("tiny", **TINY)
    train_lm(config, _quiet(steps=2, batch_size=2, eval_windows=2, checkpoint_dir=str(tmp_path)))
    before = os.path.getmtime(tmp_path / checkpoint.CHECKPOINT_NAME)
    other = LMConfig.preset("tiny", **{**TINY, "d_model": 64})
    expected = "another model configuration \\(d_model: checkpoint 32, requested 64"
    with pytest.raises(ValueError, match=expected):
        train_lm(other, _quiet(steps=4, batch_size=2, checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(ValueError, match="holds a 'lm' model; expected 'seq2seq'"):
        train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=4, checkpoint_dir=str(tmp_path), resume=True))
    assert os.path.getmtime(tmp_path / checkpoint.CHECKPOINT_NAME) == before
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train_lm(config, _quiet(steps=4, checkpoint_dir=str(tmp_path / "elsewhere"), resume=True))
    assert not (tmp_path / "elsewhere").exists()  # a mistyped folder to resume is not created


@pytest.mark.parametrize("field, value, message", [
    ("optimizer", {}, r"holds a training state this run cannot restore \(KeyError: 'param_groups'\)"),
    ("scheduler", {}, r"holds a training state this run cannot restore \(KeyError: "),
    ("rng", [{}], r"holds a training state this run cannot restore \(KeyError: 'python'\)"),
    ("data_generator", torch.zeros(3, dtype=torch.uint8),
     r"holds a training state this run cannot restore \(RuntimeError: "),
    ("step", "2", r"is not a tfm_kernels checkpoint: its step is a str, where int is expected"),
    ("train_config", [], r"is not a tfm_kernels checkpoint: its train_config is a list, where dict is expected"),
    ("train_config", {}, r"records no steps or decay_steps in its train_config"),
    ("step", -1, r"is at step -1; a training step count is >= 0"),
])
def test_resume_from_a_checkpoint_with_a_malformed_field_is_a_value_error(tmp_path, field, value, message):
    """A field present with content torch cannot restore (a checkpoint edited or written elsewhere) is the
    ValueError naming the checkpoint that the command lines report in one line, not a KeyError or TypeError."""
    config = LMConfig.preset("tiny", **TINY)
    run = dict(batch_size=2, eval_windows=2, checkpoint_dir=str(tmp_path))
    train_lm(config, _quiet(steps=2, **run))
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    torch.save({**torch.load(path, weights_only=True), field: value}, path)
    with pytest.raises(ValueError, match=message):
        train_lm(config, _quiet(steps=3, resume=True, **run))


def _edit(field, *keys, value):
    """A function setting checkpoint[field][keys[0]][keys[1]]... to value."""
    def edit(state):
        inner = state[field]
        for key in keys[:-1]:
            inner = inner[key]
        inner[keys[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_edit("optimizer", "state", 0, "exp_avg", value=torch.zeros(3)),
     r"optimizer state\[0\]\['exp_avg'\] has shape \(3,\), where a tensor of its parameter's shape \(\d+, \d+\)"),
    (_edit("optimizer", "state", 1, "exp_avg_sq", value=[0.0]),
     r"optimizer state\[1\]\['exp_avg_sq'\] is of type list"),
    (_edit("optimizer", "state", 0, "step", value="2"), r"optimizer state\[0\]\['step'\] is '2', where a number"),
    (_edit("optimizer", "state", 2, value=5), r"optimizer state\[2\] is of type int, where a dict is expected"),
    (_edit("optimizer", "param_groups", 0, "betas", value=(0.9,)),
     r"optimizer param_groups\[0\]\['betas'\] is \(0.9,\), where a value like \(0.9, 0.95\) is expected"),
    (_edit("optimizer", "param_groups", 1, "lr", value="0.1"), r"optimizer param_groups\[1\]\['lr'\] is '0.1'"),
    (_edit("scheduler", "last_epoch", value="2"),
     r"scheduler\['last_epoch'\] is '2', where a value like 0 is expected"),
    (_edit("scheduler", "base_lrs", value=[]), r"scheduler\['base_lrs'\] is \[\]"),
    (_edit("scheduler", "optimizer", value=1), r"scheduler holds 'optimizer', which this run's schedule does not"),
], ids=["moment-shape", "moment-list", "step-str", "state-int", "betas-length", "lr-str", "epoch-str",
        "base-lrs-empty", "scheduler-key-unknown"])
def test_resume_from_an_optimizer_or_schedule_state_that_would_fail_at_the_first_step(tmp_path, edit, message):
    """Torch's load_state_dict takes these hand edits, and the first step fails in a traceback; the resume
    refuses them instead, as the ValueError naming the checkpoint and the setting."""
    config = LMConfig.preset("tiny", **TINY)
    run = dict(batch_size=2, eval_windows=2, checkpoint_dir=str(tmp_path))
    train_lm(config, _quiet(steps=2, **run))
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match="holds a training state this run cannot restore \\(TypeError: " + message):
        train_lm(config, _quiet(steps=3, resume=True, **run))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint", "is not a tfm_kernels checkpoint: torch.load cannot read it as tensors and plain data "
                          "(UnpicklingError)"),
    ({"format": checkpoint.FORMAT_VERSION}, "is not a complete tfm_kernels checkpoint: it has no kind, config, "
                                            "train_config, task, model, optimizer, optimizer_layout, scheduler, "
                                            "step, rng, data_generator"),
    ({"format": checkpoint.FORMAT_VERSION, **{name: 0 for name in checkpoint.FIELDS if name != "model"}},
     "is not a complete tfm_kernels checkpoint: it has no model"),
], ids=["junk", "format-only", "no-model"])
def test_malformed_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    """Not torch's advice to load the file unsafely, nor a KeyError."""
    path = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", str(path), "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "weights_only" not in error
    assert error.splitlines()[-1] == f"python -m tfm_kernels generate: error: {str(path)!r} {message}"


@pytest.mark.parametrize("change, message", [
    (lambda saved: {**saved, "config": {**saved["config"], "rope": True}},
     r"holds a model configuration this version cannot build: LMConfig has no fields \['rope'\]"),
    (lambda saved: {**saved, "config": "tiny"},
     r"is not a tfm_kernels checkpoint: its config is a str, where dict is expected"),
    (lambda saved: {**saved, "config": {**saved["config"], "d_ff": 128}},
     r"holds weights that do not fit its model configuration: Error\(s\) in loading state_dict for TransformerLM"),
    (lambda saved: {**saved, "model": {}}, r"holds weights that do not fit its model configuration: .*Missing key"),
    (lambda saved: {**saved, "model": {**saved["model"], "final_norm.weight": torch.full_like(
        saved["model"]["final_norm.weight"], float("nan"))}},
     r"holds non-finite weights \(NaN or inf; the training diverged\) in final_norm.weight$"),
], ids=["unknown-field", "config-not-a-dict", "weights-unlike-config", "no-weights", "nan-weights"])
def test_generate_from_an_inconsistent_checkpoint_is_one_line(lm_checkpoint, capsys, change, message):
    """A checkpoint whose config has a field this version lacks, or whose weights do not fit its config, ended
    with a TypeError or load_state_dict's RuntimeError traceback (exit status 1); one with NaN weights (a
    diverged run) in torch's multinomial error, or with greedy, in bytes 0."""
    path = os.path.join(lm_checkpoint, checkpoint.CHECKPOINT_NAME)
    torch.save(change(torch.load(path, weights_only=True)), path)
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", lm_checkpoint, "--device", "cpu", "--max-new-tokens", "1"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.splitlines()[-1])


RESUMABLE = dict(batch_size=2, lr=1e-3, warmup_steps=2, eval_windows=2)


@pytest.mark.parametrize("change, differences", [
    (dict(batch_size=4), ["batch_size (--batch-size): checkpoint 2, given 4"]),
    (dict(lr=0.5), ["lr (--lr): checkpoint 0.001, given 0.5"]),
    (dict(seed=7), ["seed (--seed): checkpoint 0, given 7"]),
    (dict(grad_clip=0.0), ["grad_clip: checkpoint 1.0, given 0.0"]),
    (dict(warmup_steps=3), ["warmup_steps (--warmup-steps): checkpoint 2, given 3"]),
    (dict(min_lr_ratio=0.5), ["min_lr_ratio: checkpoint 0.1, given 0.5"]),
    (dict(weight_decay=0.0), ["weight_decay: checkpoint 0.1, given 0.0"]),
    (dict(val_fraction=0.2), ["val_fraction: checkpoint 0.1, given 0.2"]),
    (dict(amp=False), ["amp (--no-amp): checkpoint True, given False"]),
    (dict(corpus="OTHER TEXT"), ["corpus_sha256 (--corpus): checkpoint 'DEFAULT', given 'OTHER TEXT'"]),
    # the learning rate decays over steps (decay_steps None): another total is another schedule
    (dict(steps=6), ["steps (--steps): checkpoint 3, given 6"]),
    (dict(decay_steps=10), ["decay_steps: checkpoint None, given 10"]),
    (dict(batch_size=4, lr=0.5), ["batch_size (--batch-size): checkpoint 2, given 4",
                                  "lr (--lr): checkpoint 0.001, given 0.5"]),
])
def test_resume_refuses_settings_that_change_training(tmp_path, change, differences):
    """A resumed run continues the checkpoint's computation: a setting that changes it must equal the
    checkpoint's, and the error names every one that differs (its flag, if it has one) before anything is
    written."""
    config = LMConfig.preset("tiny", **TINY)
    train_lm(config, _quiet(steps=3, checkpoint_dir=str(tmp_path / "run"), **RESUMABLE))
    before = os.path.getmtime(tmp_path / "run" / checkpoint.CHECKPOINT_NAME)
    if "corpus" in change:  # the checkpoint's corpus is the package's, the given one its upper case
        default = data.load_corpus()
        change["corpus"] = str(tmp_path / "corpus.txt")
        (tmp_path / "corpus.txt").write_text(default.upper(), encoding="utf-8")
        differences = [d.replace("DEFAULT", _sha256(default)).replace("OTHER TEXT", _sha256(default.upper()))
                       for d in differences]
    settings = {"steps": 3, **RESUMABLE, **change}
    with pytest.raises(ValueError, match="was trained with other settings") as error:
        train_lm(config, _quiet(checkpoint_dir=str(tmp_path / "run"), resume=True, **settings))
    message = str(error.value)
    assert all(difference in message for difference in differences), message
    assert message.count(": checkpoint ") == len(differences), message
    assert os.path.getmtime(tmp_path / "run" / checkpoint.CHECKPOINT_NAME) == before


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_resume_identifies_the_corpus_by_its_text(tmp_path, monkeypatch):
    """The package's corpus, then the same text from a file given by a relative path, resumes; other text at
    that path is refused."""
    config = LMConfig.preset("tiny", **TINY)
    run = dict(checkpoint_dir=str(tmp_path / "run"), decay_steps=4, **RESUMABLE)
    train_lm(config, _quiet(steps=2, **run))
    (tmp_path / "corpus.txt").write_text(data.load_corpus(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert train_lm(config, _quiet(steps=3, corpus="corpus.txt", resume=True, **run)).step == 3
    (tmp_path / "corpus.txt").write_text(data.load_corpus().upper(), encoding="utf-8")
    with pytest.raises(ValueError, match=f"corpus_sha256 \\(--corpus\\): checkpoint '{_sha256(data.load_corpus())}'"):
        train_lm(config, _quiet(steps=4, corpus="corpus.txt", resume=True, **run))


def test_fresh_run_refuses_a_folder_holding_a_checkpoint_unless_overwrite(tmp_path, capsys):
    """Even one of the other model kind: the flag that continues it and the one that replaces it are named."""
    train_lm(LMConfig.preset("tiny", **TINY), _quiet(steps=1, batch_size=2, eval_windows=2,
                                                     checkpoint_dir=str(tmp_path)))
    before = os.path.getmtime(tmp_path / checkpoint.CHECKPOINT_NAME)
    run = ["--steps", "1", "--batch-size", "2", "--max-length", "4", "--eval-examples", "2", "--device", "cpu",
           "--no-progress", "--checkpoint-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train_copy_main(run)
    assert exit_info.value.code == 2
    assert (f"error: checkpoint_dir (--checkpoint-dir) {str(tmp_path)!r} already holds a checkpoint: continue it "
            "with resume (--resume), or replace it with a fresh run with overwrite (--overwrite)"
            ) in capsys.readouterr().err
    assert os.path.getmtime(tmp_path / checkpoint.CHECKPOINT_NAME) == before
    assert train_copy_main([*run, "--overwrite"]) == 0
    assert checkpoint.load_checkpoint(str(tmp_path))["kind"] == "seq2seq"
    with pytest.raises(ValueError, match="overwrite \\(--overwrite\\) starts afresh .* give one of them"):
        _quiet(checkpoint_dir=str(tmp_path), resume=True, overwrite=True)
    with pytest.raises(ValueError, match="overwrite \\(--overwrite\\) needs checkpoint_dir"):
        _quiet(overwrite=True)


def test_resume_refuses_another_copy_task(tmp_path):
    config = Seq2SeqConfig.preset("tiny")
    run = dict(batch_size=2, checkpoint_dir=str(tmp_path))
    train_copy(config, _quiet(steps=2, **run), max_length=5, eval_examples=2)
    with pytest.raises(ValueError, match="max_length \\(--max-length\\): checkpoint 5, given 6"):
        train_copy(config, _quiet(steps=4, resume=True, **run), max_length=6, eval_examples=2)
    with pytest.raises(ValueError, match="min_length \\(--min-length\\): checkpoint 1, given 2"):
        train_copy(config, _quiet(steps=4, resume=True, **run), min_length=2, max_length=5, eval_examples=2)


def test_resume_may_change_what_does_not_change_training(tmp_path):
    """Checkpointing, logging and evaluation settings (evaluation draws no random numbers) may change on resume,
    and so may the total steps where the learning rates of the steps taken stay those of the new total (the
    copy task's inverse-square-root schedule has no end; the language model's cosine decay ends at decay_steps,
    else at steps, so only a run still in its warm-up may change steps): the parameters are those of one
    uninterrupted run of the new total, bit for bit (dropout makes the RNG state part of the bargain)."""
    lm = LMConfig.preset("tiny", dropout=0.1, **TINY)
    bookkeeping = dict(eval_interval=1, log_interval=3, checkpoint_interval=2, eval_windows=4)
    for name, schedule in [("decay", dict(decay_steps=8)), ("warmup", dict(warmup_steps=6))]:
        common = dict(eval_interval=100, log_interval=100, **{**RESUMABLE, **schedule})
        straight = train_lm(lm, _quiet(steps=8, **common))
        train_lm(lm, _quiet(steps=4, checkpoint_dir=str(tmp_path / name), **common))
        shutil.copytree(tmp_path / name, tmp_path / f"{name}_moved")
        resumed = train_lm(lm, _quiet(steps=8, checkpoint_dir=str(tmp_path / f"{name}_moved"), resume=True,
                                      **{**common, **bookkeeping}))
        assert resumed.step == 8 and len(resumed.evaluations) == 4
        for key, value in _parameters(straight.model).items():
            assert torch.equal(value, _parameters(resumed.model)[key]), (name, key)
    with pytest.raises(ValueError, match="steps \\(--steps\\): checkpoint 8, given 9 \\(the cosine decay"):
        train_lm(lm, _quiet(steps=9, checkpoint_dir=str(tmp_path / "warmup_moved"), resume=True, **common))
    copy = Seq2SeqConfig.preset("tiny", dropout=0.1)
    task = dict(max_length=5)
    straight = train_copy(copy, _quiet(steps=6, batch_size=4, eval_interval=100), eval_examples=4, **task)
    train_copy(copy, _quiet(steps=3, batch_size=4, checkpoint_dir=str(tmp_path / "copy")), eval_examples=4,
               **task)
    resumed = train_copy(copy, _quiet(steps=6, batch_size=4, eval_interval=1, resume=True,
                                      checkpoint_dir=str(tmp_path / "copy")), eval_examples=8, **task)
    assert resumed.step == 6
    for name, value in _parameters(straight.model).items():
        assert torch.equal(value, _parameters(resumed.model)[name]), name


@pytest.mark.parametrize("setting, value", [
    ("lr", math.inf), ("lr", math.nan), ("grad_clip", math.nan), ("grad_clip", math.inf),
    ("weight_decay", math.inf), ("weight_decay", math.nan), ("min_lr_ratio", math.nan), ("min_lr_ratio", 1.5),
    ("val_fraction", 0.0), ("val_fraction", 1.0),
])
def test_train_config_refuses_non_finite_and_out_of_range_floats(setting, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{setting} must be .*; got {value!r}"):
        TrainConfig(**{setting: value})


@pytest.mark.parametrize("setting, value, expected", [
    ("decay_steps", 2.5, "a positive int or None"), ("decay_steps", True, "a positive int or None"),
    ("checkpoint_interval", True, "an int >= 0"), ("resume", "False", "a bool"), ("amp", 1, "a bool"),
    ("fsdp", "no", "a bool"), ("progress", None, "a bool"), ("overwrite", 0, "a bool"),
    ("lr", "1e-3", re.escape("a number in (0, 3.403e+37] or None")),
    ("lr", 10**38, re.escape("a number in (0, 3.403e+37] or None")), ("grad_clip", True, "a finite number >= 0"),
    ("checkpoint_dir", 3, re.escape("a non-empty path (str or os.PathLike) or None")),
    ("checkpoint_dir", "", re.escape("a non-empty path (str or os.PathLike) or None")),
    ("corpus", "", re.escape("a non-empty path (str or os.PathLike) or None")),
])
def test_train_config_refuses_values_of_the_wrong_type(setting, value, expected):
    """A bool given as a string (from a file or the environment) or an int is refused, not read as truthy."""
    with pytest.raises(ValueError, match=f"TrainConfig.{setting} must be {expected}; got {value!r}"):
        TrainConfig(**{setting: value})


def test_paths_and_numpy_numbers_are_checkpointed_as_plain_values(tmp_path):
    """A pathlib folder or a numpy float in the settings is stored as str or float: torch.load's weights_only
    mode, which reads the checkpoint back, refuses other types."""
    config = _quiet(steps=1, batch_size=2, eval_windows=2, checkpoint_dir=tmp_path, corpus=tmp_path / "corpus.txt",
                    lr=np.float64(1e-3), min_lr_ratio=np.float32(0.5))
    assert (config.checkpoint_dir, config.corpus) == (str(tmp_path), str(tmp_path / "corpus.txt"))
    assert type(config.lr) is float and type(config.min_lr_ratio) is float and config.min_lr_ratio == 0.5
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    model_config = LMConfig.preset("tiny", **TINY, dropout=np.float64(0.1))
    assert type(model_config.dropout) is float
    train_lm(model_config, config)
    assert checkpoint.load_checkpoint(str(tmp_path), "lm", model_config)["step"] == 1


def test_progress_shows_the_rate_each_step_used(monkeypatch):
    """The learning rate beside a step's loss is the one its optimizer step used, not the next step's."""
    shown = []
    monkeypatch.setattr(ProgressLine, "update", lambda self, step, loss, lr: shown.append(lr))
    train_lm(LMConfig.preset("tiny", **TINY), _quiet(steps=3, batch_size=2, eval_windows=2, warmup_steps=4,
                                                      lr=1e-3, log_interval=1, eval_interval=100))
    assert shown == pytest.approx([2.5e-4, 5e-4, 7.5e-4])


def test_windows_need_a_context_and_its_target():
    for make in (lambda: data.LMBatches(torch.arange(4), 4, 2), lambda: data.validation_windows(torch.arange(4), 4, 3)):
        with pytest.raises(ValueError, match="a window of context_length 4 needs at least 5 tokens .*; got 4"):
            make()


def test_validation_windows_span_a_split_past_float32_integers():
    """Evenly spaced starts from the first token to the last window, exact past 2**24 tokens (float32 rounds
    16777219 up to 16777220, a window past the end)."""
    high = 2**24 + 3  # the last window's start
    tokens = torch.arange(high + 8 + 1) % 251  # (high + 9,): a last window of 8 tokens and its target
    inputs, targets = data.validation_windows(tokens, 8, 4)
    assert inputs[:, 0].tolist() == [t % 251 for t in (0, high // 3, 2 * high // 3, high)]
    assert targets[-1, -1] == tokens[-1]


def test_checkpoint_interval_needs_a_checkpoint_dir():
    """A checkpoint interval without a folder to save in would be ignored: refused instead."""
    with pytest.raises(ValueError, match=r"TrainConfig.checkpoint_interval \(5\) needs checkpoint_dir"):
        TrainConfig(checkpoint_interval=5)


@pytest.mark.parametrize("inside", [False, True])
def test_checkpoint_dir_that_is_a_file_fails_before_training(tmp_path, monkeypatch, capsys, inside):
    """--checkpoint-dir naming a file (or a folder inside one), which no checkpoint can be written in, fails
    before training starts, as other bad input (status 2), with the file system's reason."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    target = str(blocker / "run" if inside else blocker)
    monkeypatch.setattr(training.Trainer, "run", lambda self: pytest.fail("trained before checking the folder"))
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--steps", "2", "--batch-size", "2", "--eval-windows", "2", "--checkpoint-dir", target,
                    "--device", "cpu", "--no-progress"])
    assert exit_info.value.code == 2
    reason = "Not a directory" if inside else "File exists"
    expected = f"checkpoint_dir (--checkpoint-dir) {target!r} cannot hold checkpoints: [Errno "
    error = capsys.readouterr().err
    assert expected in error and reason in error
    with pytest.raises(ValueError, match=reason):
        train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=2, batch_size=2, checkpoint_dir=target))
    assert blocker.read_text() == "x"


def test_cli_checkpoint_write_failure_ends_with_one_line(tmp_path, monkeypatch, capsys):
    """An OSError while saving (disk full) ends the run with a one-line error and status 1, not a traceback."""
    def failing_save(obj, file):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--steps", "2", "--batch-size", "2", "--eval-windows", "2", "--checkpoint-dir",
                    str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("python -m tfm_kernels train: error: could not write the checkpoint") and (
        "No space left on device" in error and "\n" not in error)
    assert os.listdir(tmp_path / "run") == []


@pytest.mark.parametrize("lengths", [(1, 4.0), (0, 4), (5, 4), (True, 4)])
def test_train_copy_lengths_are_ints_from_1(lengths):
    with pytest.raises(ValueError, match=re.escape(f"copy lengths must be ints with 1 <= min_length <= max_length; "
                                                   f"got {lengths[0]!r}, {lengths[1]!r}")):
        train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=1, batch_size=2), min_length=lengths[0],
                   max_length=lengths[1])


@pytest.mark.parametrize("eval_examples", [0, -1])
def test_train_copy_needs_an_eval_example(tmp_path, eval_examples):
    with pytest.raises(ValueError, match=f"eval_examples \\(--eval-examples\\) must be an int >= 1; got "
                                         f"{eval_examples}"):
        train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=1, batch_size=2, checkpoint_dir=str(tmp_path / "run")),
                   eval_examples=eval_examples)
    assert not (tmp_path / "run").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, {"kind": "lm", "step": 1})

    def failing_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, {"kind": "lm", "step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_checkpoint_save_removes_temporaries_of_killed_writers(tmp_path):
    """A writer killed mid-write leaves its temporary file; the next save removes it, and keeps those of writers
    still alive."""
    path = str(tmp_path / "checkpoint.pt")
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / f"checkpoint.pt.tmp.{killed.pid}").write_bytes(b"partial")
    killed.kill()
    killed.wait()
    alive = tmp_path / f"checkpoint.pt.tmp.{os.getppid()}"
    alive.write_bytes(b"being written")
    checkpoint.save_checkpoint(path, {"kind": "lm", "step": 1})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", alive.name]


def test_rng_state_follows_the_training_gpu_only(monkeypatch):
    """A checkpoint holds the generator of the GPU the process trains on, and puts it back on the GPU the
    resumed process trains on: a run saved on cuda:3 of an 8-GPU machine resumes on a 1-GPU one. (CPU test:
    torch.cuda's state functions are stood in for.)"""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    state = checkpoint.capture_rng(torch.device("cuda", 3))
    checkpoint.restore_rng(state, torch.device("cuda", 0))
    assert [c[:2] for c in calls] == [("get", torch.device("cuda", 3)), ("set", torch.device("cuda", 0))]
    assert torch.equal(calls[1][2], torch.ones(4))
    assert "cuda" not in checkpoint.capture_rng(torch.device("cpu"))


@pytest.mark.parametrize("write, error, message", [
    (None, FileNotFoundError, "corpus file .* does not exist"),
    ("", ValueError, "corpus .* is empty"),
    ("  \n\n ", ValueError, "corpus .* is empty"),
    ("short text", ValueError, "corpus too small: 10 tokens"),
    (b"\xff\xfe\x00bad", ValueError, "is not UTF-8 text"),
])
def test_bad_corpus_fails_before_anything_is_written(tmp_path, write, error, message):
    corpus = tmp_path / "corpus.txt"
    if isinstance(write, str):
        corpus.write_text(write)
    elif isinstance(write, bytes):
        corpus.write_bytes(write)
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train_lm(LMConfig.preset("tiny", **TINY),
                 _quiet(steps=2, corpus=str(corpus), checkpoint_dir=str(out)))
    assert not out.exists()


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc/self/mem")
def test_unreadable_corpus_is_a_clear_error(tmp_path):
    """A corpus whose read fails (here an I/O error: /proc/self/mem at offset 0 is unmapped) is bad input, as a
    missing one is: a ValueError naming it, nothing written."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="corpus '/proc/self/mem' cannot be read: Input/output error"):
        train_lm(LMConfig.preset("tiny", **TINY), _quiet(steps=2, corpus="/proc/self/mem", checkpoint_dir=str(out)))
    assert not out.exists()


def test_default_corpus_ships_with_the_package():
    text = data.load_corpus()
    assert 40_000 < len(text.encode()) < 200_000
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text


def test_batches_shard_one_global_batch():
    tokens = torch.arange(1000)
    whole = data.LMBatches(tokens, 16, 8, generator=torch.Generator().manual_seed(3)).next()
    shards = [data.LMBatches(tokens, 16, 8, rank, 2, torch.Generator().manual_seed(3)).next()
              for rank in (0, 1)]
    assert torch.equal(torch.cat([s[0] for s in shards]), whole[0])
    assert torch.equal(whole[1], whole[0] + 1)  # targets are the next tokens
    with pytest.raises(ValueError, match="batch size 7 must be divisible by the number of processes 2"):
        data.LMBatches(tokens, 16, 7, 0, 2)


def test_schedules():
    paper = inverse_sqrt(512, 4000)
    peak = max(range(8000), key=paper)
    assert peak == 3999  # step 4000 counted from 1
    assert paper(3999) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert paper(15999) == pytest.approx(paper(3999) / 2)
    cosine = warmup_cosine(10, 110, min_ratio=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1) and cosine(500) == 0.1


# ---------------------------------------------------------------------------------------------------------
# Two processes on the gloo backend


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_runs(world_size, out_dir):
    """Gradients of one step on a global batch of 8 sequences (this rank's share of it), then 3 training
    steps with DDP, and with world_size 2 also 2 + 1 resumed steps with FSDP; 2 steps of the copy task (FSDP
    with world_size 2). Rank 0 saves what it saw."""
    torch.set_num_threads(1)
    env = distributed.init_from_env("cpu")
    config = LMConfig.preset("tiny", **TINY)
    torch.manual_seed(0)
    model = TransformerLM(config)
    wrapped = distributed.wrap_model(model, env)
    tokens = ByteTokenizer().encode_tensor(data.load_corpus())
    inputs, targets = data.LMBatches(tokens, config.context_length, 8, env.rank, env.world_size,
                                     torch.Generator().manual_seed(0)).next()
    lm_loss(wrapped, inputs, targets).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    run = dict(batch_size=8, eval_windows=4, checkpoint_dir=os.path.join(out_dir, f"ddp{world_size}"))
    result = train_lm(config, _quiet(steps=3, **run), env)
    if world_size > 1:
        run["checkpoint_dir"] = os.path.join(out_dir, "fsdp")
        train_lm(config, _quiet(steps=2, fsdp=True, **run), env)
        train_lm(config, _quiet(steps=3, fsdp=True, resume=True, **run), env)
    copy = train_copy(Seq2SeqConfig.preset("tiny"), _quiet(steps=2, batch_size=4, lr=1e-3, eval_interval=2,
                                                           fsdp=world_size > 1), max_length=4, eval_examples=8,
                      env=env)
    copy_params = _parameters(copy.model) if world_size == 1 else get_model_state_dict(
        copy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        torch.save({"grads": grads, "params": _parameters(result.model),
                    "val_loss": result.evaluations[-1][1]["val_loss"], "copy_params": copy_params,
                    "copy_evaluations": copy.evaluations},
                   os.path.join(out_dir, f"out{world_size}.pt"))
    distributed.shutdown(env)


def _unequal_copy_batch(config):
    """4 rows of the copy task (lengths 1-8), longest first: rows 0-1 hold more target tokens than rows 2-3."""
    src, tgt_in, tgt_out = data.copy_task_batch(4, 1, 8, data.copy_symbols(), config.pad_id, config.bos_id,
                                                config.eos_id, torch.Generator().manual_seed(0))
    order = (tgt_out != config.pad_id).sum(dim=1).argsort(descending=True)
    return src[order], tgt_in[order], tgt_out[order]


def _copy_task_runs(world_size, out_dir):
    """The copy task's gradients of one loss evaluation on _unequal_copy_batch (this rank's half of it), then 2
    training steps with DDP, logging every step. Rank 0 saves what it saw."""
    torch.set_num_threads(1)
    env = distributed.init_from_env("cpu")
    config = Seq2SeqConfig.preset("tiny")
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(config)
    wrapped = distributed.wrap_model(model, env)
    share = slice(env.rank * 4 // env.world_size, (env.rank + 1) * 4 // env.world_size)
    batch = [t[share] for t in _unequal_copy_batch(config)]
    seq2seq_loss(wrapped, *batch, config.label_smoothing, config.pad_id, env).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    result = train_copy(config, _quiet(steps=2, batch_size=4, lr=1e-3, log_interval=1, eval_interval=2),
                        max_length=8, eval_examples=4, env=env)
    if env.is_main:
        torch.save({"grads": grads, "losses": result.train_losses, "params": _parameters(result.model)},
                   os.path.join(out_dir, f"copy{world_size}.pt"))
    distributed.shutdown(env)


def _worker(rank, world_size, port, out_dir, runs):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    runs(world_size, out_dir)


def _on_two_ranks_and_one(tmp_path, runs, stem):
    """Runs `runs(world_size, out_dir)` on two gloo ranks, then in this process alone; returns what each saved
    (tmp_path / f"{stem}2.pt", f"{stem}1.pt")."""
    # fork: the children inherit the imported modules instead of importing torch again (seconds each)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), runs), nprocs=2, start_method="fork")
    runs(1, str(tmp_path))
    return torch.load(tmp_path / f"{stem}2.pt"), torch.load(tmp_path / f"{stem}1.pt")


def _failing_save_runs(world_size, out_dir):
    """train-copy whose checkpoint the file system refuses (the test patches the writer); each rank records its
    exit status and what it wrote to stderr."""
    torch.set_num_threads(1)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        train_copy_main(["--steps", "1", "--batch-size", "2", "--max-length", "4", "--eval-examples", "2",
                         "--device", "cpu", "--no-progress", "--checkpoint-dir", os.path.join(out_dir, "run")])
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.txt"), "w") as file:
        file.write(f"{exit_info.value.code}\n{stderr.getvalue()}")


def test_checkpoint_write_failure_ends_every_rank_with_the_same_line(tmp_path, monkeypatch):
    """Rank 0 cannot write the checkpoint: every rank exits with its one-line error and status 1, none with a
    traceback from waiting for rank 0."""
    def failing_save(path, payload):
        raise checkpoint.CheckpointWriteError(f"could not write the checkpoint {path!r}: [Errno 28] No space left")

    monkeypatch.setattr(checkpoint, "save_checkpoint", failing_save)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), _failing_save_runs), nprocs=2,
                       start_method="fork")
    expected = ("1\npython -m tfm_kernels train-copy: error: could not write the checkpoint "
                f"{os.path.join(str(tmp_path), 'run', checkpoint.CHECKPOINT_NAME)!r}: [Errno 28] No space left\n")
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == [expected, expected]


def test_two_gloo_ranks_compute_what_one_process_computes(tmp_path):
    """DDP on two processes: the same gradients as one process on the same global batch, and the same
    parameters after 3 steps; FSDP (with a save and a resume on the way) reaches the same parameters."""
    two, one = _on_two_ranks_and_one(tmp_path, _distributed_runs, "out")
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    fsdp = checkpoint.load_checkpoint(str(tmp_path / "fsdp"))
    assert fsdp["step"] == 3 and len(fsdp["rng"]) == 2
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(fsdp["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    # the encoder-decoder under FSDP: training and greedy-decoding evaluation call encode/memory_kv/decode
    for name, value in one["copy_params"].items():
        torch.testing.assert_close(two["copy_params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert [step for step, _ in two["copy_evaluations"]] == [0, 2]
    assert sorted(os.listdir(tmp_path / "ddp2")) == [checkpoint.CHECKPOINT_NAME]


def test_two_gloo_ranks_with_unequal_target_tokens_compute_the_copy_task_of_one_process(tmp_path):
    """The copy task's loss is the mean over the global batch's target tokens however they fall between the
    ranks: with more on rank 0 than on rank 1, DDP gives the gradients, logged losses and parameters of one
    process on the same global batch."""
    config = Seq2SeqConfig.preset("tiny")
    counts = [(t != config.pad_id).sum().item() for t in _unequal_copy_batch(config)[2].split(2)]
    first_batch = data.copy_task_batch(4, 1, 8, data.copy_symbols(), config.pad_id, config.bos_id, config.eos_id,
                                       torch.Generator().manual_seed(0))  # train_copy's first (seed 0)
    first_counts = [(t != config.pad_id).sum().item() for t in first_batch[2].split(2)]
    assert counts[0] > counts[1] and first_counts[0] != first_counts[1], (counts, first_counts)
    two, one = _on_two_ranks_and_one(tmp_path, _copy_task_runs, "copy")
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert [step for step, _ in two["losses"]] == [1, 2]
    for (_, loss_two), (_, loss_one) in zip(two["losses"], one["losses"]):
        assert loss_two == pytest.approx(loss_one, rel=1e-6)
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Command lines


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "tfm_kernels", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)


def test_cli_trains_then_generates(tmp_path, capsys):
    run = _cli("train", "--preset", "tiny", "--steps", "5", "--batch-size", "4", "--eval-interval", "5",
               "--checkpoint-dir", str(tmp_path), "--device", "cpu")
    assert run.returncode == 0, run.stderr
    assert "step 5: validation loss" in run.stdout and "tokens/s" in run.stderr
    # generate in this process: one more interpreter start-up would double the test's time
    assert generate_main(["--checkpoint", str(tmp_path), "--prompt", "Once upon", "--max-new-tokens", "20",
                          "--device", "cpu", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Once upon") and len(text.encode()) > len("Once upon")
    assert generate_main(["--checkpoint", str(tmp_path), "--prompt", "Once upon", "--max-new-tokens", "20",
                          "--device", "cpu", "--seed", "1", "--no-cache"]) == 0
    assert capsys.readouterr().out == text


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--corpus", str(tmp_path / "missing.txt"), "--steps", "2", "--checkpoint-dir",
                    str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    train_main(["--steps", "2", "--batch-size", "2", "--context-length", "16", "--checkpoint-dir",
                str(tmp_path), "--device", "cpu", "--no-progress", "--eval-windows", "2"])
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", str(tmp_path), "--prompt", "x" * 17, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--prompt is 17 bytes, longer than the model's context length 16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # by default as many bytes as fit: none fits
        generate_main(["--checkpoint", str(tmp_path), "--prompt", "x" * 16, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--prompt is 16 bytes and fills the model's context length: no byte fits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "enormous"])
    assert exit_info.value.code == 2
    assert "argument --preset: invalid choice: 'enormous'" in capsys.readouterr().err


@pytest.mark.parametrize("command, flag, value, expected", [
    (train_main, "--steps", "0", "an int >= 1"),
    (train_main, "--batch-size", "-1", "an int >= 1"),
    (train_main, "--context-length", "0", "an int >= 1"),
    (train_main, "--lr", "nan", "a finite number > 0 and <= 3.403e+37"),
    (train_main, "--lr", "1e39", "a finite number > 0 and <= 3.403e+37"),
    (train_main, "--checkpoint-interval", "-1", "an int >= 0"),
    (train_main, "--seed", str(10**23), "an int in [0, 9223372036854775807]"),
    (train_copy_main, "--max-length", "x", "an int >= 1"),
    (generate_main, "--max-new-tokens", "-1", "an int >= 0"),
    (generate_main, "--temperature", "-1", "a finite number > 0"),
    (generate_main, "--top-k", "0", "an int >= 1"),
])
def test_cli_number_errors_name_the_flag(capsys, command, flag, value, expected):
    """Out-of-range numbers are refused as the flags are read, naming the flag (not the API field behind it)."""
    with pytest.raises(SystemExit) as exit_info:
        command([flag, value] + (["--checkpoint", "unread"] if command is generate_main else []))
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected {expected}; got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [-1, 2**63, True])
def test_train_config_seed_stays_below_2_63(seed):
    """A run seeds torch with seed + rank + step, which must stay below 2**64."""
    with pytest.raises(ValueError, match=rf"TrainConfig.seed must be an int in \[0, 2\*\*63\); got {seed!r}"):
        TrainConfig(seed=seed)


@pytest.fixture
def lm_checkpoint(tmp_path):
    """The folder of a one-step language-model checkpoint (context length 32)."""
    train_lm(LMConfig.preset("tiny", **TINY), _quiet(steps=1, batch_size=2, eval_windows=2,
                                                     checkpoint_dir=str(tmp_path)))
    return str(tmp_path)


def test_generate_from_a_damaged_checkpoint_is_one_line(lm_checkpoint, capsys):
    """Bytes changed inside a weight tensor's record after torch.save (torch.load does not check the zip
    archive's CRC-32s) are refused, where the changed weights were used silently."""
    path = os.path.join(lm_checkpoint, checkpoint.CHECKPOINT_NAME)
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith("/data/0"))
    data = bytearray(open(path, "rb").read())
    # the record's bytes follow its local header: 30 bytes, then its name and extra field (lengths at 26 and 28)
    name_length, extra_length = struct.unpack_from("<HH", data, record.header_offset + 26)
    data[record.header_offset + 30 + name_length + extra_length] ^= 0x01  # one bit of the first tensor
    with open(path, "wb") as file:
        file.write(data)
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", lm_checkpoint, "--device", "cpu", "--max-new-tokens", "1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m tfm_kernels generate: error: checkpoint {path!r} is damaged: its record {record.filename!r} "
        "fails its checksum")


@pytest.mark.parametrize("prompt, message", [
    ("", "--prompt must not be empty"),
    # a command-line byte that is not UTF-8 (bash $'caf\\xff') reaches Python as a lone surrogate
    ("caf\udcff", "--prompt is not UTF-8 text: 'utf-8' codec can't encode character '\\udcff' in position 3"),
])
def test_cli_generate_prompt_errors_name_the_flag(lm_checkpoint, capsys, prompt, message):
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", lm_checkpoint, "--prompt", prompt, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--temperature", "0.5"], ["--top-k", "3"], ["--seed", "7"]])
def test_cli_generate_refuses_sampling_flags_with_greedy(lm_checkpoint, capsys, flags):
    """--greedy ignores the sampling settings: giving one with it is a mistake said at once, not ignored."""
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", lm_checkpoint, "--device", "cpu", "--greedy", *flags])
    assert exit_info.value.code == 2
    assert f"--greedy takes the most likely byte; {flags[0]} would have no effect" in capsys.readouterr().err


def test_fsdp_needs_several_processes():
    """--fsdp in one process would train unsharded under a flag that says otherwise: refused."""
    with pytest.raises(ValueError, match=r"fsdp \(--fsdp\) shards over processes and needs a job of several"):
        train_lm(LMConfig.preset("tiny", **TINY), TrainConfig(steps=1, batch_size=2, fsdp=True))


def test_unavailable_device_is_refused_naming_the_flag(lm_checkpoint, capsys, monkeypatch):
    """A valid device name this machine or build lacks is bad input naming --device, not a traceback when the
    model moves there."""
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--checkpoint", lm_checkpoint, "--device", "mps"])
    assert exit_info.value.code == 2 and "error: --device 'mps' is not available" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--device 'mps' is not available"):
        train_lm(LMConfig.preset("tiny", **TINY), TrainConfig(steps=1, batch_size=2, device="mps"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--device 'cuda:3': this machine has 1 CUDA device"):
        distributed.resolve_device("cuda:3")
    with pytest.raises(ValueError, match="--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got 'meta'"):
        distributed.resolve_device("meta")
    with pytest.raises(ValueError, match="--device 'cpu:1': the CPU is one device, 'cpu'"):
        distributed.resolve_device("cpu:1")
    assert distributed.resolve_device("cpu:0") == torch.device("cpu", 0)


@pytest.mark.parametrize("environment, message", [
    ({"WORLD_SIZE": "2"}, "environment variable RANK must be an integer (torchrun sets it); got None"),
    ({"WORLD_SIZE": ""}, "environment variable WORLD_SIZE must be an integer (torchrun sets it); got ''"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "environment variable LOCAL_RANK must be an integer"),
])
def test_malformed_launcher_environment_names_the_variable(monkeypatch, environment, message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.init_from_env("cpu")


def test_cli_train_copy_takes_the_longest_copy_the_model_holds(capsys):
    """The tiny preset holds 64 positions: 63 letters + eos train and decode at evaluation; 64 do not fit."""
    run = ["--steps", "1", "--batch-size", "2", "--eval-examples", "2", "--device", "cpu", "--no-progress"]
    assert train_copy_main([*run, "--max-length", "63"]) == 0
    assert "step 1: copy token accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        train_copy_main([*run, "--max-length", "64"])
    assert exit_info.value.code == 2
    assert "copy max_length 64 + 1 (eos) exceeds the model's max_length 64" in capsys.readouterr().err


def test_cli_train_copy_reports_accuracy(capsys):
    assert train_copy_main(["--steps", "3", "--batch-size", "4", "--max-length", "4", "--eval-examples", "8",
                            "--device", "cpu", "--no-progress"]) == 0
    assert "step 3: copy token accuracy" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# GPU (benchmarks/device_check.sh)


@pytest.mark.gpu
def test_gpu_bf16_training_and_cached_generation(tmp_path):
    """bf16 autocast training on the GPU kernels lowers the loss, checkpoints resume there, and cached greedy
    decoding equals uncached decoding on the GPU; decode-step attention runs on a kernel backend."""
    from tfm_kernels import backends

    config = LMConfig.preset("tiny")
    # decay_steps: the 40-step run's learning rates are those of the 60-step run it resumes into
    run = dict(batch_size=16, lr=3e-3, warmup_steps=10, decay_steps=60, eval_interval=60, eval_windows=32,
               device="cuda", checkpoint_dir=str(tmp_path))
    first = train_lm(config, _quiet(steps=40, **run))
    result = train_lm(config, _quiet(steps=60, resume=True, **run))
    assert next(result.model.parameters()).is_cuda
    assert result.evaluations[-1][1]["val_loss"] < first.evaluations[0][1]["val_loss"] - 1.5
    model = result.model.eval()
    prompt = torch.randint(0, 256, (4, 9), device="cuda")
    assert torch.equal(generate(model, prompt, 40, greedy=True), generate(model, prompt, 40, greedy=True,
                                                                         use_cache=False))
    q = torch.randn(4, 4, 1, 16, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 4, 49, 16, device="cuda", dtype=torch.bfloat16)
    assert backends.choose(q, k, k) in ("cuda", "triton")
