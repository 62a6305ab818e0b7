"""Calibrate the inner loop: how far do K inner steps on n shots move the support and test losses?

    python benchmarks/calibrate_inner_lr.py --model /path/to/SmolLM2-135M-Instruct.Q4_1.gguf \
        --grid lora:sgd:0.03,0.1,0.3,1 lora:adam:3e-4,1e-3,3e-3,1e-2 full:sgd:1e-4,1e-3,1e-2 full:adam:1e-5,1e-4

For every draw (one subject, ``--shots`` support problems, ``--test`` other problems of the subject,
all fitting ``--max-length`` tokens) and every (adapter, inner optimizer, lr) of ``--grid``, adapt a
copy of the model's weights exactly as few-shot evaluation and the meta-training inner loop do
(``lora_maml.meta.algorithms.adapt``: ``--steps`` full-batch steps on the shots) and print

* inner progress  = 1 − L(φ_K; shots) / L(θ; shots)   (does the inner loop move at all?)
* test ΔNLL       = L(φ_K; test) − L(θ; test)          (does it help on unseen problems? < 0 is better)

averaged over the draws, with the draw-to-draw spread. The rates in lora_maml.config.DEFAULT_INNER_LR
are the best test ΔNLL of this table on SmolLM2-135M-Instruct (docs/performance.md, "Inner-loop calibration").
``lora`` uses the config's default LoRA (model.lora); its B starts at 0 (peft's init), as in training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lora_maml.atomic import write_text_atomic
from lora_maml.config import ModelConfig
from lora_maml.data.math import load_math_records
from lora_maml.data.tokenize import collate, records_that_fit
from lora_maml.meta.algorithms import adapt
from lora_maml.meta.fast_weights import FunctionalLoss
from lora_maml.models import adapted_parameters, add_lora, load_base

DEFAULT_MATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "MATH.tar.gz"


def parse_grid(items: list[str]) -> list[tuple[str, str, float]]:
    """``adapter:optimizer:lr1,lr2`` → [(adapter, optimizer, lr), ...]."""
    grid = []
    for item in items:
        try:
            adapter, optimizer, rates = item.split(":")
            if adapter not in ("lora", "full") or optimizer not in ("sgd", "adam"):
                raise ValueError
            grid += [(adapter, optimizer, float(r)) for r in rates.split(",")]
        except ValueError:
            raise SystemExit(f"--grid {item!r}: expected lora|full:sgd|adam:LR[,LR...]") from None
    return grid


def model_config(path: Path) -> ModelConfig:
    """A local model directory, or a GGUF file (dequantised to fp32 on load)."""
    if path.suffix == ".gguf":
        return ModelConfig(partial_pretrain=str(path.parent), gguf_file=path.name, dtype="fp32",
                           enable_gradient_checkpointing=False)
    return ModelConfig(partial_pretrain=str(path), dtype="fp32", enable_gradient_checkpointing=False)


def draw_problems(args, tokenizer) -> list[tuple[str, list[dict], list[dict]]]:
    """(subject, shots, test) per draw: problems of the MATH train split that fit without truncation."""
    records, _ = load_math_records(args.math, split="train")
    draws = []
    for subject in args.subjects:
        _, fitting = records_that_fit([r for r in records if r["subject"] == subject], tokenizer,
                                      max_length=args.max_length)
        rng = np.random.default_rng([args.seed, len(draws)])
        for _ in range(args.draws):
            order = rng.permutation(len(fitting))
            draws.append((subject, [fitting[i] for i in order[: args.shots]],
                          [fitting[i] for i in order[args.shots : args.shots + args.test]]))
    return draws


@torch.no_grad()
def mean_nll(fn: FunctionalLoss, weights: list[torch.Tensor], examples: list[dict], pad_id: int) -> float:
    """Token-weighted mean NLL of ``examples`` at ``weights``: one micro-batch (forward) per example."""
    return float(fn.loss(weights, [collate([ex], pad_id, packed=False) for ex in examples])[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="local model directory or .gguf file")
    parser.add_argument("--math", type=Path, default=DEFAULT_MATH, help="MATH source (tar.gz, dir, jsonl, hub id)")
    parser.add_argument("--subjects", nargs="+", default=["prealgebra", "number_theory", "geometry"])
    parser.add_argument("--grid", nargs="+", required=True, help="adapter:optimizer:lr[,lr...] entries")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="inner steps (meta.num_inner_steps)")
    parser.add_argument("--draws", type=int, default=1, help="draws per subject")
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("outputs/calibrate_inner_lr.json"))
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)
    if not args.model.exists():
        raise SystemExit(f"--model {args.model}: no such file or directory")

    model_cfg = model_config(args.model)
    rows = []
    for adapter in dict.fromkeys(a for a, _, _ in grid):
        torch.manual_seed(args.seed)
        model, tokenizer = load_base(model_cfg)
        if adapter == "lora":
            model = add_lora(model, model_cfg)
        model.train()
        params = adapted_parameters(model, adapter)
        fn, names = FunctionalLoss(model, list(params)), list(params)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        draws = draw_problems(args, tokenizer)
        theta = [p.detach() for p in params.values()]
        before = [(mean_nll(fn, theta, shots, pad_id), mean_nll(fn, theta, test, pad_id)) for _, shots, test in draws]
        for _, optimizer, lr in [g for g in grid if g[0] == adapter]:
            started = time.perf_counter()
            progress, delta = [], []
            for (subject, shots, test), (shots_pre, test_pre) in zip(draws, before):
                batch = [collate(shots, pad_id, packed=False)]
                adapted = adapt(model, params, [batch], lr, args.steps, optimizer=optimizer)
                weights = [adapted[n] for n in names]
                progress.append(1 - mean_nll(fn, weights, shots, pad_id) / shots_pre)
                delta.append(mean_nll(fn, weights, test, pad_id) - test_pre)
            row = {"adapter": adapter, "optimizer": optimizer, "lr": lr, "steps": args.steps, "shots": args.shots,
                   "inner_progress": statistics.mean(progress), "test_delta_nll": statistics.mean(delta),
                   "test_delta_nll_sd": statistics.stdev(delta) if len(delta) > 1 else 0.0,
                   "per_draw": delta, "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(f"{adapter:4s} {optimizer:4s} lr={lr:<8g} inner_progress={row['inner_progress']:+.4f} "
                  f"test ΔNLL={row['test_delta_nll']:+.4f} (sd {row['test_delta_nll_sd']:.4f}, "
                  f"{len(draws)} draws, {row['seconds']} s)", flush=True)
        del model
    lines = ["| adapter | inner optimizer | inner lr | inner progress | test ΔNLL (nats/token) | sd over draws |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['adapter']} | {r['optimizer']} | {r['lr']:g} | {r['inner_progress']:+.4f} | "
              f"{r['test_delta_nll']:+.4f} | {r['test_delta_nll_sd']:.4f} |" for r in rows]
    print("\n".join(lines))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
