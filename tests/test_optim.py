"""apply_gradients: a step that would put a non-finite value into a weight never happens."""

import torch

from lora_maml.config import OptimConfig
from lora_maml.optim import apply_gradients, build_optimizer, build_scheduler

# Near the top of fp32's range (3.4e38): an Adam step of lr 3e37 away from 0 overflows them to +-inf.
# (A larger lr fails inside torch instead: its step size lr / (1 - beta1^t) must itself fit in fp32.)
HUGE = [3.3e38, -3.3e38, 0.5]
GRAD = [-0.5, 0.5, 0.25]  # Adam moves each weight against its gradient: the first two away from 0


def _setup():
    p = torch.nn.Parameter(torch.tensor(HUGE))
    cfg = OptimConfig(lr_scheduler="constant")
    optimizer = build_optimizer([p], 1e-2, cfg)
    return p, optimizer, build_scheduler(optimizer, cfg, 10)


def _overflowing_step(p, optimizer, scheduler) -> dict:
    for group in optimizer.param_groups:
        group["lr"] = 3e37
    p.grad = torch.tensor(GRAD)
    return apply_gradients([p], optimizer, scheduler, 1.0)


def test_an_update_that_overflows_a_weight_is_rolled_back_and_counted_as_skipped():
    """A finite gradient whose update overflows a weight: the step is skipped and the weights, Adam's
    moments and step count, and the schedule are exactly as before it."""
    p, optimizer, scheduler = _setup()
    p.grad = torch.tensor(GRAD)
    assert apply_gradients([p], optimizer, scheduler, 1.0)["skipped_step"] == 0.0
    weights = p.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[p].items()}
    update = _overflowing_step(p, optimizer, scheduler)
    assert update["skipped_step"] == 1.0 and update["grad_norm"] < 1
    assert torch.equal(p.detach(), weights)
    assert set(optimizer.state[p]) == set(state)
    assert all(torch.equal(optimizer.state[p][k], v) for k, v in state.items())
    assert scheduler.last_epoch == 1 and p.grad is None

    # On the very first step there is no Adam state yet: the rollback leaves none.
    p, optimizer, scheduler = _setup()
    assert _overflowing_step(p, optimizer, scheduler)["skipped_step"] == 1.0
    assert torch.equal(p.detach(), torch.tensor(HUGE)) and p not in optimizer.state and scheduler.last_epoch == 0
