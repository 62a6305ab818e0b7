"""`lora-maml <command> [args]`: a registry of the programs in ``recipes/``.

Each command is a recipe module whose ``main(argv) -> int`` owns its argument parser
(``build_parser()``), so ``lora-maml train --config X`` and ``python recipes/fomaml_math.py --config X``
are the same program. This module only dispatches and reports user errors (:func:`lora_maml.errors.run_main`).
"""

from __future__ import annotations

import importlib
import sys

from lora_maml.errors import DEBUG_ENV, run_main

# command -> (recipe module, one line of help)
COMMANDS = {
    "prepare": ("recipes.prepare_math_data", "split MATH (or the synthetic suite) into meta-train / few-shot-eval tasks"),
    "tiny-model": ("recipes.build_tiny_model", "build a tiny random-init Qwen3 + tokenizer for CPU runs and tests"),
    "train": ("recipes.fomaml_math", "meta-train with FOMAML / MAML / Reptile (recipes/fomaml_math.py)"),
    "sft": ("recipes.sft_math", "the multi-task LoRA SFT baseline (recipes/sft_math.py)"),
    "eval": ("recipes.evaluate_few_shot", "few-shot adaptation: adapt on n shots, grade generated answers, compare"),
    "merge": ("recipes.merge_adapter", "merge a trained adapter into its base and save a verified HF model for vLLM"),
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
