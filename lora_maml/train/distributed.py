"""Task parallelism: which process runs which task, one flat all-reduce, FSDP2 for the frozen base.

Meta-learning is parallel over tasks, not over examples: each process runs whole inner loops of its
tasks with no communication, and the meta-gradient is summed once per meta-step. DDP is not used:
it averages the gradients of ``.backward()`` on module parameters, while the meta-gradient lives on
fast weights and is formed by hand.

The launcher (``accelerate launch`` or ``torchrun``) sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
``python`` run is one process. We read them with torch.distributed directly rather than through
``accelerate.PartialState``, which with accelerate 1.15 reports one process on a CPU-only machine
even when two were launched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group set up by the launcher (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank=rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items this process runs: round-robin, so the global list (and result) is the same for any world size."""
    return list(items[rank::world_size])


def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    """Sum one flat buffer over all processes, in place (a no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat


def all_gather_objects(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (metrics and RNG states; small Python objects only)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_frozen_base(
    model: nn.Module, replicated: Sequence[nn.Parameter], *, cpu_offload: bool, reshard_after_forward: bool
) -> nn.Module:
    """Shard the frozen base with FSDP2, one unit per decoder layer plus the root.

    ``replicated`` (the LoRA weights) are left out of the shards: every process keeps a full copy, so
    the inner loop's fast weights are plain tensors and the meta-gradient all-reduce stays one buffer.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    ignored = set(replicated)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"FSDP: found no *DecoderLayer modules to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, offload_policy=offload, ignored_params=ignored)
    fully_shard(model, reshard_after_forward=reshard_after_forward, offload_policy=offload, ignored_params=ignored)
    return model
