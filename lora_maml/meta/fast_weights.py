"""Fast weights: run the model with some parameters replaced by given tensors, without touching it.

The inner loop of MAML needs the loss and its gradient at weights that are *not* the module's own
parameters. ``torch.func.functional_call`` swaps tensors in for the duration of one call. The
gradient must be taken INSIDE that call: with (non-reentrant) activation checkpointing the backward
re-runs the forward of each checkpointed layer, and if the swap has already been undone by then, the
recomputation silently uses the module's own weights and the gradient is wrong (max errors of 6e-2
to 8e-1 measured on tiny Qwen3s; pinned by tests/test_meta_gradients.py). :class:`FunctionalLoss`
therefore wraps "loss + ``torch.autograd.grad``" in one ``nn.Module.forward`` and functional-calls
that wrapper. The chunked loss (``model.loss_chunk_size``) checkpoints its logit chunks the same way.

Master weights: with ``compute_dtype`` (full mode on a bf16 model), the fast weights are fp32 and each
call casts them to ``compute_dtype`` on the way in; autograd casts their gradients back to fp32. The
inner loop's updates and the meta-gradient are therefore fp32 while forward and backward run in bf16.

The same interface (``weights``, ``fast_weights``, ``loss_and_grads``, ``loss``) is implemented on
FSDP2 shards, in place, by :class:`lora_maml.meta.sharded.ShardedLoss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lora_maml.loss import MODEL_INPUT_KEYS, causal_lm_loss_tensors, label_token_count

Batch = dict[str, Tensor]
# One batch, or micro-batches that together make one (gradient accumulation inside one step).
Batches = Batch | Sequence[Batch]


def loss_and_grads(
    model: nn.Module, batch: Batches, wrt: Sequence[Tensor], create_graph: bool = False
) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Token-mean loss over ``batch``, its label-token count and d loss / d ``wrt`` (none if empty).

    A list of micro-batches is one batch: the loss is the token-weighted mean over all of them,
    Σ_m n_m L_m / Σ_m n_m, and its gradient is accumulated micro-batch by micro-batch so that only
    one micro-batch's activations are alive at a time.
    """
    if isinstance(batch, dict):
        loss, n_tokens = causal_lm_loss_tensors(model, batch)
        # materialize_grads: a weight the loss does not reach (e.g. a LoRA on an unused layer) gets 0.
        grads = torch.autograd.grad(loss, wrt, create_graph=create_graph, materialize_grads=True) if wrt else ()
        return loss, n_tokens, grads
    if not batch:
        raise ValueError("an empty list of micro-batches")
    counts = [label_token_count(b) for b in batch]
    total = torch.stack(counts).sum()
    loss, grads = 0.0, None
    for micro in batch:
        part_loss, n_tokens = causal_lm_loss_tensors(model, micro)
        # The weight in the loss's dtype: int / int gives the default float dtype (fp32) in an fp64 model.
        part = part_loss * (n_tokens.to(part_loss.dtype) / total.clamp(min=1).to(part_loss.dtype))
        if wrt:
            part_grads = torch.autograd.grad(part, wrt, create_graph=create_graph, materialize_grads=True)
            grads = part_grads if grads is None else [g + d for g, d in zip(grads, part_grads)]
            part = part if create_graph else part.detach()
        loss = loss + part
    return loss, total.to(loss.device), tuple(grads) if wrt else ()


class _LossAndGrad(nn.Module):
    """``forward`` = :func:`loss_and_grads` of the wrapped model, so that it runs inside one
    ``functional_call`` (forward AND backward with the fast weights in place)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, batch: Batches, wrt: Sequence[Tensor], create_graph: bool
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        return loss_and_grads(self.model, batch, wrt, create_graph)


class FunctionalLoss:
    """The causal-LM loss of ``model`` as a function of the tensors standing for ``names``.

    Weights are passed as a list aligned with :attr:`names`. Tied parameters (e.g. ``lm_head.weight``
    is ``embed_tokens.weight``) are resolved once here, so a fast weight replaces every alias of its
    parameter, as ``functional_call(tie_weights=True)`` would, without walking the whole module on
    every call.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, compute_dtype: torch.dtype | None = None):
        self.model = model
        self.names = list(names)
        self.compute_dtype = compute_dtype
        self._wrapper = _LossAndGrad(model)
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        own = dict(model.named_parameters())
        missing = [n for n in self.names if n not in own]
        if missing:
            raise KeyError(f"fast weights {missing[:5]} are not parameters of {type(model).__name__}")
        self._keys = [["model." + k for k in aliases[id(own[n])]] for n in self.names]
        self._params = [own[n] for n in self.names]

    def weights(self) -> list[Tensor]:
        """θ: the parameters standing for :attr:`names`, detached."""
        return [p.detach() for p in self._params]

    @contextlib.contextmanager
    def fast_weights(self, theta: Sequence[Tensor]) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """``(θ, φ_0)``: φ_0 is a copy of ``theta`` (leaves that require grad) that a first-order inner
        loop updates in place; ``theta`` and the model are left alone."""
        theta = list(theta)
        yield theta, [t.detach().clone().requires_grad_() for t in theta]

    def loss_and_grads(
        self,
        weights: Sequence[Tensor],
        batch: Batches,
        wrt: Sequence[Tensor] | None = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """Token-mean loss, token count and d loss / d ``wrt`` (default: ``weights``), with ``weights``
        in place for the forward AND the backward."""
        return self._call(weights, batch, list(weights) if wrt is None else list(wrt), create_graph)

    def loss(self, weights: Sequence[Tensor], batch: Batches) -> tuple[Tensor, Tensor]:
        """Token-mean loss and token count at ``weights``, no gradient taken (e.g. under no_grad)."""
        return self._call(weights, batch, [], False)[:2]

    def logits(self, weights: Sequence[Tensor], batch: Batch) -> Tensor:
        """Logits [B, T, V] of ``model`` at ``weights`` (no gradient taken: call under no_grad)."""
        if len(weights) != len(self._keys):
            raise ValueError(f"expected {len(self._keys)} fast weights, got {len(weights)}")
        # The alias keys are relative to the wrapper ("model.<name>"); here the model itself is called.
        mapping = {k.removeprefix("model."): w for keys, w in zip(self._keys, weights) for k in keys}
        inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
        out = torch.func.functional_call(self.model, mapping, (), {**inputs, "use_cache": False},
                                         tie_weights=False, strict=False)
        return out.logits

    def _call(self, weights, batch, wrt, create_graph):
        if len(weights) != len(self._keys):
            raise ValueError(f"expected {len(self._keys)} fast weights, got {len(weights)}")
        if self.compute_dtype is not None:  # differentiable: the gradients come back in the weights' dtype
            weights = [w.to(self.compute_dtype) for w in weights]
        mapping = {k: w for keys, w in zip(self._keys, weights) for k in keys}
        return torch.func.functional_call(
            self._wrapper, mapping, (batch, wrt, create_graph), tie_weights=False, strict=False
        )


def gradient_for(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` (in the layout :meth:`FunctionalLoss.weights` gives, this process's shard under FSDP2)
    as a ``.grad`` for ``param``: cast to its dtype, wrapped as a DTensor like it when it is one."""
    grad = grad.to(param.dtype)
    if type(param).__name__ == "DTensor":
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(grad, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
    return grad


@contextlib.contextmanager
def weights_copied_in(params: dict[str, nn.Parameter], weights: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily copy ``weights`` into the parameters of the same names (restored on exit).

    For code that cannot go through ``functional_call``, e.g. ``model.generate`` in few-shot
    evaluation after :func:`lora_maml.meta.algorithms.adapt`. Costs one copy of the adapted
    parameters (small for LoRA, the whole model for ``full``).
    """
    saved = {name: params[name].detach().clone() for name in weights}
    try:
        with torch.no_grad():
            for name, w in weights.items():
                params[name].copy_(w)
        yield
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                params[name].copy_(w)
