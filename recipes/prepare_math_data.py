#!/usr/bin/env python
"""Prepare MATH (or the synthetic suite) for meta-training: per-subject support/query/test files.

    python recipes/prepare_math_data.py --source ../shared/data/MATH.tar.gz \
        --output-dir ./data/math_meta --support-ratio 0.30 --query-ratio 0.40 --seed 42 --validate

Same options as `lora-maml prepare`; see `--help` and `lora_maml.data.prepare`.
"""

import sys

from lora_maml.errors import run_main

from lora_maml.data.prepare import main

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
