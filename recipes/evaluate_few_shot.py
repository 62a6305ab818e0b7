#!/usr/bin/env python
"""Few-shot evaluation of one model or a comparison of several on identical episodes.

    python recipes/evaluate_few_shot.py --compare base=Qwen/Qwen3-4B-Instruct-2507 \
        sft=outputs/sft_qwen3_4b_math fomaml=outputs/fomaml_qwen3_4b_math \
        --data-dir ./data/math_meta --n-shots 0 5 10 25 50 --seeds 3 --max-test-per-task 100 \
        --metrics-jsonl outputs/fomaml_qwen3_4b_math outputs/sft_qwen3_4b_math --output-dir results/

Same options as `lora-maml eval`; see `--help` and `lora_maml.eval.few_shot`.
"""

import sys

from lora_maml.errors import run_main

from lora_maml.eval.few_shot import main

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
