"""Warn when the inner loop is inert: adapting no longer changes the query loss.

With too small an inner learning rate for the adapter (e.g. the full-fine-tuning 1e-4 on LoRA
weights, whose B starts at 0), φ_K ≈ θ and FOMAML silently degenerates into SFT on the query
batches. The meta-learner logs ``meta/adaptation_benefit`` = L(θ; Q) − L(φ_K; Q) on logging steps;
this monitor watches it relative to L(θ; Q).
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger("lora_maml")


class InertInnerLoopMonitor:
    """Warn once when the mean relative adaptation benefit of the last ``window`` logged meta-steps
    is below ``threshold`` (default: adapting changes the query loss by < 0.1 %)."""

    def __init__(self, inner_lr: float, num_inner_steps: int, *, window: int = 20, threshold: float = 1e-3):
        self.inner_lr, self.num_inner_steps = inner_lr, num_inner_steps
        self.threshold = threshold
        self.recent: deque[float] = deque(maxlen=window)
        self.warned = False

    def update(self, metrics: dict[str, float]) -> bool:
        """Feed one step's ``meta/*`` metrics; returns True when this call warned."""
        if self.warned or self.num_inner_steps == 0 or "meta/adaptation_benefit" not in metrics:
            return False  # K = 0 is multi-task training on purpose; steps without diagnostics say nothing
        pre = metrics["meta/query_loss_pre"]
        self.recent.append(metrics["meta/adaptation_benefit"] / pre if pre > 0 else 0.0)
        if len(self.recent) < self.recent.maxlen:
            return False
        mean = sum(self.recent) / len(self.recent)
        if abs(mean) >= self.threshold:
            return False
        self.warned = True
        progress = metrics.get("meta/inner_progress", float("nan"))
        log.warning(
            "the inner loop is inert: over the last %d logged meta-steps, %d inner steps changed the query loss by "
            "%.4f%% on average (meta/adaptation_benefit; the last support-loss drop, meta/inner_progress, was %.4f%%). "
            "FOMAML is then plain SFT on the query batches. Raise meta.inner_lr (now %g) or use "
            "meta.inner_optimizer=adam; see benchmarks/calibrate_inner_lr.py.",
            len(self.recent), self.num_inner_steps, 100 * mean, 100 * progress, self.inner_lr,
        )
        return True
