"""`python -m tfm_kernels <command>`: bench, train, generate, train-copy, info."""

import argparse
import importlib
import json
import sys

# command -> (module, function, help); each function takes the remaining argv.
COMMANDS = {
    "bench": ("tfm_kernels.bench", "main", "benchmark tables against PyTorch (self-check + CPU table without a GPU)"),
    "train": ("tfm_kernels.models.cli", "train_main", "train the language model on a text corpus"),
    "generate": ("tfm_kernels.models.cli", "generate_main", "sample text from a language-model checkpoint"),
    "train-copy": ("tfm_kernels.models.cli", "train_copy_main", "train the encoder-decoder on the copy task"),
}
INFO_HELP = "build and device information"
INTERRUPTED = 128 + 2  # exit status of a command stopped by SIGINT


def info_main(argv):
    parser = argparse.ArgumentParser(prog="python -m tfm_kernels info", description=INFO_HELP)
    parser.parse_args(argv)
    import torch

    import tfm_kernels

    info = {"tfm_kernels": tfm_kernels.__version__, "torch": torch.__version__, "build": tfm_kernels.build_info(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    print(json.dumps(info, indent=2))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m tfm_kernels")
    parser.add_argument("command", choices=[*COMMANDS, "info"],
                        help="; ".join([*(f"{k}: {v[2]}" for k, v in COMMANDS.items()), f"info: {INFO_HELP}"]))
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "info":
        return info_main(argv[1:])
    module, function, _ = COMMANDS[args.command]
    try:
        return getattr(importlib.import_module(module), function)(argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT, not a traceback
        print(f"python -m tfm_kernels {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
