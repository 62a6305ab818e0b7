"""Statistics of paired few-shot comparisons: bootstrap means, paired differences, exact tests.

Data: per stratum (a task) a complete grid of E episodes x P problems (``correct`` 0/1 or an NLL);
NaN entries are left out of means. Two-way bootstrap: episodes AND problems resampled with replacement,
independently (the crossed design kept); ``resample_strata`` also draws the tasks (a three-level
bootstrap, for tasks that are themselves a sample). Percentile CIs at ``CONFIDENCE``; the paired
p-value is ``min(1, 2 (min(#{d* <= 0}, #{d* >= 0}) + 1) / (n_boot + 1))``. docs/evaluation.md has the story.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95


def seeded_rng(seed: int, *key: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, (seed, *key))).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _grid_means(grids: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator,
                resample_strata: bool = False) -> tuple[float, np.ndarray]:
    """Pooled mean of the finite entries of ``grids`` (strata, each [E, P]) and its two-way bootstrap;
    ``resample_strata`` also draws the strata (tasks) with replacement: a three-level bootstrap for
    tasks that are themselves a sample (a family's unseen tasks)."""
    num = np.zeros(n_boot)
    den = np.zeros(n_boot)
    total, count = 0.0, 0
    # How often each stratum is drawn per resample (all once when the strata are fixed).
    drawn = (rng.multinomial(len(grids), np.full(len(grids), 1.0 / len(grids)), size=n_boot).T if resample_strata
             else np.ones((len(grids), n_boot)))
    for grid, times in zip(grids, drawn):
        grid = np.asarray(grid, dtype=float)
        finite = np.isfinite(grid)
        values = np.where(finite, grid, 0.0)
        total += values.sum()
        count += int(finite.sum())
        e, p = grid.shape
        # Resampling with replacement = multinomial counts of how often each episode/problem is drawn.
        w_e = rng.multinomial(e, np.full(e, 1.0 / e), size=n_boot)
        w_p = rng.multinomial(p, np.full(p, 1.0 / p), size=n_boot)
        # Sum over the resampled grid = w_e^T grid w_p, per resample (matrix products, not a triple loop).
        num += times * ((w_e @ values) * w_p).sum(axis=1)
        den += times * ((w_e @ finite.astype(float)) * w_p).sum(axis=1)
    if count == 0:
        return math.nan, np.full(n_boot, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / count, num / den


def _ci(boot: np.ndarray) -> list[float]:
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return [math.nan, math.nan]
    alpha = (1 - CONFIDENCE) / 2
    return [float(np.quantile(boot, alpha)), float(np.quantile(boot, 1 - alpha))]


def bootstrap_mean(grids: Sequence[np.ndarray], *, n_boot: int, rng: np.random.Generator,
                   resample_strata: bool = False) -> dict:
    """``{"mean", "ci"}`` of the pooled mean of ``grids`` (see :func:`_grid_means`)."""
    mean, boot = _grid_means(grids, n_boot, rng, resample_strata)
    return {"mean": mean, "ci": _ci(boot)}


def paired_bootstrap(diffs: Sequence[np.ndarray], *, n_boot: int, rng: np.random.Generator,
                     resample_strata: bool = False) -> dict:
    """``{"diff", "ci", "p"}`` of the mean paired difference (grids of A - B; see the module docstring)."""
    mean, boot = _grid_means(diffs, n_boot, rng, resample_strata)
    boot = boot[np.isfinite(boot)]
    if not math.isfinite(mean) or boot.size == 0:
        return {"diff": mean, "ci": [math.nan, math.nan], "p": math.nan}
    tail = min(int((boot <= 0).sum()), int((boot >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (boot.size + 1))
    return {"diff": mean, "ci": _ci(boot), "p": p}


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """McNemar's exact test: ``{"a_only", "b_only", "p"}`` (two-sided binomial test on discordant pairs)."""
    from scipy.stats import binomtest

    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mcnemar_exact: {a.shape} vs {b.shape} paired outcomes")
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p": p}
