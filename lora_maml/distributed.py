"""Task parallelism: which process runs which task, one flat all-reduce, FSDP2 sharding.

Meta-learning is parallel over tasks, not over examples: each process runs whole inner loops of its
tasks with no communication, and the meta-gradient is summed once per meta-step. DDP is not used:
it averages the gradients of ``.backward()`` on module parameters, while the meta-gradient lives on
fast weights and is formed by hand. (Full-parameter FOMAML under FSDP2 is the exception: there all
processes run one task at a time, see ``lora_maml.meta.sharded``.)

The launcher (``accelerate launch`` or ``torchrun``) sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
``python`` run is one process. We read them with torch.distributed directly rather than through
``accelerate.PartialState``, which with accelerate 1.15 reports one process on a CPU-only machine
even when two were launched.
"""

from __future__ import annotations

import math
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


def is_multiprocess() -> bool:
    """True inside a process group of more than one process (the collectives below are no-ops otherwise)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items this process runs: round-robin, so the global list (and result) is the same for any world size."""
    return list(items[rank::world_size])


def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    """Sum one flat buffer over all processes, in place (a no-op for one process)."""
    if is_multiprocess():
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat


def flat_buffer(
    shapes: Sequence[torch.Size], n_sums: int, *, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A zeroed buffer laid out [tensors of ``shapes`` | ``n_sums`` scalars], with views of the tensors
    and of the scalars. A step writes what it sums across processes (gradients, loss and token sums)
    into the views, then ONE :func:`all_reduce_sum` of the buffer sums all of it: one collective per
    step whatever the number of tensors (the meta-gradient of ``lora_maml.meta.algorithms``, the SFT step)."""
    numels = [math.prod(shape) for shape in shapes]
    n = sum(numels)
    flat = torch.zeros(n + n_sums, dtype=dtype, device=device)
    return flat, [v.view(shape) for v, shape in zip(flat[:n].split(numels), shapes)], flat[n:]


def all_gather_objects(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order (metrics and RNG states; small Python objects only)."""
    if not is_multiprocess():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    if not is_multiprocess():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_multiprocess():
        dist.barrier()


def shard_model(
    model: nn.Module,
    *,
    replicated: Sequence[nn.Parameter] = (),
    compute_dtype: torch.dtype | None = None,
    cpu_offload: bool,
    reshard_after_forward: bool | None,
) -> nn.Module:
    """Shard ``model`` with FSDP2, one unit per decoder layer plus the root.

    ``replicated`` (the LoRA weights) are left out of the shards: every process keeps a full copy, so
    the inner loop's fast weights are plain tensors and the meta-gradient all-reduce stays one buffer.
    ``compute_dtype`` (full mode: fp32 master shards, ``model.dtype`` compute): the all-gather casts the
    shards to it and gradients are reduce-scattered in the shards' dtype (fp32), FSDP2's
    ``MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=float32)``. ``reshard_after_forward``
    None leaves FSDP2's default: every unit but the root reshards after forward.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    ignored = set(replicated)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    mixed = MixedPrecisionPolicy()
    master = next(p for p in model.parameters() if p not in ignored).dtype
    if compute_dtype is not None and compute_dtype != master:
        mixed = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=master)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"FSDP: found no *DecoderLayer modules to shard in {type(model).__name__}")
    kwargs = dict(offload_policy=offload, mp_policy=mixed, ignored_params=ignored)
    if reshard_after_forward is not None:  # torch 2.7's fully_shard refuses None (its default is True)
        kwargs["reshard_after_forward"] = reshard_after_forward
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on every process (a collective for an FSDP2 shard), on CPU."""
    return (t.full_tensor() if type(t).__name__ == "DTensor" else t).detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of ``full`` laid out as ``like`` (a DTensor shard; else ``full`` itself), in
    ``like``'s dtype and device. Every process holds ``full``: no communication."""
    full = full.to(dtype=like.dtype, device=like.device)
    if type(like).__name__ != "DTensor":
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def consolidated_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with whole tensors on CPU (collective for sharded parameters): the
    layout a 1-process run saves, one tensor gathered at a time."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Inverse of :func:`consolidated_optimizer_state`: the per-parameter tensors of a consolidated
    ``state`` cut to this process's shards, ready for ``optimizer.load_state_dict``."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {
        i: {k: shard_like(v, params[int(i)]) if torch.is_tensor(v) and v.shape == params[int(i)].shape else v
            for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return out
