#!/usr/bin/env python
"""Prepare MATH (or the synthetic suite, a generated family, your own records) for meta-training: per-task
support/query/test files.

    python recipes/prepare_math_data.py --source ../shared/data/MATH.tar.gz \
        --output-dir ./data/math_meta --support-ratio 0.30 --query-ratio 0.40 --seed 42 --validate
    lora-maml prepare --source synthetic --output-dir ./data/synthetic

Prints the tasks found and the split sizes; the layout written and the leakage guards are
:mod:`lora_maml.data.prepare`'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lora_maml.data.math import DEFAULT_HUB_DATASET, SPLITS
from lora_maml.data.prepare import prepare_from_source, summary_text
from lora_maml.errors import reworded, run_main

# The library's errors name its arguments; this command has always called them by its options.
WORDING = {
    "holdout_tasks": "--holdout-tasks",
    "output_dir": "--output-dir",
    "overwrite=True": "overwrite=True (--overwrite)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-maml prepare",
        description="Split MATH (or the synthetic suite) into per-subject support/query/test files.",
    )
    parser.add_argument(
        "--source",
        required=True,
        help=f"MATH directory, .tar/.tar.gz, .jsonl or .parquet file, hub id (e.g. {DEFAULT_HUB_DATASET}), "
        "'synthetic' for the generated 7-domain suite, or 'synthetic-rules[:tasks=440,unseen=40,per_task=40,"
        "digits=5,named=0]' for the family of hidden digit codes (lora_maml/data/rules.py; its unseen codes are "
        "held out), or 'records:FILE_OR_HUB_ID[,task=COL,prompt=COL,response=COL,messages=COL,answer=COL,split=NAME,"
        "holdout=A+B]' for your own named tasks (lora_maml/data/records.py; docs/data.md)",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="directory to create")
    parser.add_argument(
        "--support-ratio", type=float, default=0.30, help="share of each task for support (default 0.30)"
    )
    parser.add_argument(
        "--query-ratio", type=float, default=0.40, help="share of each task for query (default 0.40)"
    )
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (and synthetic seed); default 42")
    parser.add_argument("--source-split", choices=SPLITS, default="train", help="MATH split to read (default train)")
    parser.add_argument("--max-samples", type=int, default=None, help="cap on records per task, after shuffling")
    parser.add_argument(
        "--holdout-tasks", default="", help="comma-separated tasks kept out of meta-training (all in few_shot_eval)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    parser.add_argument("--validate", action="store_true", help="re-read and check the written files")
    parser.add_argument(
        "--synthetic-per-task", type=int, default=200, help="records per task with --source synthetic (default 200)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with reworded(WORDING):
        manifest = prepare_from_source(
            args.source,
            args.output_dir,
            seed=args.seed,
            support_ratio=args.support_ratio,
            query_ratio=args.query_ratio,
            source_split=args.source_split,
            max_samples=args.max_samples,
            holdout_tasks=[name for name in args.holdout_tasks.split(",") if name.strip()],
            synthetic_per_task=args.synthetic_per_task,
            overwrite=args.overwrite,
            validate=args.validate,
        )
    print(summary_text(manifest), end="")
    print(f"Wrote {args.output_dir}")
    if args.validate:
        print("Validation passed")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
