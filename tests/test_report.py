"""The few-shot report: bootstrap CIs, paired tests and files, on synthetic rows with known answers."""

import json
import math

import numpy as np
import pytest

from lora_maml.eval import report
from lora_maml.eval.report import build_report, render_markdown, write_report
from lora_maml.eval.stats import bootstrap_mean, mcnemar_exact, paired_bootstrap

N_BOOT = 999


def make_rows(correct, *, tasks=("algebra", "geometry"), shots=(0, 2), seeds=(0, 1), problems=10, holdout=(), nll=None):
    """Complete rows: ``correct(task, n, seed, problem_index) -> bool``, ``nll(...) -> float | None``."""
    rows = []
    for task in tasks:
        for n in shots:
            for seed in seeds[:1] if n == 0 else seeds:
                for i in range(problems):
                    rows.append({
                        "task": task, "n": n, "seed": seed, "holdout": task in holdout, "id": f"{task}/{i}",
                        "shot_ids": [f"{task}/s{seed}-{k}" for k in range(n)],
                        "nll": 1.0 + i / problems if nll is None else nll(task, n, seed, i),
                        "tokens": 5, "correct": bool(correct(task, n, seed, i)), "strict": False,
                    })
    return rows


def rng():
    return np.random.default_rng(0)


def test_constant_grid_has_a_zero_width_interval():
    stat = bootstrap_mean([np.full((3, 7), 0.25)], n_boot=N_BOOT, rng=rng())
    assert stat["mean"] == 0.25 and stat["ci"] == [0.25, 0.25]


def test_interval_over_problems_matches_the_normal_approximation():
    grid = np.array([[1.0] * 200 + [0.0] * 200])  # one episode, p = 0.5, P = 400
    stat = bootstrap_mean([grid], n_boot=4000, rng=rng())
    half = 1.96 * math.sqrt(0.25 / 400)
    assert stat["mean"] == 0.5
    assert stat["ci"][0] == pytest.approx(0.5 - half, abs=0.01)
    assert stat["ci"][1] == pytest.approx(0.5 + half, abs=0.01)


def test_episodes_are_resampled_too():
    # Every problem is right in episode 0 and wrong in episode 1: resampling problems alone would give a
    # zero-width interval; resampling episodes gives all-0 or all-1 grids a quarter of the time each.
    grid = np.array([[1.0] * 20, [0.0] * 20])
    stat = bootstrap_mean([grid], n_boot=N_BOOT, rng=rng())
    assert stat["mean"] == 0.5 and stat["ci"] == [0.0, 1.0]


def test_identical_methods_are_not_different():
    rows = make_rows(lambda t, n, s, i: (i * 7 + s) % 3 == 0)
    result = build_report({"fomaml": rows, "sft": [dict(r) for r in rows]}, n_boot=N_BOOT)
    strip = [{k: v for k, v in r.items() if k != "method"} for r in result["summary"]]
    assert strip[0::2] == strip[1::2]  # same resamples for every method: identical methods, identical CIs
    assert result["significance"]
    for sig in result["significance"]:
        assert sig["accuracy_diff"] == 0 and sig["accuracy_diff_ci"] == [0.0, 0.0] and sig["accuracy_p"] == 1.0
        assert sig["nll_diff"] == 0 and sig["nll_p"] == 1.0
        assert sig["mcnemar"] == {"a_only": 0, "b_only": 0, "p": 1.0}


def test_always_right_where_the_other_is_wrong_is_significant():
    a = make_rows(lambda t, n, s, i: True)
    b = make_rows(lambda t, n, s, i: False)
    result = build_report({"fomaml": a, "base": b}, n_boot=N_BOOT)
    cell = next(s for s in result["significance"] if s["task"] == "algebra" and s["n"] == 2)
    assert cell["a"] == "fomaml" and cell["b"] == "base" and cell["pairs"] == 20
    assert cell["accuracy_diff"] == 1.0 and cell["accuracy_diff_ci"] == [1.0, 1.0]
    assert cell["accuracy_p"] == pytest.approx(2 / (N_BOOT + 1))  # no resample reaches 0
    assert cell["mcnemar"] == {"a_only": 20, "b_only": 0, "p": pytest.approx(2 * 0.5**20)}
    every = next(s for s in result["significance"] if s["task"] == "ALL" and s["n"] == 2)
    assert every["pairs"] == 40 and every["mcnemar"]["a_only"] == 40


def test_a_partial_advantage_is_estimated_and_significant():
    a = make_rows(lambda t, n, s, i: True)
    b = make_rows(lambda t, n, s, i: i >= 6)  # wrong on 6 of the 10 problems, right on the others
    result = build_report({"fomaml": a, "sft": b}, n_boot=N_BOOT)
    cell = next(s for s in result["significance"] if s["task"] == "algebra" and s["n"] == 2)
    assert cell["accuracy_diff"] == pytest.approx(0.6)
    assert 0 < cell["accuracy_diff_ci"][0] < 0.6 < cell["accuracy_diff_ci"][1] <= 1
    assert cell["accuracy_p"] < 0.01
    assert cell["mcnemar"]["a_only"] == 12 and cell["mcnemar"]["b_only"] == 0
    assert cell["mcnemar"]["p"] == pytest.approx(2 * 0.5**12)


def test_paired_bootstrap_sign_and_mcnemar_symmetry():
    diff = paired_bootstrap([np.array([[-1.0, 0.0] * 10] * 2)], n_boot=N_BOOT, rng=rng())
    assert diff["diff"] == -0.5 and diff["ci"][1] < 0 and diff["p"] < 0.01
    a, b = [True, False, False, True], [False, True, True, False]
    base = mcnemar_exact(a, b)
    assert base == {"a_only": 2, "b_only": 2, "p": pytest.approx(1.0)}
    # Concordant pairs carry no information; swapping the methods swaps the counts, not the p-value.
    assert mcnemar_exact(a + [True, False], b + [True, False]) == base
    lopsided = mcnemar_exact([True] * 7 + [False], [False] * 7 + [True])
    assert lopsided["p"] == pytest.approx(mcnemar_exact([False] * 7 + [True], [True] * 7 + [False])["p"])
    assert lopsided["p"] == pytest.approx(2 * (1 + 8) / 2**8)  # P(X <= 1) + P(X >= 7), X ~ Bin(8, 1/2)


def test_summary_all_row_pools_every_entry_and_skips_missing_nll():
    rows = make_rows(lambda t, n, s, i: t == "algebra" and i < 5,
                     nll=lambda t, n, s, i: None if i == 0 else float(i))
    result = build_report({"sft": rows}, n_boot=N_BOOT)
    every = next(r for r in result["summary"] if r["task"] == "ALL" and r["n"] == 2)
    subset = [r for r in rows if r["n"] == 2]
    assert every["accuracy"] == pytest.approx(np.mean([r["correct"] for r in subset])) == 0.25
    assert every["nll"] == pytest.approx(np.mean([r["nll"] for r in subset if r["nll"] is not None])) == 5.0
    assert every["episodes"] == 2 and every["problems"] == 20
    zero = next(r for r in result["summary"] if r["task"] == "algebra" and r["n"] == 0)
    assert zero["episodes"] == 1 and zero["accuracy"] == 0.5
    assert all(r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] for r in result["summary"])


def test_report_is_reproducible_and_seeded():
    rows = make_rows(lambda t, n, s, i: (i + s) % 2 == 0)
    other = make_rows(lambda t, n, s, i: i % 3 == 0)
    one = build_report({"fomaml": rows, "sft": other}, n_boot=200, seed=3)
    assert one == build_report({"fomaml": rows, "sft": other}, n_boot=200, seed=3)
    assert one["summary"] != build_report({"fomaml": rows, "sft": other}, n_boot=200, seed=4)["summary"]


def test_methods_on_different_episodes_are_rejected():
    rows = make_rows(lambda t, n, s, i: True)
    moved = [dict(r, shot_ids=["other"] * r["n"]) if r["n"] else r for r in rows]
    with pytest.raises(ValueError, match="same episodes"):
        build_report({"fomaml": rows, "sft": moved}, n_boot=10)
    with pytest.raises(ValueError, match="every episode must score the same problems"):
        build_report({"fomaml": rows[:-1]}, n_boot=10)
    with pytest.raises(ValueError, match="appears twice"):
        build_report({"fomaml": rows[:-1] + rows[-2:-1]}, n_boot=10)


def test_markdown_has_the_tables_and_the_holdout_section():
    rows = make_rows(lambda t, n, s, i: i < n + 3, tasks=("algebra", "precalculus"), holdout=("precalculus",))
    result = build_report({"base": rows, "sft": rows, "fomaml": make_rows(lambda *a: True, tasks=("algebra", "precalculus"),
                                                                          holdout=("precalculus",))}, n_boot=N_BOOT)
    md = render_markdown(result)
    assert "## Meta-training subjects" in md and "## Adaptation to an unseen subject" in md
    assert md.index("| algebra | 0 |") < md.index("## Adaptation to an unseen subject") < md.index("| precalculus | 2 |")
    assert md.count("### Accuracy (math-verify") == 2 and md.count("### Paired comparisons") == 2
    assert "| task | n | episodes x problems | base | sft | fomaml |" in md
    assert "| ALL | 2 | 2 x 10 |" in md  # one ALL row per n and section
    assert "without EOS: base 0.0%, sft 0.0%, fomaml 0.0%" in md
    for pair in ("fomaml vs sft", "fomaml vs base", "sft vs base"):
        assert f"| algebra | 2 | {pair} |" in md
    no_holdout = render_markdown(build_report({"base": make_rows(lambda *a: False)}, n_boot=10))
    assert "unseen subject" not in no_holdout and "Paired comparisons" not in no_holdout


def test_write_report_files(tmp_path):
    rows = make_rows(lambda t, n, s, i: i < n + 4, tasks=("algebra", "precalculus"), holdout=("precalculus",))
    fomaml = make_rows(lambda t, n, s, i: i < 2 * n + 4, tasks=("algebra", "precalculus"), holdout=("precalculus",))
    for k, row in enumerate(rows):
        row["finished"] = k % 4 != 0
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": s, "meta/loss": 2.0 / s, "meta/avg_adaptation_gap": 0.1, "algebra/query_loss": 2.1 / s,
              "geometry/query_loss": 2.2 / s} for s in range(1, 6)]
    lines += [{"step": 5, "eval/loss_pre": 2.0, "eval/loss_post": 1.5}]
    (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n{broken\n")
    sft_metrics = tmp_path / "sft_metrics.jsonl"
    sft_metrics.write_text("".join(json.dumps({"step": s, "sft/loss": 1.0 / s}) + "\n" for s in range(1, 4)))

    out = write_report(tmp_path / "out", {"sft": rows, "fomaml": fomaml}, metadata={"note": "x"},
                       metrics_jsonl=[run, sft_metrics], n_boot=200)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"results.json", "results.md", "few_shot_curve.png", "learning_curves.png"}  # no temporaries
    for name in ("few_shot_curve.png", "learning_curves.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["diagnostics"]["sft"] == {"unfinished_generations": 0.25, "truncated_references": 0.0, "invalid_rows": 0}
    assert saved["metadata"] == {"note": "x"} and saved["methods"] == ["sft", "fomaml"]
    assert len(saved["rows"]) == len(rows) + len(fomaml) and {r["method"] for r in saved["rows"]} == {"sft", "fomaml"}
    assert saved["summary"] and saved["significance"]
    assert (tmp_path / "out" / "results.md").read_text() == out["markdown"]
    assert "| precalculus | 2 | fomaml vs sft |" in out["markdown"]


def test_learning_curves_without_known_metrics_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "perf/tokens_per_s": 3.0}) + "\n")
    assert report.plot_learning_curves([path], tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
    with pytest.raises(FileNotFoundError, match="--metrics-jsonl"):
        report.plot_learning_curves([tmp_path / "missing"], tmp_path / "curves.png")


def test_many_tasks_show_all_rows_and_answer_metrics_without_generation():
    tasks = tuple(f"code_{i:03d}" for i in range(report.MAX_TASK_ROWS + 2))
    rows = make_rows(lambda *a: True, tasks=tasks, holdout=tasks)
    for r in rows:  # generate=False rows: no generation, no grade; answer-token scores instead
        r.update(correct=None, strict=None, answer_accuracy=0.25 + 0.5 * (r["n"] > 0), answer_nll=1.0)
    fomaml = [dict(r, answer_accuracy=r["answer_accuracy"] + 0.125) for r in rows]
    result = build_report({"sft": rows, "fomaml": fomaml}, n_boot=N_BOOT)
    by = {(r["task"], r["n"], r["method"]): r for r in result["summary"]}
    assert math.isnan(by[("ALL", 2, "sft")]["accuracy"])  # never graded: not counted as wrong
    assert by[("ALL", 2, "sft")]["answer_accuracy"] == 0.75 and by[("ALL", 0, "sft")]["answer_accuracy"] == 0.25
    sig = {(r["task"], r["n"]): r for r in result["significance"]}
    assert sig[("ALL", 2)]["answer_accuracy_diff"] == pytest.approx(0.125) and sig[("ALL", 2)]["mcnemar"] is None
    assert len(result["summary"]) == (len(tasks) + 1) * 2 * 2  # per-task rows are all kept in the report
    md = render_markdown(result)
    assert "| ALL | 2 |" in md and "| code_000 |" not in md and f"{len(tasks)} tasks: ALL rows only" in md
    assert "### Answer-token accuracy" in md and "### Accuracy (math-verify" not in md  # no empty tables


def balanced_grid(ones: int, problems: int, rng_: np.random.Generator) -> np.ndarray:
    """One episode x ``problems``: exactly ``ones`` of them right, in a random order."""
    row = np.array([1.0] * ones + [0.0] * (problems - ones))
    return rng_.permutation(row)[None, :]


def test_resampling_the_tasks_matches_the_two_stage_variance():
    """Tasks drawn with replacement, each draw resampled on its own: the pooled mean of S equal-sized tasks
    has bootstrap variance (between-task variance + mean within-task variance of a task's mean) / S, both
    the plug-in (1/n) variances of the data. Resampling a task drawn k times once and counting it k times
    would inflate the within part by E[k^2] = 2 - 1/S instead of E[k] = 1 (here: a 30% wider CI)."""
    tasks, problems = 100, 10
    gen = np.random.default_rng(7)
    # Task means 0.4 or 0.6 (between-task variance 0.01), each task 0/1 (within variance 0.24).
    grids = [balanced_grid(4 if s % 2 else 6, problems, gen) for s in range(tasks)]
    means = np.array([g.mean() for g in grids])
    within = np.mean([g.var() / problems for g in grids])
    se = math.sqrt((means.var() + within) / tasks)
    stat = bootstrap_mean(grids, n_boot=20000, rng=rng(), resample_strata=True)
    width = stat["ci"][1] - stat["ci"][0]
    assert stat["mean"] == pytest.approx(0.5)
    assert width == pytest.approx(2 * 1.959964 * se, rel=0.04)
    # Fixed tasks: only the within-task part.
    fixed = bootstrap_mean(grids, n_boot=20000, rng=rng())
    assert fixed["ci"][1] - fixed["ci"][0] == pytest.approx(2 * 1.959964 * math.sqrt(within / tasks), rel=0.04)


def test_held_out_all_rows_draw_the_tasks_and_meta_training_ones_do_not():
    """Every problem of a task scores its task's value (no within-task spread): a bootstrap that keeps the
    tasks gives a zero-width interval; the held-out section's ALL row, whose tasks are a sample of unseen
    tasks, must cover the spread between tasks (the between-task SE)."""
    seen, unseen = [f"seen{i}" for i in range(20)], [f"unseen{i}" for i in range(20)]
    value = {t: float(i % 2) for i, t in enumerate(seen + unseen)}
    rows = make_rows(lambda t, n, s, i: value[t] > 0.5, tasks=seen + unseen, shots=(0, 2), holdout=unseen,
                     nll=lambda t, n, s, i: 1.0 + value[t])
    result = build_report({"fomaml": rows}, n_boot=4000)
    rows_all = {r["section"]: r for r in result["summary"] if r["task"] == "ALL" and r["n"] == 2}
    assert rows_all["meta_train"]["accuracy_ci"] == [0.5, 0.5] and rows_all["meta_train"]["nll_ci"] == [1.5, 1.5]
    se = math.sqrt(0.25 / len(unseen))
    for name in ("accuracy", "nll"):
        lo, hi = rows_all["holdout"][f"{name}_ci"]
        assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=0.1), name
    # Paired differences of held-out tasks are drawn the same way (A - B differs by task).
    other = make_rows(lambda t, n, s, i: False, tasks=seen + unseen, shots=(0, 2), holdout=unseen,
                      nll=lambda t, n, s, i: 1.0)
    paired = build_report({"fomaml": rows, "base": other}, n_boot=4000)
    diff = next(r for r in paired["significance"] if r["section"] == "holdout" and r["task"] == "ALL" and r["n"] == 2)
    lo, hi = diff["accuracy_diff_ci"]
    assert hi - lo == pytest.approx(2 * 1.959964 * se, rel=0.1)


def test_in_context_comparisons_face_the_strongest_alternatives():
    """Every meta-learner against the base and MetaICL in context; each method in context against itself by
    gradient; MetaICL in context against the base in context and against tuned SFT by gradient. Nothing is
    paired with a row that is not there."""
    pairs = report.comparisons(["base", "fomaml", "sft_tokens", "metaicl", "base_icl", "metaicl_icl"])
    assert {("fomaml", "base_icl"), ("fomaml", "metaicl_icl"), ("base_icl", "base"), ("metaicl_icl", "metaicl"),
            ("metaicl_icl", "base_icl"), ("metaicl_icl", "sft_tokens")} <= set(pairs)
    assert len(pairs) == len(set(pairs))
    no_icl = report.comparisons(["base", "fomaml", "sft_tokens", "metaicl"])
    assert not [pair for pair in no_icl if any(m.endswith(report.ICL) for m in pair)]
