"""`lora-maml <command> [args]`: one entry point for the recipes and tools.

Each command is a ``main(argv) -> int`` that owns its own argument parser, so
``lora-maml train --config X`` and ``python recipes/fomaml_math.py --config X`` are the same program.
"""

from __future__ import annotations

import importlib
import sys

from lora_maml.errors import DEBUG_ENV, run_main

COMMANDS = {
    "prepare": ("lora_maml.data.prepare", "split MATH (or the synthetic suite) into meta-train / few-shot-eval tasks"),
    "tiny-model": ("lora_maml.tiny_model", "build a tiny random-init Qwen3 + tokenizer for CPU runs and tests"),
    "train": ("recipes.fomaml_math", "meta-train with FOMAML / MAML / Reptile (recipes/fomaml_math.py)"),
    "sft": ("recipes.sft_math", "the multi-task LoRA SFT baseline (recipes/sft_math.py)"),
    "eval": ("lora_maml.eval.few_shot", "few-shot adaptation: adapt on n shots, grade generated answers, compare"),
    "merge": ("lora_maml.export", "merge a trained adapter into its base and save a verified HF model for vLLM"),
    "experiment": ("recipes.meta_vs_sft", "meta-learning vs SFT from one base: train, evaluate on one plan, compare"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: lora-maml <command> [args] [--debug]  (lora-maml <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", f"Errors print one 'error:' line; --debug (or {DEBUG_ENV}=1) prints their traceback too."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lora-maml: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
