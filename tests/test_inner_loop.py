"""The inner loop beyond plain SGD: the Adam inner optimizer, per-tensor (Meta-SGD) learning rates and
their hypergradients, the inner-loop diagnostics and the inert-inner-loop warning.

References are computed another way: in-place ``torch.optim`` steps on a deep copy of the model, and
central finite differences in fp64 (tiny random Qwen3s from tests/test_meta_gradients.py).
"""

import copy
import logging
import math

import pytest
import torch
from test_meta_gradients import (  # noqa: F401  (exact_fp64 is a fixture)
    INNER_LR,
    K,
    exact_fp64,
    full_logits_copy,
    inplace_adapt,
    max_err,
    random_tasks,
    reference,
    tiny_model,
)

from lora_maml.config import Config, MetaConfig, OptimConfig
from lora_maml.loss import causal_lm_loss_tensors
from lora_maml.meta import algorithms
from lora_maml.meta.algorithms import MetaLearner, adapt
from lora_maml.meta.diagnostics import InertInnerLoopMonitor
from lora_maml.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
ADAM_LR = 0.02


def learner(model, params, **meta):
    return MetaLearner(model, params, MetaConfig(**{"inner_optimizer": "sgd", "inner_lr": INNER_LR, "num_inner_steps": K, **meta}))


# -- the Adam inner optimizer -------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_fomaml_with_adam_inner_loop_matches_inplace_torch_adam(adapter):
    """A fresh, bias-corrected torch.optim.Adam per task: the same query gradients, and not SGD's."""
    model, params = tiny_model(adapter)
    tasks = random_tasks()
    ours = list(learner(model, params, inner_optimizer="adam", inner_lr=ADAM_LR).meta_gradient(tasks).grads.values())
    names = list(params)
    ref = reference(model, names, tasks, K, ADAM_LR, optimizer="adam")
    sgd = reference(model, names, tasks, K, ADAM_LR)
    assert max_err(ours, ref) <= 1e-9
    assert max_err(sgd, ref) > 1e-4


def test_adam_state_is_fresh_for_every_task():
    """Two identical tasks in one meta-batch give the gradient of one: no moments leak across tasks."""
    model, params = tiny_model("lora")
    task = random_tasks(1)[0]
    one = learner(model, params, inner_optimizer="adam", inner_lr=ADAM_LR, meta_batch_size=1).meta_gradient([task])
    one = [g.clone() for g in one.grads.values()]
    two = learner(model, params, inner_optimizer="adam", inner_lr=ADAM_LR).meta_gradient([task, task])
    assert max_err(one, two.grads.values()) <= 1e-12


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_adapt_with_one_rate_per_tensor_matches_inplace_groups(optimizer):
    model, params = tiny_model("lora")
    task = random_tasks(1)[0]
    rates = {name: 0.01 * (1 + i % 3) for i, name in enumerate(params)}
    adapted = adapt(model, params, task.support, rates, K, optimizer=optimizer)
    _, ref = inplace_adapt(model, list(params), task, K, list(rates.values()), optimizer)
    assert max_err(adapted.values(), ref) <= 1e-12
    uniform = adapt(model, params, task.support, 0.01, K, optimizer=optimizer)
    assert max_err(adapted.values(), uniform.values()) > 1e-6
    with pytest.raises(KeyError, match="no inner learning rate"):
        adapt(model, params, task.support, dict(list(rates.items())[1:]), K)
    with pytest.raises(ValueError, match="'sgd' or 'adam'"):
        adapt(model, params, task.support, 0.01, K, optimizer="rmsprop")


def directional_fd(f, theta, direction, eps=1e-6):
    """Central difference of f along ``direction`` at ``theta`` (lists of tensors, fp64)."""
    plus = f([t + eps * d for t, d in zip(theta, direction)])
    minus = f([t - eps * d for t, d in zip(theta, direction)])
    return (plus - minus) / (2 * eps)


def adapted_query_loss(model, names, task, steps, lrs, optimizer):
    """θ ↦ L(φ_K(θ); Q) with an in-place torch.optim inner loop, for finite differences."""

    def f(theta):
        m = copy.deepcopy(model)
        own = dict(m.named_parameters())
        with torch.no_grad():
            for n, t in zip(names, theta):
                own[n].copy_(t)
        m, _ = inplace_adapt(m, names, task, steps, lrs, optimizer)
        with torch.no_grad():
            return causal_lm_loss_tensors(m, task.query)[0].item()

    return f


@pytest.fixture
def smooth_adam(monkeypatch):
    """Adam's direction g / (|g| + ε) bends sharply where |g| ≲ ε: with ε = 1e-8 no central-difference
    step is in the linear regime (the quotient wanders by 1e-3 relative as the step shrinks). With
    ε = 1e-3 a step of 1e-6 converges (to 3e-6 relative, measured); the formula under test is the same."""
    monkeypatch.setattr(algorithms, "ADAM_EPS", 1e-3)


def test_maml_through_the_adam_inner_loop_matches_finite_differences(exact_fp64, smooth_adam):
    model, params = tiny_model("lora", attn="sdpa")
    task = random_tasks(1)[0]
    cfg = dict(algorithm="maml", inner_optimizer="adam", inner_lr=ADAM_LR, meta_batch_size=1, num_inner_steps=2)
    grads = list(learner(model, params, **cfg).meta_gradient([task]).grads.values())
    names = list(params)
    theta = [p.detach().clone() for p in params.values()]
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in theta]
    f = adapted_query_loss(model, names, task, 2, [ADAM_LR] * len(names), "adam")
    fd = directional_fd(f, theta, direction)
    ours = sum((g * d).sum().item() for g, d in zip(grads, direction))
    assert ours == pytest.approx(fd, rel=1e-5, abs=1e-8)
    fomaml = list(learner(model, params, **(cfg | {"algorithm": "fomaml"})).meta_gradient([task]).grads.values())
    assert abs(sum((g * d).sum().item() for g, d in zip(fomaml, direction)) - fd) > 1e-4  # second order matters


def test_maml_adam_gradient_is_finite_where_the_support_gradient_is_zero():
    """peft's start B = 0 makes ∇A = 0; Adam's √v̂ has an infinite slope at 0, so MAML must not NaN."""
    model, params = tiny_model("lora")
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.zero_()
    cfg = dict(algorithm="maml", inner_optimizer="adam", inner_lr=ADAM_LR, meta_batch_size=1, num_inner_steps=2)
    grads = learner(model, params, **cfg).meta_gradient(random_tasks(1)).grads
    assert all(bool(g.isfinite().all()) for g in grads.values())
    assert any(g.abs().max() > 0 for n, g in grads.items() if "lora_A" in n)


# -- Meta-SGD ------------------------------------------------------------------------------------------


def hypergradient(model, params, task, **meta):
    result = learner(model, params, learn_inner_lr=True, meta_batch_size=1, **meta).meta_gradient([task])
    return result.grads["log_inner_lrs"].clone()


def fd_in_log_rate(model, names, task, steps, rate, optimizer, index, eps=1e-6):
    """∂/∂λ_index of L(φ_K; Q) with α = exp(λ), by central differences of the in-place inner loop."""

    def loss_at(delta):
        lrs = [rate * math.exp(delta if i == index else 0.0) for i in range(len(names))]
        m, _ = inplace_adapt(model, names, task, steps, lrs, optimizer)
        with torch.no_grad():
            return causal_lm_loss_tensors(m, task.query)[0].item()

    return (loss_at(eps) - loss_at(-eps)) / (2 * eps)


@pytest.mark.parametrize("optimizer,rate", [("sgd", INNER_LR), ("adam", ADAM_LR)])
def test_meta_sgd_fomaml_hypergradient_is_exact_for_one_inner_step(optimizer, rate, exact_fp64):
    """With K = 1, φ_1 = θ − α u(θ) and u does not depend on α: the first-order hypergradient is exact."""
    model, params = tiny_model("lora", attn="sdpa")
    task = random_tasks(1)[0]
    ours = hypergradient(model, params, task, inner_lr=rate, num_inner_steps=1, inner_optimizer=optimizer)
    names = list(params)
    for index in (0, 3, len(names) - 1):
        fd = fd_in_log_rate(model, names, task, 1, rate, optimizer, index)
        assert ours[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    assert ours.abs().max() > 1e-4


@pytest.mark.parametrize("optimizer,rate", [("sgd", INNER_LR), ("adam", ADAM_LR)])
def test_meta_sgd_fomaml_hypergradient_holds_the_inner_directions_fixed(optimizer, rate, exact_fp64):
    """For K > 1 the first-order hypergradient is ∂/∂λ_i of L(θ − exp(λ) ⊙ D; Q), D = Σ_k u_k the
    inner directions of the in-place loop held fixed; it differs from the exact (MAML) value."""
    model, params = tiny_model("lora", attn="sdpa")
    task = random_tasks(1)[0]
    names = list(params)
    ours = hypergradient(model, params, task, inner_lr=rate, num_inner_steps=K, inner_optimizer=optimizer)
    _, adapted = inplace_adapt(model, names, task, K, [rate] * len(names), optimizer)
    theta = [p.detach() for p in params.values()]
    directions = [(t - a.detach()) / rate for t, a in zip(theta, adapted)]

    def frozen(index, delta):
        m = full_logits_copy(model)
        own = dict(m.named_parameters())
        with torch.no_grad():
            for i, (n, t, d) in enumerate(zip(names, theta, directions)):
                own[n].copy_(t - rate * math.exp(delta if i == index else 0.0) * d)
            return causal_lm_loss_tensors(m, task.query)[0].item()

    for index in (0, 3, len(names) - 1):
        fd = (frozen(index, 1e-5) - frozen(index, -1e-5)) / 2e-5
        assert ours[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    exact = [fd_in_log_rate(model, names, task, K, rate, optimizer, i) for i in (0, 3)]
    assert max(abs(ours[i].item() - e) for i, e in zip((0, 3), exact)) > 1e-5


@pytest.mark.parametrize("optimizer,rate", [("sgd", INNER_LR), ("adam", ADAM_LR)])
def test_meta_sgd_maml_hypergradient_matches_finite_differences(optimizer, rate, exact_fp64, smooth_adam):
    model, params = tiny_model("lora", attn="sdpa")
    task = random_tasks(1)[0]
    ours = hypergradient(model, params, task, algorithm="maml", inner_lr=rate, num_inner_steps=2,
                         inner_optimizer=optimizer)
    names = list(params)
    for index in (0, 3, len(names) - 1):
        fd = fd_in_log_rate(model, names, task, 2, rate, optimizer, index)
        assert ours[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_meta_sgd_theta_gradient_is_fomaml_at_the_learned_rates_and_the_rates_take_an_adam_step():
    model, params = tiny_model("lora")
    tasks = random_tasks()
    meta = learner(model, params, learn_inner_lr=True, inner_lr_lr=0.05)
    with torch.no_grad():  # distinct per-tensor rates
        meta.log_inner_lrs.add_(torch.linspace(-0.5, 0.5, len(params), dtype=meta.log_inner_lrs.dtype))
    rates = meta.inner_lrs()
    result = meta.meta_gradient(tasks)
    ref = reference(model, list(params), tasks, K, list(rates.values()))
    assert max_err([result.grads[n] for n in params], ref) <= 1e-9
    assert result.metrics["meta/inner_lr_min"] == pytest.approx(min(rates.values()))
    assert result.metrics["meta/inner_lr_max"] == pytest.approx(max(rates.values()))
    assert result.metrics["meta/inner_lr_mean"] == pytest.approx(sum(rates.values()) / len(rates))

    hyper = result.grads["log_inner_lrs"].clone()
    before = meta.log_inner_lrs.detach().clone()
    extra = [{"params": [meta.log_inner_lrs], "lr": 0.05, "weight_decay": 0.0}]
    optimizer = build_optimizer(params, 1e-3, OptimConfig(weight_decay=0.1), extra_groups=extra)
    scheduler = build_scheduler(optimizer, OptimConfig(lr_scheduler="constant"), 10)
    meta.outer_step(optimizer, scheduler, clip_grad=1e-9)  # θ clipped to nothing; λ is not clipped
    step = meta.log_inner_lrs.detach() - before
    moved = hyper.abs() > 1e-4
    assert moved.sum() >= 3
    # Adam's first step is −lr · sign(h) where h ≠ 0 (no weight decay on λ).
    assert torch.allclose(step[moved], -0.05 * hyper[moved].sign(), rtol=1e-3, atol=1e-9)


def test_meta_sgd_refuses_reptile():
    with pytest.raises(ValueError, match="learn_inner_lr"):
        MetaConfig(algorithm="reptile", learn_inner_lr=True)


# -- diagnostics ---------------------------------------------------------------------------------------


def test_inner_progress_and_adaptation_benefit_are_the_losses_they_name():
    model, params = tiny_model("lora")
    tasks = random_tasks()
    result = learner(model, params).meta_gradient(tasks)
    names = list(params)
    progress, benefit = [], []
    for task in tasks:
        m, _ = inplace_adapt(model, names, task, K, [INNER_LR] * len(names), "sgd")
        with torch.no_grad():
            s0, q0 = causal_lm_loss_tensors(model, task.support[0])[0], causal_lm_loss_tensors(model, task.query)[0]
            progress.append(1 - (causal_lm_loss_tensors(m, task.support[0])[0] / s0).item())
            benefit.append((q0 - causal_lm_loss_tensors(m, task.query)[0]).item())
    assert result.metrics["meta/inner_progress"] == pytest.approx(sum(progress) / 2, rel=1e-9)
    assert result.metrics["meta/adaptation_benefit"] == pytest.approx(sum(benefit) / 2, rel=1e-9)
    assert result.task_metrics["task0/inner_progress"] == pytest.approx(progress[0], rel=1e-9)
    assert min(progress) > 0.01  # a working inner loop: the check is not comparing zeros
    quiet = learner(model, params).meta_gradient(tasks, diagnostics=False).metrics
    assert "meta/inner_progress" not in quiet and "meta/adaptation_benefit" not in quiet


def test_a_tiny_inner_lr_triggers_the_inert_warning_naming_meta_inner_lr(caplog):
    model, params = tiny_model("lora")
    tasks = random_tasks()
    inert = learner(model, params, inner_lr=1e-7).meta_gradient(tasks).metrics
    working = learner(model, params).meta_gradient(tasks).metrics
    assert abs(inert["meta/inner_progress"]) < 1e-5 < working["meta/inner_progress"]

    monitor = InertInnerLoopMonitor(1e-7, K, window=3)
    with caplog.at_level(logging.WARNING, logger="lora_maml"):
        assert [monitor.update(inert) for _ in range(4)] == [False, False, True, False]  # once, when full
    assert "meta.inner_lr" in caplog.text and "inert" in caplog.text
    caplog.clear()
    busy = InertInnerLoopMonitor(INNER_LR, K, window=3)
    with caplog.at_level(logging.WARNING, logger="lora_maml"):
        assert not any(busy.update(working) for _ in range(4))
        assert not any(InertInnerLoopMonitor(1e-7, 0, window=3).update(inert) for _ in range(4))  # K = 0 is on purpose
    assert caplog.text == ""


# -- defaults ----------------------------------------------------------------------------------------------


def test_inner_loop_defaults_depend_on_the_adapter_and_are_stated_in_the_config():
    from lora_maml.config import DEFAULT_INNER_LR, DEFAULT_INNER_OPTIMIZER

    lora, full = Config().meta, Config(meta={"adapter": "full"}).meta
    assert (lora.inner_optimizer, lora.inner_lr) == ("adam", DEFAULT_INNER_LR[("lora", "adam")])
    assert (full.inner_optimizer, full.inner_lr) == ("sgd", DEFAULT_INNER_LR[("full", "sgd")])
    assert DEFAULT_INNER_OPTIMIZER == {"lora": lora.inner_optimizer, "full": full.inner_optimizer}
    assert MetaConfig(inner_optimizer="sgd").inner_lr == DEFAULT_INNER_LR[("lora", "sgd")]
    assert MetaConfig(inner_lr=0.5).inner_lr == 0.5
    # The resolved values are what a saved config holds, and reloading it changes nothing.
    assert MetaConfig.model_validate(lora.model_dump()) == lora
