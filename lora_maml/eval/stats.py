"""Statistics of paired few-shot comparisons: bootstrap means, paired differences, exact tests.

Data: per stratum (a task) a complete grid of E episodes x P problems (``correct`` 0/1 or an NLL);
NaN entries are left out of means. Two-way bootstrap: episodes AND problems resampled with replacement,
independently (the crossed design kept); ``resample_strata`` also draws the tasks (a three-level
bootstrap, for tasks that are themselves a sample): a task drawn k times in a resample contributes k
independent resamples of its grid, as drawing k tasks would. Percentile CIs at ``CONFIDENCE``; the paired
p-value is ``min(1, 2 (min(#{d* <= 0}, #{d* >= 0}) + 1) / (n_boot + 1))``. docs/evaluation.md has the story.

Trained inits compared over training seeds (the meta-vs-SFT experiment): values are keyed
``(n, task, episode seed, problem id)``; a grid entry is the mean over the seeds of that (episode,
problem), and a paired difference A - B pairs seed s of A with seed s of B. The bootstrap covers
episodes and problems, not training runs, so a verdict also needs every seed's paired mean on one side.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

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
             else np.ones((len(grids), n_boot), dtype=int))
    for grid, times in zip(grids, drawn):
        grid = np.asarray(grid, dtype=float)
        finite = np.isfinite(grid)
        values = np.where(finite, grid, 0.0)
        total += values.sum()
        count += int(finite.sum())
        e, p = grid.shape
        # One within-stratum resample per draw of the stratum: drawn k times in resample b, it adds k
        # independent resamples of its grid to b (``owner``: the resample each draw belongs to). With
        # fixed strata that is one per resample, in order.
        owner = np.repeat(np.arange(n_boot), times)
        # Resampling with replacement = multinomial counts of how often each episode/problem is drawn.
        w_e = rng.multinomial(e, np.full(e, 1.0 / e), size=owner.size)
        w_p = rng.multinomial(p, np.full(p, 1.0 / p), size=owner.size)
        # Sum over the resampled grid = w_e^T grid w_p, per draw (matrix products, not a triple loop).
        num += np.bincount(owner, weights=((w_e @ values) * w_p).sum(axis=1), minlength=n_boot)
        den += np.bincount(owner, weights=((w_e @ finite.astype(float)) * w_p).sum(axis=1), minlength=n_boot)
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


# --- trained inits compared over training seeds ----------------------------------------------------
def finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite ``values``; NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def paired_values(rows_by_init: Mapping[str, Sequence[dict]], keys: Sequence[str]) -> dict[str, dict[tuple, dict[str, float]]]:
    """``{init: {(n, task, episode seed, problem id): {key: value}}}`` of the rows' ``keys`` (None: NaN).
    Raises ValueError for a pair scored twice, or inits not scored on the same (episode, problem) set."""
    values = {}
    for init, rows in rows_by_init.items():
        table = {}
        for r in rows:
            pair = (int(r["n"]), r["task"], int(r["seed"]), r["id"])
            if pair in table:
                raise ValueError(f"init {init!r}: (n, task, episode, problem) {pair} scored twice")
            table[pair] = {k: math.nan if r.get(k) is None else float(r[k]) for k in keys}
        values[init] = table
    first = next(iter(values))
    for init, table in values.items():
        if table.keys() != values[first].keys():
            raise ValueError(f"inits {first!r} and {init!r} were not scored on the same (episode, problem) set: "
                             f"{sorted(table.keys() ^ values[first].keys())[:3]}")
    return values


def seed_grids(values: Mapping[tuple, float], n: int) -> list[np.ndarray]:
    """Per task, the [episodes x problems] grid of ``values`` (keys (n, task, episode seed, problem id, ...))
    at ``n``, each entry the mean over the training seeds of that (episode, problem). Every episode of a task
    scores the same problems (the plan's), so the grids are complete; NaN entries (a reference without
    answer tokens) are left out of the means downstream."""
    cells: dict[str, dict[tuple[int, str], list[float]]] = {}
    for key, value in values.items():
        if key[0] == n:
            cells.setdefault(key[1], {}).setdefault((key[2], key[3]), []).append(value)
    out = []
    for _, per_cell in sorted(cells.items()):
        episodes = sorted({e for e, _ in per_cell})
        problems = sorted({p for _, p in per_cell})
        grid = np.full((len(episodes), len(problems)), np.nan)
        for (e, p), seeds in per_cell.items():
            grid[episodes.index(e), problems.index(p)] = finite_mean(seeds)
        out.append(grid)
    return out


def series_value(entry: Mapping[str, float], name: str) -> float:
    """``entry[name]``; a ``<metric>_gain`` is ``<metric>_pre - <metric>``: what adaptation gained."""
    if name.endswith("_gain"):
        metric = name.removesuffix("_gain")
        return entry[f"{metric}_pre"] - entry[metric]
    return entry[name]


def _shots_rng(boot_seed: int, n: int) -> np.random.Generator:
    # One stream per n for every init, comparison and series: identical grid shapes -> identical resamples.
    return np.random.default_rng([boot_seed, n])


def pooled_summary(values: Mapping[str, Mapping[tuple, Mapping[str, float]]], units: Mapping[str, Sequence[str]],
                   n_shots: Sequence[int], series: Sequence[str], *, n_boot: int, boot_seed: int,
                   sampled_tasks: bool = False) -> list[dict]:
    """Per unit (a name → the inits it pools, e.g. a method's seeds) and n: ``{"init", "seeds", "n",
    <series>, <series>_ci, ..., "rows"}``, the bootstrap mean of each series over the seed-averaged grids.
    ``sampled_tasks``: the tasks are a sample of a family (unseen tasks), so the bootstrap draws them too."""
    summary = []
    for unit, inits in units.items():
        for n in sorted(n_shots):
            row = {"init": unit, "seeds": len(inits), "n": n}
            for name in series:
                flat = {(*key, init): series_value(v, name) for init in inits for key, v in values[init].items()}
                stat = bootstrap_mean(seed_grids(flat, n), n_boot=n_boot, rng=_shots_rng(boot_seed, n),
                                      resample_strata=sampled_tasks)
                row[name], row[f"{name}_ci"] = stat["mean"], stat["ci"]
            row["rows"] = sum(1 for init in inits for key in values[init] if key[0] == n)
            summary.append(row)
    return summary


def seed_paired_comparisons(values: Mapping[str, Mapping[tuple, Mapping[str, float]]],
                            pairs: Sequence[tuple[str, str]], inits: Mapping[str, Mapping[int, str]],
                            n_shots: Sequence[int], series: Sequence[str], *, n_boot: int, boot_seed: int,
                            sampled_tasks: bool = False) -> list[dict]:
    """Per pair (A, B) of methods and n: the paired bootstrap of A - B for each series, seed s of A with
    seed s of B (``inits``: method → {training seed: init}) on the same episode and problem:
    ``{"a", "b", "n", <series>_diff, _diff_ci, _p, _diff_by_seed (seed → that seed's mean), "pairs"}``."""
    rows = []
    for a, b in pairs:
        seeds = list(inits[a])
        if list(inits[b]) != seeds:
            raise ValueError(f"methods {a!r} and {b!r} were trained with other seeds: {seeds} vs {list(inits[b])}")
        for n in sorted(n_shots):
            row = {"a": a, "b": b, "n": n}
            for name in series:
                diffs = {}
                for s in seeds:
                    va, vb = values[inits[a][s]], values[inits[b][s]]
                    for key, entry in va.items():
                        diffs[(*key, s)] = series_value(entry, name) - series_value(vb[key], name)
                stat = paired_bootstrap(seed_grids(diffs, n), n_boot=n_boot, rng=_shots_rng(boot_seed, n),
                                        resample_strata=sampled_tasks)
                row[f"{name}_diff"], row[f"{name}_diff_ci"], row[f"{name}_p"] = stat["diff"], stat["ci"], stat["p"]
                # The bootstrap resamples episodes, not training runs: the per-seed means show the seeds' spread.
                row[f"{name}_diff_by_seed"] = {
                    str(s): finite_mean(d for key, d in diffs.items() if key[0] == n and key[-1] == s) for s in seeds
                }
                row["pairs"] = sum(1 for key in diffs if key[0] == n)
            rows.append(row)
    return rows


def seed_verdict(row: Mapping, metric: str, lower_is_better: bool) -> str:
    """On ``metric`` of a :func:`seed_paired_comparisons` row: ``better`` or ``worse`` (A than B) when the
    CI of A - B excludes 0 AND every training seed's paired mean lies on the same side (the CI does not
    cover the seed-to-seed spread of training); else ``seeds disagree`` (the CI alone excludes 0),
    ``not distinguishable`` or ``no CI``."""
    lo, hi = row[f"{metric}_diff_ci"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "no CI"
    if not (hi < 0 or lo > 0):
        return "not distinguishable"
    by_seed = list(row[f"{metric}_diff_by_seed"].values())
    if not (all(d < 0 for d in by_seed) if hi < 0 else all(d > 0 for d in by_seed)):
        return "seeds disagree"
    return "better" if (hi < 0) == lower_is_better else "worse"
