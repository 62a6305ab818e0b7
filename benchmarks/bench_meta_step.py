"""Benchmark: what does the meta-learning machinery cost on top of plain forward/backward passes?

Measured side by side on one small random Qwen3 (medians after warm-up):
  (i)   one functional inner step (fast weights + gradient + SGD update)  ÷  one plain peft
        forward+backward (``loss.backward()`` on the module's own LoRA parameters), same batch;
        goal <= 1.05
  (ii)  one whole meta-step (inner loops, query gradients, flat-buffer reduction, outer AdamW step)
        ÷ ((K+1) × tasks × plain forward+backward); goal <= 1.10, with and without the
        pre-adaptation query loss (one extra no-grad forward per task: expect ~+1/(3(K+1)))
  (iii) peak memory (and time) of a lora, a full and a full FSDP2 meta-step (``full-fsdp``: every weight
        an fp32 FSDP2 shard of a 1-process group, compute in --dtype, ``lora_maml.meta.sharded``),
        each in a fresh process. CUDA:
        torch.cuda.max_memory_allocated minus the allocation before the step. CPU: peak RSS
        (getrusage ru_maxrss) minus the RSS before the step — an upper bound that includes
        allocator slack, not an exact tensor count.

    python benchmarks/bench_meta_step.py                      # CPU, fp32, small
    python benchmarks/bench_meta_step.py --device cuda --dtype bf16 --seq 1024 --batch 8
    python benchmarks/bench_meta_step.py --hidden 32 --layers 1 --vocab 128 --seq 16 --repeats 1   # seconds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time

import psutil
import torch

from lora_maml.atomic import write_text_atomic
from lora_maml.config import LoraConfig, MetaConfig, OptimConfig
from lora_maml.loss import causal_lm_loss_tensors
from lora_maml.meta.algorithms import MetaLearner, TaskBatch, inner_loop
from lora_maml.meta.sharded import ShardedLoss
from lora_maml.models import DTYPES, add_lora, adapted_parameters, enable_gradient_checkpointing
from lora_maml.optim import build_optimizer, build_scheduler
from lora_maml.distributed import shard_model

MEMORY_ROWS = ("lora", "full", "full-fsdp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tasks", type=int, default=2, help="tasks per meta-step")
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9, help="measured rounds")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def build(args, adapter: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=max(args.seq, 64),
        attn_implementation=args.attn, use_cache=False,
    )
    model = Qwen3ForCausalLM(cfg).to(device=args.device, dtype=DTYPES[args.dtype])
    if not args.no_checkpointing:
        enable_gradient_checkpointing(model)
    if adapter == "lora":
        model.requires_grad_(False)
        model = add_lora(model, LoraConfig(r=args.lora_r, alpha=2 * args.lora_r))
    if adapter == "full-fsdp":  # fp32 master shards; FSDP2's all-gather casts to --dtype
        model.to(torch.promote_types(DTYPES[args.dtype], torch.float32))
        shard_model(model, compute_dtype=DTYPES[args.dtype], cpu_offload=False, reshard_after_forward=True)
    model.train()
    return model, adapted_parameters(model, "lora" if adapter == "lora" else "full")


def make_tasks(args):
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100  # a prompt
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {k: v.to(args.device) for k, v in b.items()}

    return [TaskBatch(f"task{i}", [batch() for _ in range(args.inner_steps)], batch()) for i in range(args.tasks)]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def meta_setup(model, params, args, algorithm="fomaml", fn=None):
    meta = MetaConfig(algorithm=algorithm, inner_optimizer="sgd", inner_lr=1e-4, num_inner_steps=args.inner_steps,
                      meta_batch_size=args.tasks, outer_lr=1e-5)
    optim_cfg = OptimConfig(lr_scheduler="constant")
    learner = MetaLearner(model, params, meta, fn=fn)
    optimizer = build_optimizer(params, meta.outer_lr, optim_cfg)
    return learner, optimizer, build_scheduler(optimizer, optim_cfg, 10**6), optim_cfg.clip_grad


def timings(args) -> list[dict[str, float]]:
    model, params = build(args, "lora")
    tasks = make_tasks(args)
    batch = tasks[0].support[0]
    learner, optimizer, scheduler, clip = meta_setup(model, params, args)

    def plain():
        loss, _ = causal_lm_loss_tensors(model, batch)
        loss.backward()
        for p in params.values():
            p.grad = None

    lrs = [learner.cfg.inner_lr] * len(params)

    def functional_step():  # φ = a copy of θ, one SGD step on it in place
        with learner.fn.fast_weights(learner.fn.weights()) as (_, phi):
            inner_loop(learner.fn, phi, [batch], lrs, 1)

    def meta_step(pre):
        return lambda: learner.step(tasks, optimizer, scheduler, clip, diagnostics=pre)

    # One call of each per round, rounds repeated: drifting machine load (shared CPUs, clocks)
    # hits all measurements alike; ratios are taken per round, then the median over rounds.
    calls = {"plain": plain, "inner": functional_step, "meta": meta_step(False), "meta_pre": meta_step(True)}
    rounds = []
    for r in range(args.warmup + args.repeats):
        times = {name: seconds(fn, args.device) for name, fn in calls.items()}
        if r >= args.warmup:
            rounds.append(times)
    return rounds


def _memory_worker(args, adapter, queue):
    """Peak memory above what is held before a (second) meta-step, and that step's seconds."""
    fsdp = adapter == "full-fsdp"
    if fsdp:  # a 1-process group: FSDP2 needs one
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", rank=0, world_size=1)
    try:
        model, params = build(args, adapter)
        tasks = make_tasks(args)
        learner, optimizer, scheduler, clip = meta_setup(model, params, args, fn=ShardedLoss(model, params) if fsdp else None)
        learner.step(tasks, optimizer, scheduler, clip)  # optimizer state and buffers exist from here on
        step = lambda: learner.step(tasks, optimizer, scheduler, clip)  # noqa: E731
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            took = seconds(step, args.device)
            queue.put((before, torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated", took))
        else:
            before = psutil.Process().memory_info().rss
            took = seconds(step, args.device)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            queue.put((before, peak - before, "cpu peak RSS (ru_maxrss) - RSS before", took))
    finally:
        if fsdp:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory(args, adapter):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(args, adapter, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(True)
    print(
        f"device={args.device} dtype={args.dtype} hidden={args.hidden} layers={args.layers} seq={args.seq} "
        f"batch={args.batch} tasks={args.tasks} K={args.inner_steps} lora_r={args.lora_r} attn={args.attn} "
        f"checkpointing={not args.no_checkpointing} threads={torch.get_num_threads()}"
    )
    rounds = timings(args)
    fb = (args.inner_steps + 1) * args.tasks
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    ratio = lambda key, n: statistics.median(r[key] / (n * r["plain"]) for r in rounds)  # noqa: E731
    rows = [
        ("plain peft forward+backward", med("plain"), None, None),
        ("functional inner step", med("inner"), ratio("inner", 1), 1.05),
        (f"meta-step, no query_loss_pre (/{fb} f+b)", med("meta"), ratio("meta", fb), 1.10),
        (f"meta-step, with query_loss_pre (/{fb} f+b)", med("meta_pre"), ratio("meta_pre", fb), None),
    ]
    print(f"\n{'measurement (median of ' + str(len(rounds)) + ' rounds)':45s} {'ms':>10s} {'ratio':>7s} {'goal':>6s}")
    for name, sec, r, goal in rows:
        text = "" if r is None else f"{r:7.3f}"
        g = "" if goal is None else f"<={goal:.2f} {'ok' if r <= goal else 'MISSED'}"
        print(f"{name:45s} {sec * 1e3:10.2f} {text:>7s} {g}")
    results = {"args": vars(args), "timings": [dict(zip(("name", "seconds", "ratio", "goal"), row)) for row in rows]}
    if not args.skip_memory:
        print()
        memory_rows = {adapter: memory(args, adapter) for adapter in MEMORY_ROWS}
        method = memory_rows["lora"][2]
        for adapter, (before, peak, _, took) in memory_rows.items():
            print(f"{adapter:9s} meta-step peak above the {before / 2**20:8.1f} MiB held before it: "
                  f"{peak / 2**20:8.1f} MiB, {took * 1e3:9.2f} ms")
        print(f"(memory: {method}; full ÷ lora = {memory_rows['full'][1] / max(memory_rows['lora'][1], 1):.2f})")
        results["memory"] = {a: {"before_bytes": b, "peak_above_bytes": p, "method": m, "seconds": t}
                             for a, (b, p, m, t) in memory_rows.items()}
    if args.out:
        write_text_atomic(args.out, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
