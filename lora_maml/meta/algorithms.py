"""FOMAML, MAML and Reptile with fast weights, one meta-step at a time; Meta-SGD and an Adam inner loop.

Notation: θ = the meta-learned parameters (``lora_maml.models.adapted_parameters``: the LoRA matrices,
or every parameter in ``full`` mode), tensor by tensor θ_i; a task t has support batches
S_0..S_{m-1} and a query batch Q (any of them may be a list of micro-batches, accumulated as one
token-weighted batch); L(w; B) = token-mean NLL of batch B at weights w (``lora_maml.loss``);
K = ``meta.num_inner_steps``; α_i = the inner learning rate of tensor i (``meta.inner_lr`` for every
tensor, or meta-learned per tensor with ``meta.learn_inner_lr``: Meta-SGD, α_i = exp(λ_i)).

Inner loop (first order: on fast weights φ, a copy of θ updated in place, so the model's own parameters
are never written; on FSDP2 shards, ``lora_maml.meta.sharded``, φ is written into the shards and θ
restored after the task; MAML: new tensors per step, in the graph):
    φ_0 = θ,    g_k = ∇L(φ_k; S_{k mod m}),    φ_{k+1,i} = φ_{k,i} − α_i u_{k,i}
    sgd:  u_k = g_k
    adam: u_k = m̂_k / (√v̂_k + ε), Adam's bias-corrected moments of g_0..g_k, started at 0 for every
          task (β = 0.9, 0.999; ε = 1e-8). A normalised step makes α far less dependent on the
          gradient's scale (LoRA's B = 0 start, the model size).
Per-task meta-gradient g_t:
    fomaml:   g_t = ∇_φ L(φ_K; Q)             the query gradient at the adapted weights (no graph
                                               through the inner loop)
    maml:     g_t = d L(φ_K(θ); Q) / dθ        exact, second order, back through the inner loop
    reptile:  g_t = θ − φ_K = Σ_k α u_k        a pseudo-gradient; Q is only scored for metrics
Meta-SGD hypergradient h_t,i = d L(φ_K; Q) / d λ_i:
    fomaml:   h_t,i = −⟨∇_i L(φ_K; Q), θ_i − φ_K,i⟩   first order: the u_k are held fixed, so
              dφ_K,i/dλ_i = −α_i Σ_k u_k,i = −(θ_i − φ_K,i) (exact for K = 1)
    maml:     exact, by autograd through the inner loop (λ is in its graph)
Meta-gradient: g = (1/T) Σ_t g_t over the T tasks of the (global) meta-batch: every task weighs the
same, whatever its token count. Outer step: θ ← AdamW(θ, clip_norm(g, optim.clip_grad)) and, with
Meta-SGD, λ ← Adam(λ, h) at ``meta.inner_lr_lr`` (not clipped); then the LR scheduler steps.

Distribution: each process runs :meth:`MetaLearner.meta_gradient` on its own tasks and SUMS their
gradients and metric sums into ONE flat buffer [gradients | task count, metric sums]; the
``all_reduce`` hook (identity by default; e.g. ``functools.partial(torch.distributed.all_reduce,
op=ReduceOp.SUM)``) sums that buffer across processes in place; the sum is divided by the global task
count it carries (= meta.meta_batch_size when the processes share out one meta-batch). With every
weight FSDP2-sharded (``fn`` a ``ShardedLoss``) every process runs every task on its share of the
examples, the gradients come reduce-scattered, and nothing is left to all-reduce. The ``meta/*``
metrics are thus global. The per-task ``{task}/*`` metrics are those of
this process's tasks; a trainer that wants all of them logs them after ``all_gather_object``.

Diagnostics (``diagnostics=True``, e.g. on logging steps; they cost a no-grad forward of Q at θ and of
S_0 at φ_K per task): ``meta/adaptation_benefit`` = L(θ; Q) − L(φ_K; Q) (does adapting help on
held-out data?) and ``meta/inner_progress`` = 1 − L(φ_K; S_0) / L(θ; S_0) (does the inner loop move
at all?). Both ≈ 0 means the inner loop is inert: FOMAML is then plain SFT on the query batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lora_maml.config import MetaConfig
from lora_maml.distributed import flat_buffer
from lora_maml.meta.fast_weights import Batches, FunctionalLoss, gradient_for
from lora_maml.models import decoder_compiled, gradient_checkpointing_on
from lora_maml.optim import apply_gradients

if TYPE_CHECKING:
    from lora_maml.meta.sharded import ShardedLoss

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8
# Per-task sums carried next to the gradients in the flat buffer (the all-reduced part).
_SLOTS = ("tasks", "query_loss", "support_loss", "adaptation_gap", "query_loss_pre", "inner_progress",
          "support_tokens", "query_tokens")


@dataclass
class TaskBatch:
    """One task of a meta-batch. Inner step k uses ``support[k % len(support)]``; each support entry
    and the query may be a list of micro-batches (one token-weighted batch, see ``loss_and_grads``)."""

    name: str
    support: Sequence[Batches]
    query: Batches


@dataclass
class Adapted:
    weights: list[Tensor]  # φ_K, aligned with the parameter names
    first_support_loss: Tensor | None  # L(φ_0; S_0), the loss of the first inner step; None if K = 0
    support_loss: Tensor | None  # L(φ_{K-1}; S_{K-1}), the loss of the last inner step; None if K = 0
    support_tokens: Tensor  # label tokens processed by the K inner steps (a reused batch counts again)


@dataclass
class MetaGradient:
    grads: dict[str, Tensor]  # g, views into the learner's flat buffer (overwritten by the next call)
    metrics: dict[str, float]  # global meta/* metrics
    task_metrics: dict[str, float]  # {task}/* of this process's tasks (repeated tasks averaged)


def inner_loop(
    fn: FunctionalLoss,
    weights: Sequence[Tensor],
    support: Sequence[Batches],
    lrs: Sequence[float | Tensor],
    steps: int,
    *,
    optimizer: str = "sgd",
    second_order: bool = False,
) -> Adapted:
    """K steps from ``weights`` with one learning rate per tensor (``lrs``). First order: ``weights``
    are fast weights (``fn.fast_weights``), updated in place, no graph kept. Second order: ``weights``
    must be the parameters themselves (and ``lrs`` may be tensors in the graph, for Meta-SGD); each
    step makes new tensors and the graph is kept."""
    if steps > 0 and not support:
        raise ValueError(f"{steps} inner steps need at least one support batch, got none")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"inner optimizer: expected 'sgd' or 'adam', got {optimizer!r}")
    weights, lrs = list(weights), list(lrs)
    if len(lrs) != len(weights):
        raise ValueError(f"expected one inner learning rate per fast weight ({len(weights)}), got {len(lrs)}")
    moments = None
    losses, counts = [], []
    for k in range(steps):
        loss, n_tokens, grads = fn.loss_and_grads(weights, support[k % len(support)], create_graph=second_order)
        losses.append(loss.detach())
        counts.append(n_tokens)
        with torch.set_grad_enabled(second_order):  # foreach ops: one fused kernel per dtype/device group
            if optimizer == "adam":
                moments, grads = _adam_direction(grads, moments, k + 1)
            if second_order:
                weights = torch._foreach_sub(weights, torch._foreach_mul(grads, lrs))
            else:  # in place: φ is the one model-sized buffer; the gradients are ours to scale
                torch._foreach_mul_(grads, lrs)
                torch._foreach_sub_(weights, grads)
    device = weights[0].device
    tokens = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long, device=device)
    return Adapted(weights, losses[0] if losses else None, losses[-1] if losses else None, tokens)


def _adam_direction(grads, moments, step: int):
    """Adam's update direction m̂ / (√v̂ + ε) at ``step`` (from 1) and the new moments (m, v)."""
    (b1, b2), grads = ADAM_BETAS, list(grads)
    if moments is None:
        moments = ([torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads])
    m = torch._foreach_add(torch._foreach_mul(moments[0], b1), grads, alpha=1 - b1)
    v = torch._foreach_addcmul(torch._foreach_mul(moments[1], b2), grads, grads, value=1 - b2)
    # v̂ is clamped away from 0 only so that MAML's backward through √ stays finite where g = 0
    # (LoRA's A at B = 0); below 1e-30 the direction is m̂/ε ≈ 0 either way.
    v_hat = torch._foreach_clamp_min(torch._foreach_div(v, 1 - b2**step), 1e-30)
    denominator = torch._foreach_add(torch._foreach_sqrt(v_hat), ADAM_EPS)
    return (m, v), torch._foreach_div(torch._foreach_div(m, 1 - b1**step), denominator)


def adapt(
    model: nn.Module,
    params: dict[str, Tensor],
    support_batches: Sequence[Batches],
    inner_lr: float | Mapping[str, float],
    steps: int,
    *,
    optimizer: str = "sgd",
) -> dict[str, Tensor]:
    """First-order adaptation (few-shot evaluation): ``steps`` inner steps on ``support_batches`` from
    ``params`` at ``inner_lr`` (one rate, or one per parameter name: Meta-SGD's learned rates); returns
    the adapted fast weights by name. ``model`` and ``params`` are not modified. Use them with
    ``torch.func.functional_call`` or ``fast_weights.weights_copied_in``."""
    fn = FunctionalLoss(model, list(params))
    with fn.fast_weights([p.detach() for p in params.values()]) as (_, phi):
        adapted = inner_loop(fn, phi, support_batches, per_tensor(inner_lr, list(params)), steps, optimizer=optimizer)
    return {name: w.detach() for name, w in zip(params, adapted.weights)}


def per_tensor(inner_lr: float | Mapping[str, float], names: Sequence[str]) -> list[float]:
    """One inner learning rate per name: ``inner_lr`` itself, or looked up by name (Meta-SGD's rates)."""
    if not isinstance(inner_lr, Mapping):
        return [float(inner_lr)] * len(names)
    missing = sorted(set(names) - set(inner_lr))
    if missing:
        raise KeyError(f"no inner learning rate for {len(missing)} adapted parameters, e.g. {missing[:3]}")
    return [float(inner_lr[name]) for name in names]


class MetaLearner:
    """Meta-gradients and outer steps for ``params`` (name → parameter of ``model``) and, with
    ``meta.learn_inner_lr``, for the log inner learning rates :attr:`log_inner_lrs` (one per tensor)."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        meta_cfg: MetaConfig,
        *,
        all_reduce: Callable[[Tensor], object] | None = None,
        fn: FunctionalLoss | ShardedLoss | None = None,
    ):
        if meta_cfg.algorithm == "maml" and gradient_checkpointing_on(model):
            raise ValueError("meta.algorithm=maml needs model.enable_gradient_checkpointing=false")
        if meta_cfg.algorithm == "maml" and decoder_compiled(model):
            raise ValueError("meta.algorithm=maml needs model.compile=false (no double backward through torch.compile)")
        if meta_cfg.algorithm == "reptile" and meta_cfg.num_inner_steps == 0:
            raise ValueError("meta.algorithm=reptile needs meta.num_inner_steps >= 1 (θ − φ_0 is 0)")
        if meta_cfg.algorithm == "reptile" and meta_cfg.learn_inner_lr:
            raise ValueError("meta.learn_inner_lr needs meta.algorithm=fomaml or maml (Reptile has no query gradient)")
        self.model, self.cfg = model, meta_cfg
        self.names, self.params = list(params), list(params.values())
        # The fast weights: functional (default), or in place on FSDP2 shards (lora_maml.meta.sharded).
        self.fn = fn or FunctionalLoss(model, self.names)
        if self.fn.names != self.names:
            raise ValueError("fn must stand for the same parameter names as params, in the same order")
        self._all_reduce = all_reduce or (lambda flat: None)
        device = self.params[0].device
        acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        # λ = log α, one per tensor: α stays positive and the outer step is relative (scale-free).
        self.log_inner_lrs = None
        if meta_cfg.learn_inner_lr:
            init = torch.full((len(self.params),), math.log(meta_cfg.inner_lr), dtype=acc_dtype, device=device)
            self.log_inner_lrs = nn.Parameter(init)
        # g lives in θ's layout as fn sees it (this process's shards under FSDP).
        shapes = [t.shape for t in self.fn.weights()] + ([self.log_inner_lrs.shape] if self.log_inner_lrs is not None else [])
        self._flat, self._grads, self._sums = flat_buffer(shapes, len(_SLOTS), dtype=acc_dtype, device=device)
        self._n = self._flat.numel() - len(_SLOTS)

    @property
    def meta_parameters(self) -> list[Tensor]:
        """Everything the outer step updates: θ, then λ with Meta-SGD."""
        return self.params + ([self.log_inner_lrs] if self.log_inner_lrs is not None else [])

    def inner_lrs(self) -> dict[str, float]:
        """α_i by parameter name (all ``meta.inner_lr`` unless Meta-SGD learns them)."""
        if self.log_inner_lrs is None:
            return dict.fromkeys(self.names, self.cfg.inner_lr)
        return dict(zip(self.names, self.log_inner_lrs.detach().double().exp().tolist()))

    def task_gradient(self, task: TaskBatch, diagnostics: bool = True) -> tuple[list[Tensor], Tensor]:
        """g_t (then h_t with Meta-SGD) and the task's metric row (0-d tensors in ``_SLOTS`` order, no host sync)."""
        cfg = self.cfg
        zero = self._flat.new_zeros(())  # in the accumulation dtype: nothing fp32 on an fp64 model's path
        pre = zero
        if diagnostics:
            with torch.no_grad():
                pre = self.fn.loss(self.fn.weights(), task.query)[0]
        second_order = cfg.algorithm == "maml"
        if self.log_inner_lrs is None:
            lrs = [cfg.inner_lr] * len(self.params)
        else:
            lrs = list(self.log_inner_lrs.exp().unbind()) if second_order else self.log_inner_lrs.exp().tolist()
        # MAML differentiates through the inner loop from the parameters; first order runs it on a copy
        # (or, on FSDP shards, in place with θ restored on leaving).
        fast = contextlib.nullcontext((self.params, self.params)) if second_order else self.fn.fast_weights(self.fn.weights())
        with fast as (theta, phi):
            adapted = inner_loop(
                self.fn, phi, task.support, lrs, cfg.num_inner_steps, optimizer=cfg.inner_optimizer,
                second_order=second_order,
            )
            if cfg.algorithm == "reptile":
                with torch.no_grad():
                    query_loss, query_tokens = self.fn.loss(adapted.weights, task.query)
                    grads = torch._foreach_sub(theta, adapted.weights)
            else:
                weights = adapted.weights if second_order else [w.detach().requires_grad_() for w in adapted.weights]
                wrt = self.meta_parameters if second_order else weights
                query_loss, query_tokens, grads = self.fn.loss_and_grads(weights, task.query, wrt=wrt)
                if self.log_inner_lrs is not None and not second_order:
                    with torch.no_grad():
                        steps = torch._foreach_sub(theta, weights)  # θ_i − φ_K,i = α_i Σ_k u_k,i
                        hyper = -torch.stack([(g * s).sum() for g, s in zip(grads, steps)])
                    grads = [*grads, hyper]
            progress = zero
            if diagnostics and adapted.first_support_loss is not None:
                with torch.no_grad():
                    first = self.fn.loss(adapted.weights, task.support[0])[0]
                    progress = 1 - first / adapted.first_support_loss.clamp(min=1e-12)
        query_loss = query_loss.detach()
        support_loss = zero if adapted.support_loss is None else adapted.support_loss
        gap = zero if adapted.support_loss is None else query_loss - support_loss
        row = [zero + 1, query_loss, support_loss, gap, pre, progress, adapted.support_tokens, query_tokens]
        return list(grads), torch.stack([v.detach().to(self._flat) for v in row])

    def meta_gradient(self, tasks: Sequence[TaskBatch], *, diagnostics: bool = True) -> MetaGradient:
        """g = (1/T) Σ_t g_t over the global meta-batch (this process's ``tasks`` + the all_reduce)."""
        self._flat.zero_()
        rows = []
        for task in tasks:
            grads, row = self.task_gradient(task, diagnostics)
            torch._foreach_add_(self._grads, grads)
            rows.append(row)
        local = torch.stack(rows) if rows else self._flat.new_zeros(0, len(_SLOTS))
        self._sums.copy_(local.sum(0))
        self._all_reduce(self._flat)
        self._flat[: self._n].div_(self._sums[0].clamp(min=1))
        host = torch.cat([self._sums, local.flatten()]).tolist()  # the one host sync
        total = dict(zip(_SLOTS, host[: len(_SLOTS)]))
        n_tasks = max(total["tasks"], 1.0)
        metrics = {
            "meta/loss": total["query_loss"] / n_tasks,
            "meta/num_tasks": total["tasks"],
            "meta/support_tokens": total["support_tokens"],
            "meta/query_tokens": total["query_tokens"],
        }
        adapted = self.cfg.num_inner_steps > 0
        shown = ["query_loss"]
        if adapted:
            metrics["meta/support_loss"] = total["support_loss"] / n_tasks
            metrics["meta/avg_adaptation_gap"] = total["adaptation_gap"] / n_tasks
            shown += ["support_loss", "adaptation_gap"]
        if diagnostics:
            metrics["meta/query_loss_pre"] = total["query_loss_pre"] / n_tasks
            metrics["meta/adaptation_benefit"] = metrics["meta/query_loss_pre"] - metrics["meta/loss"]
            shown += ["query_loss_pre"]
            if adapted:
                metrics["meta/inner_progress"] = total["inner_progress"] / n_tasks
                shown += ["inner_progress"]
        if self.log_inner_lrs is not None:
            rates = list(self.inner_lrs().values())
            metrics |= {"meta/inner_lr_mean": sum(rates) / len(rates), "meta/inner_lr_min": min(rates),
                        "meta/inner_lr_max": max(rates)}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for i, task in enumerate(tasks):
            row = dict(zip(_SLOTS, host[len(_SLOTS) * (i + 1) : len(_SLOTS) * (i + 2)]))
            counts[task.name] = counts.get(task.name, 0) + 1
            for key in shown:
                sums[f"{task.name}/{key}"] = sums.get(f"{task.name}/{key}", 0.0) + row[key]
        task_metrics = {k: v / counts[k.rsplit("/", 1)[0]] for k, v in sums.items()}
        grads = dict(zip(self.names, self._grads))
        if self.log_inner_lrs is not None:
            grads["log_inner_lrs"] = self._grads[-1]
        return MetaGradient(grads, metrics, task_metrics)

    def outer_step(self, optimizer: torch.optim.Optimizer, scheduler, clip_grad: float) -> dict[str, float]:
        """Apply the last meta-gradient: clip (θ only), Adam(W) step, scheduler step
        (``optim.apply_gradients``). A non-finite gradient skips both steps (``meta/skipped_step`` = 1)
        so that NaNs never reach θ, λ or Adam's moments; ``meta/grad_norm`` is θ's norm before clipping."""
        for p, g in zip(self.meta_parameters, self._grads):
            p.grad = gradient_for(p, g)
        unclipped = [self.log_inner_lrs] if self.log_inner_lrs is not None else []
        update = apply_gradients(self.params, optimizer, scheduler, clip_grad, unclipped=unclipped)
        return {f"meta/{key}": value for key, value in update.items()}

    def step(
        self, tasks: Sequence[TaskBatch], optimizer: torch.optim.Optimizer, scheduler, clip_grad: float,
        *, diagnostics: bool = True,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One meta-step: :meth:`meta_gradient` then :meth:`outer_step`. Returns (meta/*, {task}/*)."""
        result = self.meta_gradient(tasks, diagnostics=diagnostics)
        return result.metrics | self.outer_step(optimizer, scheduler, clip_grad), result.task_metrics
