"""Merge a trained LoRA adapter into its base model and save a plain Hugging Face model for vLLM.

    python recipes/merge_adapter.py --checkpoint outputs/fomaml_qwen3_4b_math --output merged/ [--dtype bf16]
    lora-maml merge --checkpoint outputs/fomaml_qwen3_4b_math/maml_checkpoint_step_5000.pt --output merged/

``--checkpoint`` takes a run checkpoint (.pt), a step_N dir, a run dir (its newest complete checkpoint),
a PEFT adapter dir, or a model dir / hub id. The merged model is verified against base + adapter logits
and reloaded with ``from_pretrained`` before it is moved into ``--output`` (see lora_maml/export.py).
"""

from __future__ import annotations

import sys

from lora_maml.errors import run_main

from lora_maml.export import main

if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
