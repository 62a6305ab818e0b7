#!/usr/bin/env python
"""Merge a trained LoRA adapter into its base model and save a plain Hugging Face model for vLLM.

    python recipes/merge_adapter.py --model-path outputs/fomaml_qwen3_4b_math --output merged/ [--dtype bf16]
    lora-maml merge --model-path outputs/fomaml_qwen3_4b_math/maml_checkpoint_step_5000.pt --output merged/

``--model-path`` (also spelled ``--checkpoint``) takes what ``lora-maml eval --model-path`` takes: a run
checkpoint (.pt), a step_N dir, a run dir (its newest complete checkpoint), a PEFT adapter dir, or a model
dir / hub id. The merged model is verified against base + adapter logits and reloaded with
``from_pretrained`` before it is moved into ``--output`` (the checks and their tolerances:
:mod:`lora_maml.export`). Prints the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from lora_maml.errors import reworded, run_main
from lora_maml.export import UNIT_ROUNDOFF, merge_and_save
from recipes._arg_types import non_negative_float

# The library's errors name its arguments; this command has always called them by its options.
WORDING = {
    "output_dir": "--output",
    "overwrite=True": "overwrite=True / --overwrite",
    "dtype='fp32'": "--dtype fp32",
    "atol=": "--atol",
    "base=": "base= (--base)",
    "trust_remote_code=True": "--trust-remote-code",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-maml merge",
        description="Merge a trained LoRA adapter (or a full-parameter run) into a plain Hugging Face model "
        "directory for vLLM / from_pretrained, verified against base + adapter logits.",
    )
    parser.add_argument(
        "--model-path", "--checkpoint", dest="model_path", required=True,
        help="the trained run or model to merge: maml_checkpoint_step_N.pt, a step_N dir, a run dir (newest "
        "complete checkpoint), a PEFT adapter dir, or a model dir / hub id (as eval's --model-path; "
        "--checkpoint is the same option under its former name)",
    )
    parser.add_argument("--output", required=True, help="directory to write the merged model to")
    parser.add_argument(
        "--base", help="base model to merge into (default: the run's model.partial_pretrain / the adapter's base)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(UNIT_ROUNDOFF),
        help="storage dtype of the merged weights (default: the run's model.dtype / the base's dtype)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument(
        "--probe-text", action="append", dest="probe_texts", metavar="TEXT",
        help="a user message for the logit check (repeatable; default: two fixed MATH prompts)",
    )
    parser.add_argument(
        "--atol", type=non_negative_float,
        help="tolerance of the stored model vs base + adapter check (default: from --dtype; lora_maml/export.py)",
    )
    parser.add_argument("--device", help="e.g. cuda or cpu (default: cpu)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="let transformers run the Python code the base model directory ships (auto_map in its config) and "
        "copy it into the merged model; only this flag allows it, never a checkpoint's stored config",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    with reworded(WORDING):
        report = merge_and_save(
            args.model_path, args.output, base=args.base, dtype=args.dtype, probe_texts=args.probe_texts,
            atol=args.atol, device=args.device, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
            trust_remote_code=args.trust_remote_code,
        )
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
