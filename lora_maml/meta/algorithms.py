"""FOMAML, MAML and Reptile with fast weights, one meta-step at a time.

Notation: θ = the meta-learned parameters (``lora_maml.models.adapted_parameters``: the LoRA matrices,
or every parameter in ``full`` mode); a task t has support batches S_0..S_{m-1} and a query batch Q
(any of them may be a list of micro-batches, accumulated as one token-weighted batch);
L(w; B) = token-mean NLL of batch B at weights w (``lora_maml.loss``); K = ``meta.num_inner_steps``,
α = ``meta.inner_lr``.

Inner loop (plain SGD on fast weights; the model's own parameters are never written):
    φ_0 = θ,    φ_{k+1} = φ_k − α ∇L(φ_k; S_{k mod m})
Per-task meta-gradient g_t:
    fomaml:   g_t = ∇_φ L(φ_K; Q)             the query gradient at the adapted weights (no graph
                                               through the inner loop)
    maml:     g_t = d L(φ_K(θ); Q) / dθ        exact, second order, back through the inner loop
    reptile:  g_t = θ − φ_K = α Σ_k ∇L(φ_k; S_k)   a pseudo-gradient; Q is only scored for metrics
Meta-gradient: g = (1/T) Σ_t g_t over the T tasks of the (global) meta-batch: every task weighs the
same, whatever its token count. Outer step: θ ← AdamW(θ, clip_norm(g, optim.clip_grad)), then the LR
scheduler steps. For Reptile, plain SGD at lr 1 would give θ ← mean_t φ_K^t (Reptile with ε = 1);
AdamW at ``meta.outer_lr`` moves θ towards the adapted weights with Adam's per-coordinate scaling.

Distribution: each process runs :meth:`MetaLearner.meta_gradient` on its own tasks and SUMS their
gradients and metric sums into ONE flat buffer [gradients | task count, metric sums]; the
``all_reduce`` hook (identity by default; e.g. ``functools.partial(torch.distributed.all_reduce,
op=ReduceOp.SUM)``) sums that buffer across processes in place; the sum is divided by the global task
count it carries (= meta.meta_batch_size when the processes share out one meta-batch). The ``meta/*``
metrics are thus global. The per-task ``{task}/*`` metrics are those of
this process's tasks; a trainer that wants all of them logs them after ``all_gather_object``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lora_maml.config import MetaConfig
from lora_maml.meta.fast_weights import Batches, FunctionalLoss, loss_and_grads
from lora_maml.models import decoder_compiled, gradient_checkpointing_on
from lora_maml.optim import apply_gradients

# Per-task sums carried next to the gradients in the flat buffer (the all-reduced part).
_SLOTS = ("tasks", "query_loss", "support_loss", "adaptation_gap", "query_loss_pre", "support_tokens", "query_tokens")


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
    inner_lr: float,
    steps: int,
    *,
    second_order: bool = False,
) -> Adapted:
    """K SGD steps from ``weights``. First order: each step starts from detached leaves, no graph is
    kept. Second order: ``weights`` must be the parameters themselves; the graph is kept."""
    if steps > 0 and not support:
        raise ValueError(f"{steps} inner steps need at least one support batch, got none")
    weights = list(weights)
    loss, counts = None, []
    for k in range(steps):
        w = weights if second_order else [t.detach().requires_grad_() for t in weights]
        loss, n_tokens, grads = fn.loss_and_grads(w, support[k % len(support)], create_graph=second_order)
        counts.append(n_tokens)
        if second_order:
            weights = [wi - inner_lr * gi for wi, gi in zip(w, grads)]
        else:
            with torch.no_grad():  # one fused kernel per dtype/device group instead of one per tensor
                weights = torch._foreach_add(w, grads, alpha=-inner_lr)
    device = weights[0].device
    tokens = torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.long, device=device)
    return Adapted(weights, None if loss is None else loss.detach(), tokens)


def adapt(
    model: nn.Module, params: dict[str, Tensor], support_batches: Sequence[Batches], inner_lr: float, steps: int
) -> dict[str, Tensor]:
    """First-order adaptation (few-shot evaluation): ``steps`` SGD steps on ``support_batches`` from
    ``params``; returns the adapted fast weights by name. ``model`` and ``params`` are not modified.
    Use them with ``torch.func.functional_call`` or ``fast_weights.weights_copied_in``."""
    fn = FunctionalLoss(model, list(params))
    adapted = inner_loop(fn, [p.detach() for p in params.values()], support_batches, inner_lr, steps)
    return {name: w.detach() for name, w in zip(params, adapted.weights)}


class MetaLearner:
    """Meta-gradients and outer steps for ``params`` (name → parameter of ``model``)."""

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        meta_cfg: MetaConfig,
        *,
        all_reduce: Callable[[Tensor], object] | None = None,
    ):
        if meta_cfg.algorithm == "maml" and gradient_checkpointing_on(model):
            raise ValueError("meta.algorithm=maml needs model.enable_gradient_checkpointing=false")
        if meta_cfg.algorithm == "maml" and decoder_compiled(model):
            raise ValueError("meta.algorithm=maml needs model.compile=false (no double backward through torch.compile)")
        if meta_cfg.algorithm == "reptile" and meta_cfg.num_inner_steps == 0:
            raise ValueError("meta.algorithm=reptile needs meta.num_inner_steps >= 1 (θ − φ_0 is 0)")
        self.model, self.cfg = model, meta_cfg
        self.names, self.params = list(params), list(params.values())
        self.fn = FunctionalLoss(model, self.names)
        self._all_reduce = all_reduce or (lambda flat: None)
        acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        numels = [p.numel() for p in self.params]
        self._n = sum(numels)
        self._flat = torch.zeros(self._n + len(_SLOTS), dtype=acc_dtype, device=self.params[0].device)
        self._grads = [v.view_as(p) for v, p in zip(self._flat[: self._n].split(numels), self.params)]

    def task_gradient(self, task: TaskBatch, query_loss_pre: bool = True) -> tuple[list[Tensor], Tensor]:
        """g_t and the task's metric row (0-d tensors in ``_SLOTS`` order, no host sync)."""
        cfg = self.cfg
        zero = torch.zeros((), device=self._flat.device)
        pre = zero
        if query_loss_pre:
            with torch.no_grad():
                pre = loss_and_grads(self.model, task.query, ())[0]
        second_order = cfg.algorithm == "maml"
        theta = self.params if second_order else [p.detach() for p in self.params]
        adapted = inner_loop(
            self.fn, theta, task.support, cfg.inner_lr, cfg.num_inner_steps, second_order=second_order
        )
        if cfg.algorithm == "reptile":
            with torch.no_grad():
                query_loss, query_tokens = self.fn.loss(adapted.weights, task.query)
                grads = torch._foreach_sub(theta, adapted.weights)
        else:
            weights = adapted.weights if second_order else [w.detach().requires_grad_() for w in adapted.weights]
            wrt = self.params if second_order else weights
            query_loss, query_tokens, grads = self.fn.loss_and_grads(weights, task.query, wrt=wrt)
        query_loss = query_loss.detach()
        support_loss = zero if adapted.support_loss is None else adapted.support_loss
        gap = zero if adapted.support_loss is None else query_loss - support_loss
        row = [zero + 1, query_loss, support_loss, gap, pre, adapted.support_tokens, query_tokens]
        return list(grads), torch.stack([v.to(self._flat) for v in row])

    def meta_gradient(self, tasks: Sequence[TaskBatch], *, query_loss_pre: bool = True) -> MetaGradient:
        """g = (1/T) Σ_t g_t over the global meta-batch (this process's ``tasks`` + the all_reduce)."""
        self._flat.zero_()
        rows = []
        for task in tasks:
            grads, row = self.task_gradient(task, query_loss_pre)
            torch._foreach_add_(self._grads, grads)
            rows.append(row)
        local = torch.stack(rows) if rows else self._flat.new_zeros(0, len(_SLOTS))
        self._flat[self._n :] = local.sum(0)
        self._all_reduce(self._flat)
        self._flat[: self._n].div_(self._flat[self._n].clamp(min=1))
        host = torch.cat([self._flat[self._n :], local.flatten()]).tolist()  # the one host sync
        total = dict(zip(_SLOTS, host[: len(_SLOTS)]))
        n_tasks = max(total["tasks"], 1.0)
        metrics = {
            "meta/loss": total["query_loss"] / n_tasks,
            "meta/num_tasks": total["tasks"],
            "meta/support_tokens": total["support_tokens"],
            "meta/query_tokens": total["query_tokens"],
        }
        adapted = self.cfg.num_inner_steps > 0
        if adapted:
            metrics["meta/support_loss"] = total["support_loss"] / n_tasks
            metrics["meta/avg_adaptation_gap"] = total["adaptation_gap"] / n_tasks
        if query_loss_pre:
            metrics["meta/query_loss_pre"] = total["query_loss_pre"] / n_tasks
        shown = ["query_loss"] + (["support_loss", "adaptation_gap"] if adapted else [])
        shown += ["query_loss_pre"] if query_loss_pre else []
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for i, task in enumerate(tasks):
            row = dict(zip(_SLOTS, host[len(_SLOTS) * (i + 1) : len(_SLOTS) * (i + 2)]))
            counts[task.name] = counts.get(task.name, 0) + 1
            for key in shown:
                sums[f"{task.name}/{key}"] = sums.get(f"{task.name}/{key}", 0.0) + row[key]
        task_metrics = {k: v / counts[k.rsplit("/", 1)[0]] for k, v in sums.items()}
        return MetaGradient(dict(zip(self.names, self._grads)), metrics, task_metrics)

    def outer_step(self, optimizer: torch.optim.Optimizer, scheduler, clip_grad: float) -> dict[str, float]:
        """Apply the last meta-gradient: clip, AdamW step, scheduler step (``optim.apply_gradients``).
        A non-finite gradient norm skips both steps (``meta/skipped_step`` = 1) so that NaNs never
        reach θ or Adam's moments; ``meta/grad_norm`` is the norm before clipping."""
        for p, g in zip(self.params, self._grads):
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
        update = apply_gradients(self.params, optimizer, scheduler, clip_grad)
        return {f"meta/{key}": value for key, value in update.items()}

    def step(
        self, tasks: Sequence[TaskBatch], optimizer: torch.optim.Optimizer, scheduler, clip_grad: float,
        *, query_loss_pre: bool = True,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One meta-step: :meth:`meta_gradient` then :meth:`outer_step`. Returns (meta/*, {task}/*)."""
        result = self.meta_gradient(tasks, query_loss_pre=query_loss_pre)
        return result.metrics | self.outer_step(optimizer, scheduler, clip_grad), result.task_metrics
