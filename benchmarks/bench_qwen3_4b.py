"""Benchmark: LoRA-FOMAML meta-steps on Qwen3-4B's architecture (random bf16 weights) vs plain LoRA SFT.

Measured on one GPU, CUDA-synchronised medians over ``--repeats`` rounds after ``--warmup`` rounds,
one call of each measurement per round (drift hits all alike):

  (a) one LoRA FOMAML meta-step with the guide's settings (4 tasks, 5 inner steps, inner batch 4,
      query batch 4): ``MetaLearner.meta_gradient(diagnostics=False)`` + ``outer_step`` (AdamW),
      i.e. ``MetaLearner.step`` with its two halves timed apart, at every ``--seqs`` length;
  (b) the SFT reference on the same tokens: 4 tasks x 6 batches of 4 = 24 peft forward+backward
      passes (``loss.backward()``), then one clip + AdamW step;
  (c) with ``--full``: one full-parameter FOMAML meta-step (``meta.adapter=full``), last; an OOM is
      reported as "OOM" and never stops the table.

Tokens are fixed-length random sequences (``--seqs``), the first ``--prompt-frac`` of each masked as a
prompt, batched with ``lora_maml.data.tokenize.collate``: ``padded`` (all-ones attention mask, no
padding) or ``packed`` (one row of 4 x seq tokens, ``position_ids`` restarting per example).

Columns: tokens/s = input tokens of all forward+backward passes ÷ step time; MFU = tokens/s x
``flops_per_token(N_frozen, N_trainable, L, A, T)`` ÷ the GPU's dense bf16 peak
(``lora_maml.train.metrics``): 4 FLOPs per frozen and 6 per trainable parameter per token, plus
12·L·A·T for attention, N = every parameter counted once (the tied embedding counts as the LM head
matmul), gradient-checkpointing recomputation NOT counted (PaLM convention); peak memory =
``torch.cuda.max_memory_allocated`` over the measurement (reset before each call); 4-GPU meta-steps/h =
3600 ÷ (one task's inner loop + query gradient [the meta-gradient time ÷ tasks, x ceil(tasks ÷ GPUs)]
+ the outer step + an all-reduce of the fp32 flat buffer at ``--allreduce-gbps`` bus bandwidth),
beside the guide's 10-12 meta-steps/h; meta ÷ SFT = per-round ratio of (a) to (b), median.

    python benchmarks/bench_qwen3_4b.py --out results.json          # H100/H200, ~5 min
    python benchmarks/bench_qwen3_4b.py --full --out results.json   # + full-parameter FOMAML
    python benchmarks/bench_qwen3_4b.py --tiny                      # CPU, scaled down, seconds
    python benchmarks/bench_qwen3_4b.py --loss-chunk-size 1024 --out chunked.json  # chunked cross-entropy:
                                                                    # compare its peak GiB with the run above
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from lora_maml.atomic import write_text_atomic
from lora_maml.config import LoraConfig, MetaConfig, ModelConfig, OptimConfig
from lora_maml.data.tokenize import IGNORE_INDEX, collate
from lora_maml.loss import causal_lm_loss_tensors, label_token_count, set_loss_chunk_size
from lora_maml.meta.algorithms import MetaLearner, TaskBatch
from lora_maml.models import DTYPES, add_lora, adapted_parameters, enable_gradient_checkpointing
from lora_maml.optim import apply_gradients, build_optimizer, build_scheduler
from lora_maml.train.metrics import flops_per_token, mfu, peak_flops

# Qwen3-4B-Instruct-2507's config.json (its max_position_embeddings is 262144; only the RoPE table
# size depends on it, so the benchmark keeps it small enough for the longest --seqs).
QWEN3_4B = dict(
    vocab_size=151_936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0},
)
TINY = dict(QWEN3_4B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
GUIDE_META_STEPS_PER_HOUR = (10, 12)
PAD_ID = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="scaled-down model on CPU (hidden 64, 2 layers, vocab 512, seq 64)")
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 1024,2048; --tiny: 64)")
    p.add_argument("--attn", default="auto",
                   help="comma-separated attn implementations; auto = sdpa, plus flash_attention_2 on CUDA if importable")
    p.add_argument("--layouts", default="padded", help="comma-separated batch layouts: padded, packed")
    p.add_argument("--full", action="store_true", help="also time a full-parameter FOMAML meta-step (last; OOM tolerated)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="base dtype (default bf16; fp32 with --tiny)")
    p.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off (default on)")
    p.add_argument("--loss-chunk-size", type=int, default=None,
                   help="model.loss_chunk_size: chunked cross-entropy, N label positions per chunk "
                        "(default: full logits)")
    p.add_argument("--tasks", type=int, default=4, help="tasks per meta-step (meta.meta_batch_size)")
    p.add_argument("--inner-steps", type=int, default=5, help="meta.num_inner_steps")
    p.add_argument("--inner-batch", type=int, default=4, help="meta.inner_batch_size")
    p.add_argument("--query-batch", type=int, default=4, help="meta.query_batch_size")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--prompt-frac", type=float, default=0.2, help="share of each sequence masked as prompt")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--gpus", type=int, default=4, help="GPUs of the task-parallel projection")
    p.add_argument("--allreduce-gbps", type=float, default=100.0,
                   help="assumed all-reduce bus bandwidth (GB/s) for the projection; NVLink H100 nodes reach more")
    p.add_argument("--budget-s", type=float, default=None,
                   help="soft time limit: no config starts, and no round beyond the first timed one runs, after "
                        "this many seconds (default 270 on CUDA, none with --tiny)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1 with --tiny: on a shared CPU more threads than free "
                        "cores make every op spin-wait; torch's default otherwise)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON (rewritten after every config)")
    p.add_argument("--memory-plan", type=Path, default=None, metavar="CONFIG",
                   help="only print the per-process memory estimate of full-parameter FOMAML under the recipe config "
                        "CONFIG for this architecture, FSDP on --gpus processes and unsharded on 1 (no GPU needed)")
    args = p.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available() and args.memory_plan is None:
        p.error("no CUDA device: run on a GPU, or pass --tiny for the CPU end-to-end check")
    args.dtype = args.dtype or ("fp32" if args.tiny else "bf16")
    args.arch = TINY if args.tiny else QWEN3_4B
    args.seqs = [int(s) for s in (args.seqs or ("64" if args.tiny else "1024,2048")).split(",")]
    if args.attn == "auto":
        fa2 = args.device == "cuda" and importlib.util.find_spec("flash_attn") is not None
        args.attn = ["sdpa"] + (["flash_attention_2"] if fa2 else [])
    else:
        args.attn = args.attn.split(",")
    args.layouts = args.layouts.split(",")
    if args.loss_chunk_size is not None and args.loss_chunk_size < 1:
        p.error(f"--loss-chunk-size: expected a positive number of label positions, got {args.loss_chunk_size}")
    bad = [x for x in args.layouts if x not in ("padded", "packed")]
    if bad:
        p.error(f"--layouts: {bad} not in padded, packed")
    if args.threads is None and args.tiny:
        args.threads = 1
    if args.budget_s is None and not args.tiny:
        args.budget_s = 270.0
    return args


# -- timing: the synchronised wall-clock helpers of bench_meta_step.py --------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by file path (smoke test)
from bench_meta_step import seconds, sync  # noqa: E402


class Clock:
    def __init__(self, budget_s: float | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed > self.budget_s

    def log(self, text: str) -> None:
        print(f"[{self.elapsed:7.1f}s] {text}", flush=True)


def is_oom(err: BaseException) -> bool:
    # cuBLAS/cuDNN report a failed workspace allocation as a plain RuntimeError.
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in str(err) or "ALLOC_FAILED" in str(err))
    )


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def guarded(fn: Callable[[], object], device: str) -> tuple[str, object]:
    """``("ok", fn())``, ``("OOM", None)`` or ``("error: ...", None)``; memory is released after a failure.

    The traceback (whose frames hold the failed call's tensors) is dropped when the ``except`` block
    ends, so ``free_memory`` runs after it, not inside it.
    """
    try:
        return "ok", fn()
    except Exception as err:  # one failed config must not cost the rest of the table
        if is_oom(err):
            status = "OOM"
        else:
            traceback.print_exc()
            status = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    free_memory(device)
    return status, None


# -- model and batches ----------------------------------------------------------------------------
def build_model(args, adapter: str, attn: str):
    """Random-init Qwen3 built directly on the device in its dtype, frozen as ``load_base`` leaves it,
    checkpointed, with LoRA (``adapter=lora``) or every weight trainable (``full``)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(**args.arch, max_position_embeddings=max(args.seqs), use_cache=False)
    # Constructed under the device so the 4B weights are never materialised (or initialised) on the CPU.
    with torch.device(args.device):
        model = Qwen3ForCausalLM._from_config(config, dtype=DTYPES[args.dtype], attn_implementation=attn)
    model.requires_grad_(False)
    model.config.use_cache = False
    set_loss_chunk_size(model, args.loss_chunk_size)  # as load_base does from model.loss_chunk_size
    if not args.no_checkpointing:
        enable_gradient_checkpointing(model)
    if adapter == "lora":
        model_cfg = ModelConfig(dtype=args.dtype, attn_implementation=attn,
                                enable_gradient_checkpointing=not args.no_checkpointing,
                                lora=LoraConfig(r=args.lora_r, alpha=args.lora_alpha))
        model = add_lora(model, model_cfg)
    model.train()
    params = adapted_parameters(model, adapter)
    return model, params


def make_tasks(args, seq: int, layout: str) -> list[TaskBatch]:
    """``args.tasks`` tasks of ``inner_steps`` distinct support batches + one query batch, each example
    exactly ``seq`` random tokens with the first ``prompt_frac`` masked."""
    gen = torch.Generator().manual_seed(seq)
    prompt = int(seq * args.prompt_frac)

    def batch(size):
        examples = []
        for ids in torch.randint(0, args.arch["vocab_size"], (size, seq), generator=gen).tolist():
            examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
        return {k: v.to(args.device) for k, v in collate(examples, PAD_ID, packed=layout == "packed").items()}

    return [
        TaskBatch(f"task{t}", [batch(args.inner_batch) for _ in range(args.inner_steps)], batch(args.query_batch))
        for t in range(args.tasks)
    ]


def input_tokens(tasks: list[TaskBatch]) -> int:
    """Input tokens of every forward+backward pass of one meta-step (no padding: all are real)."""
    return sum(b["input_ids"].numel() for t in tasks for b in (*t.support, t.query))


# -- one model, several sequence lengths ------------------------------------------------------------
def measure_model(args, adapter: str, attn: str, layout: str, clock: Clock, emit) -> None:
    """Build one model and time its meta-step (and, for LoRA, the SFT reference) at every --seqs length.

    Everything this allocates is local: it is all freed when the function returns or raises.
    """
    label = f"{adapter} {attn} {layout}"
    configs = [f"{adapter}-fomaml"] + (["lora-sft"] if adapter == "lora" else [])
    optim_cfg = OptimConfig(lr_scheduler="constant")

    def setup():
        model, params = build_model(args, adapter, attn)
        meta_cfg = MetaConfig(algorithm="fomaml", adapter=adapter, inner_optimizer="sgd", inner_lr=1e-4, num_inner_steps=args.inner_steps,
                              inner_batch_size=args.inner_batch, outer_lr=3e-5, meta_batch_size=args.tasks,
                              query_batch_size=args.query_batch)
        learner = MetaLearner(model, params, meta_cfg)  # its fp32 flat buffer: 16 GB for full
        opts = [build_optimizer(params, meta_cfg.outer_lr, optim_cfg) for _ in configs]  # meta [, sft]
        return model, params, learner, [(opt, build_scheduler(opt, optim_cfg, 10**6)) for opt in opts]

    clock.log(f"{label}: building the model")
    status, built = guarded(setup, args.device)
    if status != "ok":
        for seq in args.seqs:
            for config in configs:
                emit(dict(config=config, adapter=adapter, attn=attn, layout=layout, seq=seq, status=status))
        return
    model, params, learner, schedules = built
    (meta_opt, meta_sched), (sft_opt, sft_sched) = schedules[0], (schedules + [(None, None)])[1]
    n_trainable = sum(p.numel() for p in params.values())
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    cfg = model.config
    clock.log(f"{label}: {n_frozen:,} frozen + {n_trainable:,} trained parameters")
    param_list = list(params.values())
    flat_bytes = learner._flat.numel() * learner._flat.element_size()

    for seq in args.seqs:
        base = dict(adapter=adapter, attn=attn, layout=layout, seq=seq, loss_chunk_size=args.loss_chunk_size)
        if clock.over_budget():
            clock.log(f"{label} seq={seq}: skipped (time budget {args.budget_s:.0f} s spent)")
            for config in configs:
                emit(dict(base, config=config, status="skipped (budget)"))
            continue
        status, tasks = guarded(lambda: make_tasks(args, seq, layout), args.device)
        if status != "ok":
            for config in configs:
                emit(dict(base, config=config, status=status))
            continue
        batches = [b for t in tasks for b in (*t.support, t.query)]
        tokens = input_tokens(tasks)
        label_total = sum(int(label_token_count(b)) for b in batches)

        def meta() -> dict[str, float]:
            sync(args.device)
            t0 = time.perf_counter()
            learner.meta_gradient(tasks, diagnostics=False)  # MetaLearner.step = meta_gradient + outer_step
            sync(args.device)
            t1 = time.perf_counter()
            learner.outer_step(meta_opt, meta_sched, optim_cfg.clip_grad)
            sync(args.device)
            t2 = time.perf_counter()
            return {"time": t2 - t0, "grad": t1 - t0, "outer": t2 - t1}

        def sft() -> dict[str, float]:
            def run():
                for b in batches:
                    loss, n = causal_lm_loss_tensors(model, b)
                    (loss * n / label_total).backward()
                apply_gradients(param_list, sft_opt, sft_sched, optim_cfg.clip_grad)

            return {"time": seconds(run, args.device)}

        calls = {"meta": meta} | ({"sft": sft} if adapter == "lora" else {})
        status = dict.fromkeys(calls, "ok")
        rounds: list[dict[str, dict]] = []
        peaks = dict.fromkeys(calls, 0)
        for r in range(args.warmup + args.repeats):
            if r > args.warmup and clock.over_budget():
                clock.log(f"{label} seq={seq}: stopping after {len(rounds)} timed round(s) (time budget)")
                break
            times = {}
            for name, fn in calls.items():
                if status[name] != "ok":
                    continue
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                status[name], result = guarded(fn, args.device)
                if status[name] != "ok":
                    clock.log(f"{label} seq={seq} {name}: {status[name]}")
                    continue
                if args.device == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
                times[name] = result
            phase = "warm-up" if r < args.warmup else "timed"
            clock.log(f"{label} seq={seq} round {r} ({phase}): "
                      + " ".join(f"{k}={v['time']:.3f}s" for k, v in times.items()))
            if r >= args.warmup:
                rounds.append(times)

        attn_dim = cfg.num_attention_heads * cfg.head_dim
        per_token = flops_per_token(n_frozen, n_trainable, cfg.num_hidden_layers, attn_dim, seq)
        peak = peak_flops(args.device) if args.device == "cuda" else None
        for name in calls:
            done = [r[name] for r in rounds if name in r]
            row = dict(base, config=f"{adapter}-fomaml" if name == "meta" else "lora-sft", status=status[name],
                       timed_rounds=len(done), tokens=tokens, flops_per_token=per_token,
                       n_frozen=n_frozen, n_trainable=n_trainable)
            if args.device == "cuda" and peaks[name]:
                row["peak_mem_gib"] = peaks[name] / 2**30
            if not done:
                if status[name] == "ok":
                    row["status"] = "no timed round"
                emit(row)
                continue
            step_s = statistics.median(d["time"] for d in done)
            row |= dict(step_s=step_s, tokens_per_s=tokens / step_s, mfu=mfu(tokens / step_s, per_token, peak))
            if name == "meta":
                grad_s = statistics.median(d["grad"] for d in done)
                outer_s = statistics.median(d["outer"] for d in done)
                task_s = grad_s / args.tasks
                allreduce_s = 2 * (args.gpus - 1) / args.gpus * flat_bytes / (args.allreduce_gbps * 1e9)
                step_gpus_s = task_s * math.ceil(args.tasks / args.gpus) + outer_s + allreduce_s
                row |= dict(meta_gradient_s=grad_s, outer_step_s=outer_s, per_task_s=task_s,
                            allreduce_s=allreduce_s, projected_step_s=step_gpus_s,
                            meta_steps_per_hour_1gpu=3600 / step_s,
                            meta_steps_per_hour_projected=3600 / step_gpus_s)
                both = [r for r in rounds if "meta" in r and "sft" in r]
                if both:
                    row["meta_over_sft"] = statistics.median(r["meta"]["time"] / r["sft"]["time"] for r in both)
            emit(row)
        del tasks, batches


# -- output -------------------------------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def print_table(rows: list[dict], args) -> None:
    gpus = args.gpus
    header = (f"{'config':13s} {'attn':17s} {'layout':6s} {'seq':>5s} {'step s':>8s} {'tokens/s':>9s} {'MFU':>6s} "
              f"{'peak GiB':>8s} {'steps/h 1GPU':>12s} {f'steps/h {gpus}GPU':>12s} {'guide':>6s} {'meta/SFT':>8s}  status")
    print("\n" + header)
    print("-" * len(header))
    guide = f"{GUIDE_META_STEPS_PER_HOUR[0]}-{GUIDE_META_STEPS_PER_HOUR[1]}"
    for r in rows:
        meta = r["config"].endswith("fomaml")
        print(
            f"{r['config']:13s} {r['attn']:17s} {r['layout']:6s} {r['seq']:5d} {_fmt(r.get('step_s'), '8.3f'):>8s} "
            f"{_fmt(r.get('tokens_per_s'), '9.0f'):>9s} {_fmt(r.get('mfu'), '6.1%'):>6s} "
            f"{_fmt(r.get('peak_mem_gib'), '8.1f'):>8s} {_fmt(r.get('meta_steps_per_hour_1gpu'), '12.0f'):>12s} "
            f"{_fmt(r.get('meta_steps_per_hour_projected'), '12.0f'):>12s} {guide if meta else '':>6s} "
            f"{_fmt(r.get('meta_over_sft'), '8.3f'):>8s}  {r['status']}"
        )
    print(
        "\nMFU: tokens/s x flops_per_token / peak; flops_per_token = 4 N_frozen + 6 N_trainable + 12 L A T "
        "(lora_maml.train.metrics), N = all parameters counted once (tied embedding = LM head matmul), "
        "gradient-checkpointing recomputation not counted (PaLM convention)."
    )
    print(
        f"steps/h {gpus}GPU: task parallelism, 3600 / (meta-gradient time / tasks x ceil(tasks / {gpus}) + outer "
        f"step + fp32 flat-buffer ring all-reduce at an assumed {args.allreduce_gbps:g} GB/s); excludes "
        "query_loss_pre (+1 forward per task when logging), periodic eval, checkpoints and data collation."
    )
    print("meta/SFT: meta-step time / time of the same tokens as 24 plain peft forward+backward + 1 AdamW step "
          "(median of per-round ratios).")
    chunk = args.loss_chunk_size
    print("loss: " + (f"chunked cross-entropy, {chunk} label positions per chunk (--loss-chunk-size)" if chunk
                      else "full [batch, seq, vocab] logits (--loss-chunk-size not set)"))


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=True))


def memory_plan(args) -> dict:
    """lora_maml.train.memory's estimate (logged by the recipe at start-up) for this architecture, built
    on the meta device (no memory), under the config ``args.memory_plan`` with and without FSDP."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from lora_maml.config import load_config
    from lora_maml.train.memory import GiB, describe, full_mode_estimate

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**args.arch))
    plans = {}
    for world, fsdp in ((args.gpus, True), (1, False)):
        cfg = load_config(args.memory_plan, ["meta.adapter=full", f"model.fsdp_config.enabled={str(fsdp).lower()}"])
        plan = full_mode_estimate(model, cfg, world)
        print(describe(plan, world, fsdp))
        plans["fsdp" if fsdp else "one_process"] = {"world_size": world, "total_gib": sum(plan.values()) / GiB,
                                                    "items_gib": {k: v / GiB for k, v in plan.items()}}
    return plans


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_plan is not None:
        plans = memory_plan(args)
        if args.out is not None:
            write_json(args.out, {"memory_plan": str(args.memory_plan), **plans})
        return 0
    clock = Clock(args.budget_s)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    import transformers

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    settings = dict(
        device=device_name, torch=torch.__version__, transformers=transformers.__version__, dtype=args.dtype,
        arch={k: v for k, v in args.arch.items()}, seqs=args.seqs, attn=args.attn, layouts=args.layouts,
        tasks=args.tasks, inner_steps=args.inner_steps, inner_batch=args.inner_batch, query_batch=args.query_batch,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, checkpointing=not args.no_checkpointing,
        loss_chunk_size=args.loss_chunk_size,
        prompt_frac=args.prompt_frac, warmup=args.warmup, repeats=args.repeats, gpus=args.gpus,
        allreduce_gbps=args.allreduce_gbps, peak_flops=peak_flops() if args.device == "cuda" else None,
        threads=torch.get_num_threads(),
    )
    clock.log("settings: " + json.dumps(settings))
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        clock.log("result: " + json.dumps(row))
        if args.out is not None:
            write_json(args.out, {"settings": settings, "rows": rows})

    # LoRA first (the question), then full-parameter at increasing length: the likeliest OOM comes last.
    for attn in args.attn:
        for layout in args.layouts:
            measure_model(args, "lora", attn, layout, clock, emit)
            free_memory(args.device)
    if args.full:
        measure_model(args, "full", args.attn[0], args.layouts[0], clock, emit)
        free_memory(args.device)
    print_table(rows, args)
    clock.log("done")
    failed = [r for r in rows if r["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
