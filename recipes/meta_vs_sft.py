"""Is meta-learning worth it here? Meta-learners and SFT from one base at matched compute, one evaluation plan,
paired statistics (lora_maml/experiment.py has the phases and what each writes).

    python recipes/meta_vs_sft.py --tiny --source synthetic-rules --pretrain "synthetic-rules:named=8,per_task=400" \
        --config recipes/configs/rules_tiny.yaml --methods fomaml sft_tokens --eval-on holdout   # the README demo
    python recipes/meta_vs_sft.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --episodes 2  # MATH, a real model
"""

from __future__ import annotations

import sys

from lora_maml.experiment import main

if __name__ == "__main__":
    sys.exit(main())
