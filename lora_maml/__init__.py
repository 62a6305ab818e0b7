"""lora_maml: first-order MAML over LoRA adapters of LLMs, with the MATH subjects as tasks."""

__version__ = "0.1.0"
