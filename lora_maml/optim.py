"""Outer optimiser and learning-rate schedule (shared by meta-training and the SFT baseline)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lora_maml.config import OptimConfig
from lora_maml.distributed import is_multiprocess


def build_optimizer(
    params: Iterable[Tensor] | dict[str, Tensor], lr: float, optim_cfg: OptimConfig,
    *, extra_groups: Sequence[dict] = (),
) -> torch.optim.AdamW:
    """torch AdamW over ``params`` (a dict's values are used) with the config's decay, betas, eps.
    ``extra_groups``: further parameter groups with their own settings (e.g. Meta-SGD's log inner
    learning rates: their own lr, no weight decay); the LR schedule scales every group alike."""
    tensors = list(params.values()) if isinstance(params, dict) else list(params)
    if not tensors:
        raise ValueError("build_optimizer: no parameters to optimise")
    frozen = sum(not p.requires_grad for p in tensors)
    if frozen:
        raise ValueError(f"build_optimizer: {frozen} of {len(tensors)} parameters have requires_grad=False")
    return torch.optim.AdamW(
        [{"params": tensors}, *extra_groups], lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int):
    """Cosine (to 0) or constant schedule after a linear warm-up of ``ratio * total_steps`` steps."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = int(optim_cfg.lr_warmup_steps_ratio * total_steps)
    if optim_cfg.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    if optim_cfg.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    raise ValueError(f"optim.lr_scheduler: expected 'cosine' or 'constant', got {optim_cfg.lr_scheduler!r}")


def apply_gradients(
    params: list[Tensor], optimizer: torch.optim.Optimizer, scheduler, clip_grad: float,
    *, unclipped: Sequence[Tensor] = (),
) -> dict[str, float]:
    """Clip the ``.grad`` of ``params`` to ``clip_grad``, step the optimizer and the schedule.

    ``unclipped`` tensors (e.g. Meta-SGD's log inner learning rates, in their own parameter group)
    are stepped with their gradient as is. A non-finite gradient norm (of either) skips both steps
    (``skipped_step`` = 1), so NaNs never reach the weights or Adam's moments. A finite gradient whose
    update overflows a weight to inf / NaN (e.g. a huge learning rate) is rolled back the same way: the
    weights and their optimizer state are restored from a copy taken before the step (one extra copy of
    the trained tensors and their Adam moments while the step runs). Returns ``grad_norm`` (of
    ``params``, before clipping), ``lr`` (the one used) and ``skipped_step``; the caller prefixes them
    (``meta/``, ``sft/``).
    """
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad))
    lr = optimizer.param_groups[0]["lr"]
    finite = math.isfinite(norm) and all(bool(t.grad.isfinite().all()) for t in unclipped)
    if finite:
        tensors = [*params, *unclipped]
        before = [(t.detach().clone(), _clone_state(optimizer.state.get(t, {}))) for t in tensors]
        optimizer.step()
        finite = _all_finite(tensors)
        if finite:
            scheduler.step()
        else:
            with torch.no_grad():
                for t, (value, state) in zip(tensors, before):
                    t.copy_(value)
                    if state:
                        optimizer.state[t] = state
                    else:
                        optimizer.state.pop(t, None)
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm, "lr": lr, "skipped_step": float(not finite)}


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite, decided together by all processes (the same on every process
    even when each holds only a shard of the weights, e.g. FSDP DTensors), so they roll back together."""
    local = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in tensors]
    flag = torch.stack([t.isfinite().all() for t in local]).all().to(torch.int32).reshape(1)  # MIN: a vote
    if is_multiprocess():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _clone_state(state: dict) -> dict:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
