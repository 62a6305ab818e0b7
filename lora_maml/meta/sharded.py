"""Fast weights on FSDP2 shards: full-parameter FOMAML with every weight sharded across processes.

With ``meta.adapter=full`` and ``model.fsdp_config.enabled=true`` every parameter of the model is an
fp32 FSDP2 shard (a DTensor; ``lora_maml.distributed.shard_model``); forwards all-gather one
decoder layer at a time in ``model.dtype`` and backwards reduce-scatter fp32 gradients
(``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``). Every forward is then a
collective, so all processes work on ONE task at a time, each on its share of that task's support and
query examples, and the tasks of a meta-batch follow one another.

Why in place: the inner loop needs the loss and gradient at φ ≠ θ. ``functional_call`` would swap
whole tensors for FSDP's sharded parameters, which its all-gather does not read, so fast weights would
need a gathered model-sized copy per inner step. Instead the inner loop writes φ into the shards
themselves: at the start of a task θ's shards are copied aside (one fp32 copy of this process's
shards), each inner step subtracts α·g from the shards in place, the query gradient is taken at φ_K
with the module's ordinary forward and backward, and θ is copied back, bit for bit, when the task
ends (also on an exception). Memory per process: the shards, their saved copy and one gradient, all
1/world of the model, plus one gathered layer in ``model.dtype``. The first-order inner loop is the
same code as the functional one (``lora_maml.meta.algorithms.inner_loop`` updates fast weights in
place either way); MAML (a graph through the inner loop) and Meta-SGD are not available here.

Losses are token means over the task's whole batch, whichever process holds which examples: each
process scales its token-mean by (its label tokens / all processes' label tokens), so that the sum
over processes is the global token mean; FSDP averages the reduce-scatter over the processes, so the
backward runs on world_size × that. The gradient therefore does not depend on the number of processes
(nor on how the examples are split, duplicated copies included: periodic evaluation gives every
process the same batch).

No gathered copy outlives a call: every call (:meth:`ShardedLoss.loss_and_grads`, :meth:`ShardedLoss.loss`)
reshards every FSDP unit before its first forward and after its last. FSDP2 frees a unit's gathered
parameters after its forward only if the unit reshards after forward, and otherwise after the backward;
a unit that does not (``model.fsdp_config.reshard_after_forward=false``; the root under FSDP2's default,
``null``; the root whatever the setting in torch 2.7) stays gathered after a forward without backward
(the diagnostics' no-grad losses, periodic evaluation), and its next ``unshard()`` is a no-op. The shards
written since (an inner step, θ restored at the end of a task, an outer step) would then not be read:
the next task's first inner gradient would be taken at the previous task's φ_K.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from lora_maml.distributed import all_reduce_sum
from lora_maml.loss import causal_lm_loss_tensors, label_token_count
from lora_maml.meta.fast_weights import Batches


class ShardedLoss:
    """The causal-LM loss of an FSDP2-sharded ``model`` at fast weights written into its shards.

    Same interface as :class:`lora_maml.meta.fast_weights.FunctionalLoss`: ``weights`` are this
    process's shards (plain tensors), and the weights passed to :meth:`loss_and_grads` / :meth:`loss`
    must be the ones the module holds now (θ, or φ inside :meth:`fast_weights`).
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]):
        self.model = model
        self.names = list(params)
        self._params = list(params.values())
        not_sharded = [n for n, p in params.items() if type(p).__name__ != "DTensor"]
        if not_sharded:
            raise ValueError(f"ShardedLoss needs FSDP2-sharded parameters; {not_sharded[:3]} are not (fully_shard first)")
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._saved: list[Tensor] | None = None
        self._units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def weights(self) -> list[Tensor]:
        """This process's shards of the parameters (views: writing them writes the model)."""
        return [p.detach().to_local() for p in self._params]

    @contextlib.contextmanager
    def fast_weights(self, theta: Sequence[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """``(θ, φ_0)``: θ's shards are saved aside, φ_0 IS the model's shards (updated in place by the
        inner loop), and θ is copied back on exit."""
        shards = self.weights()
        self._check(theta)
        if self._saved is None:  # one copy of this process's shards, kept for the whole run
            self._saved = [t.clone() for t in shards]
        else:
            torch._foreach_copy_(self._saved, shards)
        try:
            yield self._saved, shards
        finally:
            with torch.no_grad():
                torch._foreach_copy_(shards, self._saved)

    def loss_and_grads(
        self, weights: Sequence[Tensor], batch: Batches, wrt: Sequence[Tensor] | None = None, create_graph: bool = False
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Global token-mean loss over every process's share of ``batch``, the global label-token count
        and this process's shards of the gradient (fp32, summed over processes)."""
        if create_graph:
            raise ValueError("no second-order gradients on FSDP shards (meta.algorithm=maml)")
        if wrt is not None and [t.data_ptr() for t in wrt] != [t.data_ptr() for t in weights]:
            raise ValueError("ShardedLoss: gradients are taken w.r.t. the weights the module holds, nothing else")
        return self._run(weights, batch, grads=True)

    def loss(self, weights: Sequence[Tensor], batch: Batches) -> tuple[Tensor, Tensor]:
        """Global token-mean loss and label-token count, no gradient."""
        with torch.no_grad():
            return self._run(weights, batch, grads=False)[:2]

    def _check(self, weights: Sequence[Tensor]) -> None:
        held = [p.detach().to_local().data_ptr() for p in self._params]
        if len(weights) != len(held) or any(w.data_ptr() != h for w, h in zip(weights, held)):
            raise ValueError("ShardedLoss: the weights must be the shards the model holds (fn.weights() or fast_weights' φ)")

    @contextlib.contextmanager
    def _gathered_afresh(self) -> Iterator[None]:
        """Forwards inside all-gather the shards as they are now, and leave nothing gathered (module docstring)."""
        for unit in self._units:  # FSDPModule.reshard is not recursive; a no-op on a sharded unit
            unit.reshard()
        try:
            yield
        finally:
            for unit in self._units:
                unit.reshard()

    def _run(self, weights, batch, grads: bool):
        self._check(weights)
        micro = [batch] if isinstance(batch, dict) else list(batch)
        if not micro:
            raise ValueError("an empty list of micro-batches")
        total = all_reduce_sum(torch.stack([label_token_count(b) for b in micro]).sum())
        loss = None
        with self._gathered_afresh():
            for b in micro:
                part_loss, n_tokens = causal_lm_loss_tensors(self.model, b)
                part = part_loss * (n_tokens.to(part_loss.dtype) / total.clamp(min=1).to(part_loss.dtype))
                if grads:  # FSDP2 divides the reduce-scatter by the world size: undo it for the sum
                    (part * self._world).backward()
                part = part.detach()
                loss = part if loss is None else loss + part
        loss = all_reduce_sum(loss)  # the token-mean NLL is fp32 (fp64 on an fp64 model) whatever model.dtype
        if not grads:
            return loss, total, ()
        out = []
        for p in self._params:
            g = p.grad
            out.append(torch.zeros_like(p.detach().to_local()) if g is None else g.to_local())
            p.grad = None
        return loss, total, tuple(out)
