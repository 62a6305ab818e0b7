#!/usr/bin/env python
"""Build a tiny random-init Qwen3 checkpoint and a BPE tokenizer trained on MATH-style texts, for CPU runs and tests.

    python recipes/build_tiny_model.py --output-dir ./tiny_qwen3 --data-dir ./data/synthetic
    lora-maml tiny-model --output-dir ./tiny_qwen3 --synthetic-per-task 50 --hidden-size 32

The tokenizer learns the texts of a prepared data directory (``--data-dir``) or of the synthetic suite;
the checkpoint is laid out like Qwen3-4B-Instruct-2507 (:mod:`lora_maml.tiny_model`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lora_maml.errors import reworded, run_main
from lora_maml.tiny_model import build_tiny_model, texts_from_prepared, texts_from_synthetic

DEFAULT_SYNTHETIC_PER_TASK = 50

# The library's errors name its arguments; this command has always called them by its options.
WORDING = {
    "data_dir": "--data-dir",
    "n_per_task": "--synthetic-per-task",
    "overwrite=True": "overwrite=True / --overwrite",
    **{size: "--" + size.replace("_", "-") for size in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "max_position_embeddings")},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-maml tiny-model",
        description="Build a tiny random-init Qwen3 checkpoint and a BPE tokenizer trained on MATH-style texts.",
    )
    parser.add_argument("--output-dir", required=True, help="directory to write the checkpoint to")
    texts = parser.add_mutually_exclusive_group()
    texts.add_argument("--data-dir", help="prepared data dir (lora-maml prepare) whose texts train the tokenizer")
    texts.add_argument(
        "--synthetic-per-task",
        type=int,
        default=None,
        metavar="N",
        help=f"train the tokenizer on N synthetic problems per task (default when --data-dir is not given: "
        f"{DEFAULT_SYNTHETIC_PER_TASK})",
    )
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-hidden-layers", type=int, default=2)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-key-value-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--max-position-embeddings", type=int, default=1024)
    parser.add_argument(
        "--untied-embeddings", action="store_true", help="separate lm_head (default: tied, as Qwen3-4B)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the synthetic texts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with reworded(WORDING):
        if args.data_dir is not None:
            texts = texts_from_prepared(args.data_dir)
        else:
            n = DEFAULT_SYNTHETIC_PER_TASK if args.synthetic_per_task is None else args.synthetic_per_task
            texts = texts_from_synthetic(n, args.seed)
        out = build_tiny_model(
            args.output_dir,
            texts,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            num_key_value_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            intermediate_size=args.intermediate_size,
            max_position_embeddings=args.max_position_embeddings,
            tie_word_embeddings=not args.untied_embeddings,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    print(f"tiny model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
