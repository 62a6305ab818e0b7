"""Report of a few-shot comparison: tables with confidence intervals, paired tests, plots.

Input: ``{method: rows}`` with the rows of :func:`lora_maml.eval.few_shot.evaluate_model` (one per
(episode, scored problem); every method evaluated on the same episodes, which is checked).

Statistics, per (task, n) cell and per method. The cell's data is a complete grid: E episodes (episode
seeds) x P problems (the task's fixed scored subset), each entry ``correct`` (0/1) or ``nll``.

* Mean ± 95% CI: the mean over the grid, and the 2.5/97.5 percentiles of its two-way bootstrap
  (episodes AND problems resampled with replacement, independently, ``n_boot`` times; the crossed design
  of "every episode scores every problem" is kept: a resample is the grid of the drawn episodes x the
  drawn problems). n = 0 has a single episode, so its CI is over problems only.
* "ALL" rows (one per n and section): pooled over the section's tasks, every (episode, problem) entry
  weighing the same; the bootstrap resamples within each task (stratified) and pools. The held-out
  section's tasks are a sample of unseen tasks, so its bootstrap draws the tasks too (with replacement,
  each draw of a task resampled on its own; ``resample_strata`` of :mod:`lora_maml.eval.stats`), as the
  experiment runner does for ``--eval-on holdout``; the meta-training tasks are fixed.
* Paired comparisons ``A vs B`` (``fomaml`` vs ``sft``, ``fomaml`` vs ``base``, ``sft`` vs ``base``, for
  the methods present): on the grid of differences A - B of the same (episode, problem) pairs,
  - paired bootstrap: mean difference, its 95% percentile CI (same two-way resampling), and the two-sided
    p-value ``min(1, 2 (min(#{d* <= 0}, #{d* >= 0}) + 1) / (n_boot + 1))`` (identical methods: p = 1);
  - McNemar's exact test on correctness: among the pairs where exactly one method is right, A-only = b and
    B-only = c; p = two-sided ``scipy.stats.binomtest(b, b + c, 0.5)`` (p = 1 when b + c = 0). It treats
    every (episode, problem) pair as independent, which repeated problems across episodes are not: the
    paired bootstrap is the one that accounts for that clustering.
* NLL entries that are missing (a reference with no target token left after truncation) are left out of
  means (the bootstrap weighs only finite entries); so are the rows of an invalid episode (its adaptation
  ended in non-finite weights or logits: ``invalid`` in the row), which are counted per cell
  (``invalid``), per method (``diagnostics``) and shown in every cell of results.md that has them.

Sections: tasks used in meta-training, and "adaptation to an unseen subject" for held-out tasks
(rows flagged ``holdout``). The bootstrap of a cell is seeded from (``seed``, section, task, n, metric):
every method and every paired difference of that cell uses the SAME resamples (common random numbers),
so identical methods get identical intervals, and the report is reproducible and independent of the
order of computation.

Files (each written to a temporary name and renamed): ``results.json`` (metadata, summary,
significance, all rows with their method), ``results.md``, ``few_shot_curve.png`` (accuracy and NLL
vs n per method, 95% CI bands; held-out subjects dashed), ``learning_curves.png`` (from training runs'
``metrics.jsonl``: meta/loss or sft/loss, meta/avg_adaptation_gap, {task}/query_loss, eval/loss_pre/post).

The meta-vs-SFT experiment (``recipes/meta_vs_sft.py``) renders its seed-pooled statistics
(:mod:`lora_maml.eval.stats`) with the same helpers: :func:`render_experiment_markdown`,
:func:`plot_experiment_curve`, :func:`plot_learning_curves`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lora_maml.atomic import naming, write_text_atomic
from lora_maml.eval.stats import CONFIDENCE, bootstrap_mean, mcnemar_exact, paired_bootstrap, seed_verdict, seeded_rng
from lora_maml.train.metrics import METRICS_FILE

log = logging.getLogger(__name__)

# A vs B pairs reported when both methods are present (maml / metasgd: the same demo with those flags;
# sft_tokens / sft_steps: the experiment's SFT matched in training tokens / optimizer steps; metaicl: MetaICL
# matched in training label tokens), in this order.
COMPARISONS = (("fomaml", "sft"), ("fomaml", "sft_tokens"), ("fomaml", "sft_steps"), ("fomaml", "base"),
               ("sft", "base"), ("sft_tokens", "base"), ("sft_steps", "base"), ("maml", "base"),
               ("metasgd", "base"), ("maml", "sft"), ("maml", "sft_tokens"), ("maml", "sft_steps"), ("metasgd", "sft"),
               ("metasgd", "sft_tokens"), ("metasgd", "sft_steps"), ("maml", "fomaml"), ("metasgd", "fomaml"),
               ("fomaml", "metaicl"), ("maml", "metaicl"), ("metasgd", "metaicl"), ("metaicl", "base"))
# Per-row metrics: (row key, report name, title). ``correct``/``strict`` come from generation (None when it
# was skipped); ``answer_*`` score the reference's final-answer tokens under teacher forcing.
METRICS = (("correct", "accuracy", "Accuracy (math-verify, generated answer)"),
           ("strict", "strict_accuracy", "Strict accuracy (generated answer)"),
           ("nll", "nll", "Reference NLL (lower is better)"),
           ("answer_accuracy", "answer_accuracy", "Answer-token accuracy (teacher forcing)"),
           ("answer_nll", "answer_nll", "Answer-token NLL (lower is better)"))
# A section with more tasks than this shows its ALL rows only in results.md (results.json has every row).
MAX_TASK_ROWS = 10
ALL = "ALL"
SECTIONS = (("meta_train", "Meta-training subjects"), ("holdout", "Adaptation to an unseen subject (held out of meta-training)"))


ICL = "_icl"  # suffix of a method scored with its shots in the prompt (in-context learning), no gradient step
META_LEARNERS = ("fomaml", "maml", "metasgd")


def comparisons(methods: Collection[str]) -> list[tuple[str, str]]:
    """The pairs of :data:`COMPARISONS` whose two methods are both in ``methods``: every meta-learner against
    every SFT baseline (and the base), and MAML / Meta-SGD against FOMAML; then, for in-context rows
    (:data:`ICL`): every meta-learner (adapted by gradient) against the base in context — the strongest obvious
    alternative — and against MetaICL in context, each method in context against itself adapted by gradient,
    and MetaICL in context against the base in context (what MetaICL training buys a prompt, Min et al. 2022)
    and against tuned SFT adapted by gradient (the best non-meta-learned way to adapt, when it is)."""
    pairs = [(a, b) for a, b in COMPARISONS if a in methods and b in methods]
    for rival in ("base" + ICL, "metaicl" + ICL):
        pairs += [(m, rival) for m in META_LEARNERS if m in methods and rival in methods]
    pairs += [(m + ICL, m) for m in methods if m + ICL in methods]
    pairs += [("metaicl" + ICL, rival) for rival in ("base" + ICL, "sft_tokens")
              if "metaicl" + ICL in methods and rival in methods]
    return list(dict.fromkeys(pairs))


# --- grids -----------------------------------------------------------------------------------
def _cells(rows: Sequence[dict]) -> dict[tuple[str, int], dict]:
    """(task, n) → {"seeds", "ids", "holdout", "shots": {seed: shot ids}, "invalid": rows marked invalid,
    "correct"/"strict"/"nll"/...: [E, P]}."""
    grouped: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["task"], int(row["n"])), []).append(row)
    cells = {}
    for (task, n), group in grouped.items():
        seeds = sorted({int(r["seed"]) for r in group})
        ids = sorted({r["id"] for r in group})
        if len(group) != len(seeds) * len(ids):
            raise ValueError(
                f"task {task!r}, n={n}: {len(group)} rows for {len(seeds)} episodes x {len(ids)} problems; "
                "every episode must score the same problems exactly once"
            )
        e_of, p_of = {s: i for i, s in enumerate(seeds)}, {pid: i for i, pid in enumerate(ids)}
        cell: dict[str, Any] = {"seeds": seeds, "ids": ids, "holdout": bool(group[0].get("holdout", False)), "shots": {},
                                "invalid": sum(1 for r in group if r.get("invalid"))}
        for key, _, _ in METRICS:
            cell[key] = np.full((len(seeds), len(ids)), np.nan)
        filled = np.zeros((len(seeds), len(ids)), dtype=bool)
        for r in group:
            i, j = e_of[int(r["seed"])], p_of[r["id"]]
            if filled[i, j]:
                raise ValueError(f"task {task!r}, n={n}, seed {r['seed']}: problem {r['id']!r} appears twice")
            filled[i, j] = True
            cell["shots"].setdefault(int(r["seed"]), tuple(r.get("shot_ids", ())))
            for key, _, _ in METRICS:  # None (not generated, no answer token, invalid) stays NaN: left out of means
                value = None if r.get("invalid") else r.get(key)
                cell[key][i, j] = math.nan if value is None else float(value)
        cells[(task, n)] = cell
    return cells


def _check_same_episodes(cells_by_method: Mapping[str, dict]) -> None:
    methods = list(cells_by_method)
    first = cells_by_method[methods[0]]
    for other in methods[1:]:
        cells = cells_by_method[other]
        if set(cells) != set(first):
            raise ValueError(f"methods {methods[0]!r} and {other!r} cover different (task, n): "
                             f"{sorted(set(first) ^ set(cells))[:5]}")
        for key, cell in first.items():
            for what in ("seeds", "ids", "shots"):
                if cells[key][what] != cell[what]:
                    raise ValueError(
                        f"methods {methods[0]!r} and {other!r} were not evaluated on the same episodes: task "
                        f"{key[0]!r}, n={key[1]} differ in {what}"
                    )


# --- the report ------------------------------------------------------------------------------
def build_report(rows_by_method: Mapping[str, Sequence[dict]], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """``{"methods", "n_boot", "seed", "confidence", "summary": [...], "significance": [...], "diagnostics"}``.

    summary rows: section, task (or ``ALL``), n, method, episodes, problems, invalid (rows), accuracy,
    accuracy_ci, strict_accuracy, strict_accuracy_ci, nll, nll_ci. significance rows: section, task, n, a,
    b, pairs, accuracy_diff, accuracy_diff_ci, accuracy_p, mcnemar {a_only, b_only, p}, nll_diff,
    nll_diff_ci, nll_p. diagnostics: per method, the fractions of unfinished generations and truncated
    references, and the number of invalid rows.
    """
    if not rows_by_method:
        raise ValueError("build_report: no methods")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    methods = list(rows_by_method)
    cells_by_method = {m: _cells(rows) for m, rows in rows_by_method.items()}
    empty = [m for m, cells in cells_by_method.items() if not cells]
    if empty:
        raise ValueError(f"build_report: no rows for {empty}")
    _check_same_episodes(cells_by_method)
    layout = cells_by_method[methods[0]]
    tasks = list(dict.fromkeys(task for task, _ in layout))
    shots = sorted({n for _, n in layout})
    section_tasks = {
        "meta_train": [t for t in tasks if not layout[(t, shots[0])]["holdout"]],
        "holdout": [t for t in tasks if layout[(t, shots[0])]["holdout"]],
    }
    pairs = comparisons(rows_by_method)

    summary, significance = [], []
    for section, _ in SECTIONS:
        for task in [*section_tasks[section], ALL] if section_tasks[section] else []:
            members = section_tasks[section] if task == ALL else [task]
            # Unseen tasks are a sample: their pooled CI covers the draw of tasks (one task: nothing to draw).
            sampled_tasks = section == "holdout"
            for n in shots:
                keys = [(t, n) for t in members if (t, n) in layout]
                if not keys:
                    continue
                for method in methods:
                    cells = [cells_by_method[method][k] for k in keys]
                    row = {"section": section, "task": task, "n": n, "method": method,
                           "episodes": max(len(c["seeds"]) for c in cells), "problems": sum(len(c["ids"]) for c in cells),
                           "invalid": sum(c["invalid"] for c in cells)}
                    for key, name, _ in METRICS:
                        stat = bootstrap_mean([c[key] for c in cells], n_boot=n_boot, rng=seeded_rng(seed, section, task, n, key),
                                              resample_strata=sampled_tasks)
                        row[name], row[f"{name}_ci"] = stat["mean"], stat["ci"]
                    summary.append(row)
                for a, b in pairs:
                    ca = [cells_by_method[a][k] for k in keys]
                    cb = [cells_by_method[b][k] for k in keys]
                    row = {"section": section, "task": task, "n": n, "a": a, "b": b,
                           "pairs": sum(c["correct"].size for c in ca)}
                    for key, name, _ in METRICS:
                        stat = paired_bootstrap([x[key] - y[key] for x, y in zip(ca, cb)], n_boot=n_boot,
                                                rng=seeded_rng(seed, section, task, n, key),
                                                resample_strata=sampled_tasks)
                        row[f"{name}_diff"], row[f"{name}_diff_ci"], row[f"{name}_p"] = stat["diff"], stat["ci"], stat["p"]
                    graded_a = np.concatenate([x["correct"].ravel() for x in ca])
                    graded_b = np.concatenate([y["correct"].ravel() for y in cb])
                    both = np.isfinite(graded_a) & np.isfinite(graded_b)
                    row["mcnemar"] = mcnemar_exact(graded_a[both] > 0.5, graded_b[both] > 0.5) if both.any() else None
                    significance.append(row)
    # Diagnostics: a generation cut at max_new_tokens usually has no final answer; a truncated reference
    # has an NLL over part of its solution only.
    diagnostics = {
        m: {"unfinished_generations": float(np.mean([not r.get("finished", True) for r in rows])),
            "truncated_references": float(np.mean([bool(r.get("truncated", False)) for r in rows])),
            "invalid_rows": sum(1 for r in rows if r.get("invalid"))}
        for m, rows in rows_by_method.items()
    }
    return {"methods": methods, "n_boot": n_boot, "seed": seed, "confidence": CONFIDENCE,
            "summary": summary, "significance": significance, "diagnostics": diagnostics}


def _fmt(value: float | None, ci: Sequence[float | None] | None = None, digits: int = 3, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(value, spec)
    if ci is not None and all(c is not None and math.isfinite(c) for c in ci):
        text += f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"
    return text


def _fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


ANSWER_METRICS = ("answer_accuracy", "answer_nll")
ANSWERS_ABSENT = ("**Answer metrics absent** (answer_accuracy, answer_nll): no scored reference has answer tokens; "
                  "records without answers are scored by NLL only.")


def _answers_absent(summary: Sequence[dict]) -> bool:
    """Whether no summary row has an answer-token metric (records without answers, NLL-only scoring)."""
    return not any(r[k] is not None and math.isfinite(r[k]) for r in summary for k in ANSWER_METRICS)


def _present(report: dict) -> list[tuple[str, str]]:
    """(name, title) of the metrics with at least one value (e.g. no generation: no accuracy)."""
    return [(name, title) for _, name, title in METRICS
            if any(r[name] is not None and math.isfinite(r[name]) for r in report["summary"])]


def render_markdown(report: dict) -> str:
    """``results.md``: per section, one table per metric and the paired comparisons; a section with more
    than :data:`MAX_TASK_ROWS` tasks shows its ALL rows only (every row is in results.json)."""
    methods = report["methods"]
    pct = int(round(report["confidence"] * 100))
    metrics = _present(report)
    lines = [
        "# Few-shot evaluation",
        "",
        f"Methods: {', '.join(methods)}. Every method is evaluated on the same episodes. Cells: mean "
        f"[{pct}% CI], two-way bootstrap over episodes and problems (B = {report['n_boot']}, seed {report['seed']}). "
        "Accuracy: math-verify equivalence of the last boxed answer of a greedy generation; strict: notational "
        "match; NLL: mean token negative log-likelihood of the reference solution at the adapted weights; "
        "answer-token accuracy / NLL: the tokens of the reference's final boxed answer alone, under teacher "
        "forcing (accuracy = the model ranks the reference token first). ALL pools the section's tasks (every "
        "episode x problem weighs the same); the CI of a held-out ALL row also draws the tasks (a sample of "
        "unseen tasks).",
        "",
        "Generations cut at --max-new-tokens without EOS: "
        + ", ".join(f"{m} {100 * report['diagnostics'][m]['unfinished_generations']:.1f}%" for m in methods)
        + "; reference solutions truncated to --max-length: "
        + ", ".join(f"{m} {100 * report['diagnostics'][m]['truncated_references']:.1f}%" for m in methods) + ".",
    ]
    invalid = {m: report["diagnostics"][m]["invalid_rows"] for m in methods}
    if _answers_absent(report["summary"]):
        lines += ["", ANSWERS_ABSENT]
    if any(invalid.values()):
        lines += ["", "**Invalid rows** (an adaptation that ended in non-finite weights or logits: not scored, left "
                  "out of every mean; a cell that has them says how many): "
                  + ", ".join(f"{m} {k}" for m, k in invalid.items() if k) + "."]
    for section, title in SECTIONS:
        rows = [r for r in report["summary"] if r["section"] == section]
        if not rows:
            continue
        tasks = {r["task"] for r in rows} - {ALL}
        shown = (lambda task: True) if len(tasks) <= MAX_TASK_ROWS else (lambda task: task == ALL)
        lines += ["", f"## {title}"]
        if len(tasks) > MAX_TASK_ROWS:
            lines += ["", f"{len(tasks)} tasks: ALL rows only (per-task rows in results.json)."]
        by_cell: dict[tuple, dict[str, dict]] = {}
        for r in rows:
            if shown(r["task"]):
                by_cell.setdefault((r["task"], r["n"]), {})[r["method"]] = r
        for name, title_ in metrics:
            lines += ["", f"### {title_}", "", "| task | n | episodes x problems | " + " | ".join(methods) + " |",
                      "|---|---:|---:|" + "---:|" * len(methods)]
            for (task, n), per_method in by_cell.items():
                first = per_method[methods[0]]
                cells = [_fmt(per_method[m][name], per_method[m][f"{name}_ci"])
                         + (f" ({per_method[m]['invalid']} invalid)" if per_method[m]["invalid"] else "")
                         for m in methods]
                lines.append(f"| {task} | {n} | {first['episodes']} x {first['problems']} | " + " | ".join(cells) + " |")
        sig = [r for r in report["significance"] if r["section"] == section and shown(r["task"])]
        if sig:
            lines += ["", "### Paired comparisons (A − B on the same episode x problem pairs; p: paired bootstrap)", "",
                      "| task | n | A vs B | " + " | ".join(f"Δ {t.split(' (')[0]} [{pct}% CI] | p" for _, t in metrics)
                      + " | McNemar A-only / B-only, p |",
                      "|---|---:|---|" + "---:|---:|" * len(metrics) + "---:|"]
            for r in sig:
                mc = r["mcnemar"]
                cells = [f"{_fmt(r[f'{name}_diff'], r[f'{name}_diff_ci'])} | {_fmt_p(r[f'{name}_p'])}" for name, _ in metrics]
                mcnemar = "–" if mc is None else f"{mc['a_only']} / {mc['b_only']}, {_fmt_p(mc['p'])}"
                lines.append(f"| {r['task']} | {r['n']} | {r['a']} vs {r['b']} | " + " | ".join(cells) + f" | {mcnemar} |")
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(tmp):  # matplotlib's failed write (a full disk) names no file
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shots_axis(ax, shots: Sequence[int], title: str) -> None:
    """A few-shot curve's axes: n on a symlog x axis (0 and 50 both readable), ticks at the shot counts."""
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(list(shots))
    ax.set_xticklabels([str(n) for n in shots])
    ax.set_xlabel("shots n")
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_few_shot_curve(report: dict, path: str | Path) -> Path:
    """Every metric with values vs n (ALL rows), one line per method with its CI band; held-out tasks dashed."""
    plt = _pyplot()
    path = Path(path)
    metrics = [(name, title) for name, title in _present(report) if name != "strict_accuracy"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), layout="constrained", squeeze=False)
    axes = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shots = sorted({r["n"] for r in report["summary"]})
    for (section, _), style in zip(SECTIONS, ("-", "--")):
        for i, method in enumerate(report["methods"]):
            rows = sorted((r for r in report["summary"]
                           if r["section"] == section and r["task"] == ALL and r["method"] == method), key=lambda r: r["n"])
            if not rows:
                continue
            x = [r["n"] for r in rows]
            label = method if section == "meta_train" else f"{method} (held-out)"
            for ax, (name, _) in zip(axes, metrics):
                y = [r[name] for r in rows]
                lo = [r[f"{name}_ci"][0] for r in rows]
                hi = [r[f"{name}_ci"][1] for r in rows]
                color = colors[i % len(colors)]
                ax.plot(x, y, style, marker="o", color=color, label=label)
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
    for ax, (_, title) in zip(axes, metrics):
        shots_axis(ax, shots, title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Few-shot adaptation, all tasks ({int(report['confidence'] * 100)}% CI)")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (or of ``<run dir>/metrics.jsonl``); unreadable lines skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--metrics-jsonl {path}: no such file")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line skipped", path, lineno)
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


TOKENS_AXIS = "train/label_tokens"  # cumulative training label tokens, logged by every training recipe


def _xy(records: Sequence[dict], key: str, x: str = "step") -> tuple[list[int], list[float]]:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    points = [(r[x], r[key]) for r in records if number(r.get(key)) and number(r.get(x))]
    return [s for s, _ in points], [v for _, v in points]


def plot_learning_curves(paths: Sequence[str | Path] | Mapping[str, str | Path], path: str | Path) -> Path | None:
    """Training curves of the runs' ``metrics.jsonl`` (files or run dirs; a mapping gives each run's label,
    else the run dir's name); None (nothing written) when they hold none of the curves.

    The x axis is the cumulative training label tokens (``train/label_tokens``) when every run logs them,
    so that a FOMAML run and an SFT run matched in tokens end at the same x; else the step.
    """
    if not isinstance(paths, Mapping):
        paths = {((Path(p) if Path(p).is_dir() else Path(p).parent).name or str(p)): p for p in paths}
    runs = [(label, read_metrics(p)) for label, p in paths.items()]
    x = TOKENS_AXIS if all(any(TOKENS_AXIS in r for r in recs) for _, recs in runs) else "step"

    panels: list[tuple[str, list[tuple[str, list[int], list[float], str]]]] = []
    loss = [(f"{label} {key}", *_xy(recs, key, x), "-") for label, recs in runs for key in ("meta/loss", "sft/loss")]
    gap = [(label, *_xy(recs, "meta/avg_adaptation_gap", x), "-") for label, recs in runs]
    task_keys = {label: sorted({k for r in recs for k in r if k.endswith("/query_loss") and not k.startswith(("meta/", "eval/"))})
                 for label, recs in runs}
    # Per-task curves of a family of hundreds of tasks would be a blot: only up to MAX_TASK_ROWS tasks.
    query = [(f"{label} {key.split('/')[0]}", *_xy(recs, key, x), "-") for label, recs in runs
             for key in task_keys[label] if len(task_keys[label]) <= MAX_TASK_ROWS]
    evals = [(f"{label} {key}", *_xy(recs, f"eval/{key}", x), style)
             for label, recs in runs for key, style in (("loss_pre", "--"), ("loss_post", "-"))]
    for title, lines in (("training loss (meta/loss = query loss after adaptation; sft/loss)", loss),
                         ("meta/avg_adaptation_gap (query − support loss)", gap),
                         ("per-task query loss", query), ("eval: test loss before (--) / after (—) adaptation", evals)):
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((title, lines))
    if not panels:
        log.warning("learning curves: none of %s has meta/*, sft/*, {task}/query_loss or eval/* metrics",
                    [str(p) for p in paths.values()])
        return None
    plt = _pyplot()
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    for ax, (title, lines) in zip(axes.flat, panels):
        for label, steps, values, style in lines:
            ax.plot(steps, values, style, label=label, linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training label tokens" if x == TOKENS_AXIS else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


# --- files -----------------------------------------------------------------------------------
def jsonable(value):
    """``value`` with NaN/inf as None and numpy scalars as Python numbers, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return jsonable(value.item())
    return value


def write_report(
    output_dir: str | Path,
    rows_by_method: Mapping[str, Sequence[dict]],
    *,
    metadata: dict | None = None,
    metrics_jsonl: Sequence[str | Path] | Mapping[str, str | Path] = (),
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Write results.json, results.md, few_shot_curve.png (+ learning_curves.png when ``metrics_jsonl``).

    Returns ``{"report", "markdown", "paths": {name: Path}}``.
    """
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(rows_by_method, n_boot=n_boot, seed=seed)
    markdown = render_markdown(report)
    results = {
        "metadata": metadata or {},
        **report,
        "rows": [{"method": m, **row} for m, rows in rows_by_method.items() for row in rows],
    }
    paths = {"results.json": out / "results.json", "results.md": out / "results.md"}
    write_text_atomic(paths["results.json"], json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n")
    write_text_atomic(paths["results.md"], markdown)
    paths["few_shot_curve.png"] = plot_few_shot_curve(report, out / "few_shot_curve.png")
    if metrics_jsonl:
        curves = plot_learning_curves(metrics_jsonl, out / "learning_curves.png")
        if curves is not None:
            paths["learning_curves.png"] = curves
    return {"report": report, "markdown": markdown, "paths": paths}


# --- the meta-vs-SFT experiment (recipes/meta_vs_sft.py) -------------------------------------
# Its inits and methods as its tables name them.
LABELS = {"base": "base", "fomaml": "FOMAML", "maml": "MAML", "metasgd": "Meta-SGD",
          "sft_steps": "SFT (matched steps)", "sft_tokens": "SFT (matched tokens)", "metaicl": "MetaICL"}
WRONG_CODE = "@wrong_code"  # an init adapted on another task's shots (the experiment's control)


def label(name: str) -> str:
    """How the tables name an init, a method, its wrong-code control or its in-context rows."""
    if name.endswith(WRONG_CODE):
        return f"{label(name.removesuffix(WRONG_CODE))} (wrong-code shots)"
    if name.endswith(ICL):
        return f"{label(name.removesuffix(ICL))} + ICL"
    return LABELS.get(name, name)
# The metrics scored without generating (evaluate_model(generate=False)), in the experiment's order; lower
# is better for LOWER_IS_BETTER (else higher); rows also carry "<key>_pre" (at the loaded weights) for PRE_ADAPTATION.
TEACHER_FORCED = ("nll", "answer_nll", "answer_accuracy")
LOWER_IS_BETTER = frozenset({"nll", "answer_nll"})
PRE_ADAPTATION = ("nll", "answer_nll")


def series_names() -> list[tuple[str, bool]]:
    """(name, lower is better) of every series the experiment reports: the teacher-forced metrics, then the
    gain ``<metric>_gain = <metric>_pre - <metric>`` (higher is better) of those with a pre value."""
    return [(m, m in LOWER_IS_BETTER) for m in TEACHER_FORCED] + [(f"{m}_gain", False) for m in PRE_ADAPTATION]


def verdict_text(row: dict, metric: str) -> str:
    """The verdict of a comparison row (:func:`lora_maml.eval.stats.seed_verdict`) in words."""
    outcome = seed_verdict(row, metric, dict(series_names())[metric])
    if outcome in ("better", "worse"):
        if row["b"] == row["a"] + WRONG_CODE:  # the control: the same init, adapted on another task's shots
            return f"right-task shots {outcome}"
        return f"{label(row['a'])} init {outcome}"
    return {"seeds disagree": "not distinguishable: the 95% CI excludes 0 but the training seeds disagree in sign",
            "not distinguishable": "not distinguishable at 95%", "no CI": "no 95% CI"}[outcome]


def verdict_line(row: dict, metric: str) -> str:
    return (f"n={row['n']}: {label(row['a'])} vs {label(row['b'])}: {row['verdict']} on {metric} "
            f"({row['a']} − {row['b']} {_fmt(row[f'{metric}_diff'], row[f'{metric}_diff_ci'], sign=True)}, "
            f"p {_fmt_p(row[f'{metric}_p'])})")


def experiment_methods(result: dict) -> list[str]:
    """The experiment's rows in its tables and plot: the base and every method, then those of them scored with
    the shots in the prompt too (``result["icl"]``, a list of method names)."""
    methods = ["base", *result["methods"]]
    return methods + [m + ICL for m in methods if m in (result.get("icl") or [])]


def render_experiment_markdown(result: dict) -> str:
    """``results.md`` of the experiment: the floor, each init's adaptation (chosen on validation tasks), the
    summary per init and n, the paired comparisons, the wrong-code control and the verdicts."""
    s = result["settings"]
    headline = ("answer_accuracy", "answer_nll", "nll")
    validation = (f", {len(result['validation_tasks'])} validation tasks for tuning only"
                  if result["validation_tasks"] else "")
    lines = [
        "# Meta-learning vs multi-task SFT as an initialisation for few-shot adaptation", "",
        f"Config `{result['config']}`, training seeds {result['seeds']}, tasks: {s['eval_on']} "
        f"({len(result['test_tasks'])} reported{validation}), {result['episodes']} episodes per task and n, "
        f"{result['test_per_episode']} scored problems per task. answer_accuracy: fraction of the final answer's "
        "tokens the model ranks first (teacher forcing); answer_nll / nll: mean token NLL of the answer / the whole "
        "reference solution (lower is better). Means over every (seed, episode, problem); [95% CI]: bootstrap of "
        f"episodes and problems within tasks{', and of the tasks' if s['eval_on'] == 'holdout' else ''} "
        f"(B = {result['n_boot']}). Method rows pool their seeds.", "",
    ]
    if _answers_absent(result["summary"]):
        lines += [ANSWERS_ABSENT, ""]
    floor = result.get("floor")
    if floor:
        lines += [f"**Floor** (exact, the Bayes-optimal code-agnostic predictor of exactly the scored tokens): answer_accuracy "
                  f"{floor['accuracy']:.3f}, answer_nll {floor['nll']:.3f}. No init can beat it without reading the "
                  "task from its shots.", ""]
    if result.get("pretrain"):
        p = result["pretrain"]
        lines += [f"Base: pretrained on all weights for {p['steps']} steps on `{p['source']}` "
                  f"(last training loss {p['last_loss']:.4f}).", ""]
    for method, sweep in (result.get("sft_sweep") or {}).items():
        lines += [f"{label(method)}: learning rate {sweep['chosen_lr']:g} chosen on the validation tasks "
                  f"({sweep['criterion']}: " + ", ".join(f"{lr} → {_fmt(v)}" for lr, v in sweep["validation"].items())
                  + ").", ""]
    adaptation = result.get("adaptation") or {}
    if adaptation:
        tuned = next((a["criterion"] for a in adaptation.values() if "criterion" in a), None)
        lines += [f"Adaptation ({s['adapt_optimizer']}, full-batch steps over the n shots, micro-batches of "
                  f"{s['adapt_batch_size']})" + (f", chosen per init on the validation tasks at n = {result['tune_n']} "
                  f"(best {tuned}) from " + " ".join(s["adapt_grid"]) if tuned else "") + ": "
                  + "; ".join(f"{name} lr {a['lr']}, {a['steps']} steps" for name, a in adaptation.items()) + ".", ""]
    methods = experiment_methods(result)
    if result.get("icl"):
        lines += ["*+ ICL*: the n shots in the prompt (earlier chat turns), no gradient step.", ""]
    lines += [f"| method: {' / '.join(headline)} | " + " | ".join(f"n = {n}" for n in result["n_shots"]) + " |",
              "|---|" + "---:|" * len(result["n_shots"])]
    by = {(r["init"], r["n"]): r for r in result["summary"]}
    for m in methods:
        cells = [" / ".join(_fmt(by[(m, n)][k]) for k in headline) for n in result["n_shots"]]
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    if floor:
        above = [f"{label(m)} at n={n}" for m in methods for n in result["n_shots"]
                 if (by[(m, n)]["answer_accuracy_ci"][0] or 0) > floor["accuracy"]]
        lines += ["", "Above the floor (95% CI of answer_accuracy entirely above it): "
                  + (", ".join(above) if above else "none") + "."]
    lines += ["", "Paired differences A − B (seed s with seed s, the same episode and problem) [95% CI]:", ""]
    lines += _comparison_table(result["comparisons"], result["verdict_metric"], headline)
    control = result.get("control")
    if control:
        lines += ["", f"**Control**: every init adapted on n = {control['n']} shots of ANOTHER unseen task (its "
                  "scored problems unchanged). A gain that comes from reading the task from its shots vanishes here.",
                  "", "| init | " + " / ".join(headline) + " |", "|---|---:|"]
        lines += [f"| {label(r['init'])} | " + " / ".join(_fmt(r[k], r[f'{k}_ci']) for k in headline) + " |"
                  for r in control["summary"]]
        lines += ["", "Right-task shots − wrong-task shots:", ""]
        lines += _comparison_table(control["comparisons"], result["verdict_metric"], headline)
    lines += ["", *(f"- {v}" for v in result["verdicts"]), "",
              "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings_s"].items())]
    return "\n".join(lines) + "\n"


def _comparison_table(rows: Sequence[dict], metric: str, headline: Sequence[str]) -> list[str]:
    lines = ["| A − B | n | " + " | ".join(f"Δ {k}" for k in headline) + f" | Δ nll gain | per seed ({metric}) "
             "| verdict |", "|---|---:|" + "---:|" * (len(headline) + 2) + "---|"]
    for r in rows:
        per_seed = ", ".join(_fmt(d, sign=True) for d in r[f"{metric}_diff_by_seed"].values())
        cells = [_fmt(r[f"{k}_diff"], r[f"{k}_diff_ci"], sign=True) for k in (*headline, "nll_gain")]
        lines.append(f"| {label(r['a'])} − {label(r['b'])} | {r['n']} | " + " | ".join(cells)
                     + f" | {per_seed} | {r['verdict']} |")
    return lines


def plot_experiment_curve(result: dict, path: str | Path) -> Path:
    """The experiment's ``few_shot_curve.png``: every teacher-forced metric vs n per method (seeds pooled),
    95% CI bands."""
    plt = _pyplot()
    path = Path(path)
    fig, axes = plt.subplots(1, len(TEACHER_FORCED), figsize=(5 * len(TEACHER_FORCED), 4), layout="constrained")
    colors: dict[str, str] = {}
    for method in experiment_methods(result):
        rows = sorted((r for r in result["summary"] if r["init"] == method), key=lambda r: r["n"])
        x = [r["n"] for r in rows]
        gradient = method.removesuffix(ICL)
        for ax, metric in zip(axes, TEACHER_FORCED):
            y = [r[metric] if r[metric] is not None else math.nan for r in rows]
            # A method in context: its colour, dashed.
            line, = ax.plot(x, y, marker="o", label=label(method), color=colors.get(gradient),
                            linestyle="--" if method.endswith(ICL) else "-")
            colors.setdefault(gradient, line.get_color())
            lo = [r[f"{metric}_ci"][0] for r in rows]
            hi = [r[f"{metric}_ci"][1] for r in rows]
            keep = [i for i in range(len(x)) if lo[i] is not None and hi[i] is not None]
            ax.fill_between([x[i] for i in keep], [lo[i] for i in keep], [hi[i] for i in keep],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    control = result.get("control")
    for row in (control or {}).get("summary", []):
        for ax, metric in zip(axes, TEACHER_FORCED):
            ax.plot([control["n"]], [row[metric]], marker="x", linestyle="none", color="grey")
    floor = result.get("floor")
    for ax, metric in zip(axes, TEACHER_FORCED):
        if floor and metric in ("answer_accuracy", "answer_nll"):
            ax.axhline(floor[metric.removeprefix("answer_")], color="black", linestyle=":", linewidth=1,
                       label="floor (exact)")
        shots_axis(ax, result["n_shots"], metric)
    if control:
        axes[-1].plot([], [], marker="x", linestyle="none", color="grey", label="wrong-code shots (control)")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels, never over a curve
    fig.suptitle(f"Few-shot adaptation ({result['settings']['eval_on']} tasks, 95% CI)")
    _save_figure(fig, path)
    plt.close(fig)
    return path
