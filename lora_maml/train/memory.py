"""Per-process memory plan of full-parameter FOMAML (``meta.adapter=full``), logged at start-up.

An estimate from the architecture and the config, not a measurement: what each process holds at the
peak of a meta-step (the backward of a query batch). With ``model.fsdp_config.enabled`` every
model-sized term is 1/world of the model (``lora_maml.meta.sharded``), and a process's batch is its
share of the examples (packed: up to ``data.max_length`` tokens per example):

* master weights, AdamW's two moments, the meta-gradient, the saved θ (FSDP) or the fast-weight copy
  φ (1 process), one step's gradient: each one fp32 copy (fp64 with ``model.dtype=fp64``);
* FSDP: the root unit (embeddings, final norm, LM head) gathered in ``model.dtype`` for the whole
  forward and backward, two decoder layers gathered (current + prefetched), and the unsharded gradient
  of the largest unit in ``model.dtype`` plus its fp32 reduce-scatter input. 1 process: every weight
  cast to ``model.dtype`` for the forward;
* activations: with activation checkpointing each layer's input plus one layer's recomputed
  activations (attention by a fused kernel: no T×T scores), else every layer's;
* the logits in ``model.dtype``, their fp32 copy for the loss and its gradient.

Not counted: the CUDA context and allocator fragmentation (a few GB), communication buffers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_maml.config import Config
from lora_maml.models import torch_dtype

GiB = 2**30


def full_mode_estimate(model: nn.Module, cfg: Config, world_size: int) -> dict[str, int]:
    """Bytes per process, by item, for ``model`` (real, FSDP-wrapped or on the meta device) under ``cfg``."""
    sharded = cfg.model.fsdp_config.enabled
    share = world_size if sharded else 1
    compute = torch_dtype(cfg.model.dtype).itemsize
    master = max(compute, 4)
    n = sum(p.numel() for p in model.parameters())  # a tied embedding counts once
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    layer = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
    root = n - sum(sum(p.numel() for p in m.parameters()) for m in layers)
    shard = math.ceil(n / share) * master

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    meta = cfg.meta
    tokens = math.ceil(max(meta.inner_batch_size, meta.query_batch_size) / share) * cfg.data.max_length
    one_layer = tokens * (4 * c.hidden_size + 2 * q + 2 * kv + 3 * c.intermediate_size) * compute
    if cfg.model.enable_gradient_checkpointing:
        activations = c.num_hidden_layers * tokens * c.hidden_size * compute + one_layer
    else:
        activations = c.num_hidden_layers * one_layer
    plan = {
        "master weights": shard,
        "AdamW moments (2)": 2 * shard,
        "meta-gradient": shard,
        ("saved θ" if sharded else "fast weights φ"): shard,
        "gradient of one step": shard,
    }
    if sharded:
        plan[f"gathered root + 2 layers ({cfg.model.dtype})"] = (root + 2 * layer) * compute
        plan["unsharded gradient of one unit"] = max(root, layer) * (compute + master)
    else:
        plan[f"weights cast to {cfg.model.dtype}"] = n * compute if compute != master else 0
    plan[f"activations ({tokens} tokens)"] = activations
    plan["logits, fp32 loss copy and gradient"] = tokens * c.vocab_size * (compute + 8)
    return plan


def describe(plan: dict[str, int], world_size: int, sharded: bool) -> str:
    """One log line: the total and every item, in GiB (MiB below 1 GiB in total)."""
    total = sum(plan.values())
    unit, size = ("GiB", GiB) if total >= GiB else ("MiB", 2**20)
    items = ", ".join(f"{k} {v / size:.2f}" for k, v in plan.items())
    where = f"{world_size} processes, FSDP-sharded" if sharded else "1 process, unsharded"
    return f"memory estimate per process ({where}): {total / size:.1f} {unit} = {items} ({unit})"


def free_device_memory(device: torch.device) -> str | None:
    """'free X of Y GiB' of a CUDA device, None elsewhere."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return f"GPU {device}: {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB"
