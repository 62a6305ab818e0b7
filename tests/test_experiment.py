"""recipes/meta_vs_sft.py end to end in --tiny mode (tiny random Qwen3, synthetic
suite, 2-step runs): every init is scored on the same (episode, problem) set, the statistics are what the
saved rows say, and a rerun skips what is finished (and retrains only what was removed, identically, in a
subprocess)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from lora_maml.errors import run_main
from lora_maml.eval.report import verdict_text
from recipes import meta_vs_sft

REPO_ROOT = Path(__file__).resolve().parents[1]
INITS = ("base", "fomaml_0", "sft_steps_0", "sft_tokens_0")
N_SHOTS = (0, 2, 4)
OVERRIDES = [
    "data.tasks=[algebra,geometry]", "data.max_length=96", "trainer.total_steps=2", "meta.meta_batch_size=2",
    "meta.num_inner_steps=2", "meta.inner_batch_size=2", "meta.query_batch_size=2", "sft.micro_batch_size=2", "meta.inner_optimizer=adam",
    "meta.inner_lr=0.01", "sft.batch_size=4", "trainer.save_freq=2", "trainer.test_freq=2",
    "trainer.eval_num_support=2", "trainer.eval_num_test=2", "trainer.logger=[jsonl]",
]


@pytest.fixture(scope="module")
def bench():
    """The program as its command line runs it (a user error: exit code 1), and the verdict on nll."""
    return SimpleNamespace(main=lambda argv: run_main(meta_vs_sft.main, argv),
                           verdict=lambda row: verdict_text(row, "nll"))


def argv(out: Path, *extra: str) -> list[str]:
    return ["--tiny", "--tiny-dims", "64,2", "--out", str(out), "--seeds", "0", "--n-shots", *map(str, N_SHOTS), "--episodes", "2",
            "--test-per-episode", "2", "--n-boot", "200", *extra, "--", *OVERRIDES]


def rows_of(out: Path, init: str) -> list[dict]:
    return json.loads((out / "eval" / "rows" / f"{init}.json").read_text())["rows"]


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["n"], r["task"], r["seed"], r["id"]): r for r in rows}


def checkpoints(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "runs").glob("*/maml_checkpoint_step_*.pt")}


@pytest.fixture(scope="module")
def experiment(bench, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("meta_vs_sft")
    assert bench.main(argv(out, "--in-process")) == 0
    return out


def test_every_init_is_scored_on_the_same_episodes_and_problems(experiment):
    keys = {init: {k: tuple(r["shot_ids"]) for k, r in by_key(rows_of(experiment, init)).items()} for init in INITS}
    assert all(keys[init] == keys["base"] for init in INITS)
    plan = json.loads((experiment / "eval" / "plan.json").read_text())["episodes"]
    assert len(keys["base"]) == sum(len(ep["test_ids"]) for ep in plan) == 2 * (1 + 2 + 2) * 2
    assert {k[1] for k in keys["base"]} == {"algebra", "geometry"}
    assert all(len(shots) == k[0] for k, shots in keys["base"].items())


def test_nll_pre_is_the_unadapted_init(experiment):
    for init in INITS:
        pre: dict[str, float] = {}
        for row in rows_of(experiment, init):
            # The init's own weights: the same value for a problem at every n and in every episode.
            assert pre.setdefault(row["id"], row["nll_pre"]) == row["nll_pre"], (init, row["id"])
            if row["n"] == 0:
                assert row["nll"] == row["nll_pre"]
            else:
                assert row["nll"] != row["nll_pre"]  # the adaptation moved the weights
    base = {r["id"]: r["nll_pre"] for r in rows_of(experiment, "base")}
    fomaml = {r["id"]: r["nll_pre"] for r in rows_of(experiment, "fomaml_0")}
    assert base.keys() == fomaml.keys() and base != fomaml  # training moved the init away from the base


def test_reported_differences_are_the_paired_row_differences(experiment, bench):
    result = json.loads((experiment / "results.json").read_text())
    rows = {init: by_key(rows_of(experiment, init)) for init in INITS}
    gain = {init: {k: r["nll_pre"] - r["nll"] for k, r in table.items()} for init, table in rows.items()}
    comparisons = {(c["b"], c["n"]): c for c in result["comparisons"] if c["b"] != "base"}
    assert set(comparisons) == {(b, n) for b in ("sft_steps", "sft_tokens") for n in N_SHOTS}
    # Every method is compared with the base too (one init, paired with every seed).
    assert {(c["a"], c["n"]) for c in result["comparisons"] if c["b"] == "base"} == {
        (a, n) for a in ("fomaml", "sft_steps", "sft_tokens") for n in N_SHOTS}
    for (b, n), c in comparisons.items():
        keys = [k for k in rows["fomaml_0"] if k[0] == n]
        post = np.mean([rows["fomaml_0"][k]["nll"] - rows[f"{b}_0"][k]["nll"] for k in keys])
        gained = np.mean([gain["fomaml_0"][k] - gain[f"{b}_0"][k] for k in keys])
        assert c["nll_diff"] == pytest.approx(post, abs=1e-12) and c["nll_gain_diff"] == pytest.approx(gained, abs=1e-12)
        answer = np.nanmean([np.nanmean([rows["fomaml_0"][k]["answer_accuracy"] - rows[f"{b}_0"][k]["answer_accuracy"]
                                         for k in keys if k[2] == e and k[1] == t])
                             for t in {k[1] for k in keys} for e in {k[2] for k in keys}])
        assert c["answer_accuracy_diff"] == pytest.approx(answer, abs=1e-12)
        assert c["pairs"] == len(keys)
        if n == 0:  # no adaptation: no gain; one episode per task, so the CI is over the problems
            assert c["nll_gain_diff"] == 0
        lo, hi = c["nll_diff_ci"]
        assert lo <= c["nll_diff"] <= hi and c["nll_gain_diff_ci"][0] <= c["nll_gain_diff"] <= c["nll_gain_diff_ci"][1]
        assert c["nll_diff_by_seed"] == {"0": pytest.approx(post, abs=1e-12)}  # one seed: its mean is the mean
        expected = "FOMAML init better" if hi < 0 else "FOMAML init worse" if lo > 0 else "not distinguishable at 95%"
        assert c["verdict"] == expected
        disagreeing = c | {"nll_diff_ci": [-2.0, -1.0], "nll_diff_by_seed": {"0": -1.5, "1": +0.5}}
        assert bench.verdict(disagreeing).startswith("not distinguishable")  # seeds of opposite sign never decide
        assert bench.verdict(disagreeing | {"nll_diff_by_seed": {"0": -1.5, "1": -0.5}}) == "FOMAML init better"
    summary = {(s["init"], s["n"]): s for s in result["summary"]}
    for init in ("base", "fomaml", "fomaml_0", "sft_tokens"):
        table = rows["base" if init == "base" else init if init.endswith("_0") else f"{init}_0"]
        for n in N_SHOTS:
            values = [r for k, r in table.items() if k[0] == n]
            assert summary[(init, n)]["nll"] == pytest.approx(np.mean([r["nll"] for r in values]), abs=1e-12)
            assert summary[(init, n)]["nll_gain"] == pytest.approx(np.mean([r["nll_pre"] - r["nll"] for r in values]),
                                                              abs=1e-12)
    markdown = (experiment / "results.md").read_text()
    assert "| FOMAML − SFT (matched tokens) | 4 |" in markdown and all(v in markdown for v in result["verdicts"])
    assert set(result["timings_s"]) >= {"1/6 base model", "2/6 data", "4/6 training", "5/6 evaluation", "total"}


def test_rerun_skips_finished_work_and_retrains_only_what_is_missing(bench, experiment, capsys, monkeypatch):
    before = checkpoints(experiment)
    results = json.loads((experiment / "results.json").read_text())
    capsys.readouterr()
    assert bench.main(argv(experiment, "--in-process")) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3 and printed.count("evaluated earlier, skipped") == 4
    assert "prepared earlier, skipped" in printed and "made earlier, skipped" in printed
    assert checkpoints(experiment) == before
    again = json.loads((experiment / "results.json").read_text())
    assert again["comparisons"] == results["comparisons"] and again["summary"] == results["summary"]

    # Other training arguments for the same --out are refused, not mixed in.
    assert bench.main([*argv(experiment, "--in-process"), "trainer.total_steps=3"]) == 1
    assert "was trained with other arguments" in capsys.readouterr().err
    assert bench.main([*argv(experiment), "trainer.seed=5"]) == 1
    assert "trainer.seed is managed by this script" in capsys.readouterr().err

    # A removed run is retrained, in a subprocess (the default), identically; only it is evaluated again.
    removed = experiment / "runs" / "sft_steps_0"
    old_rows = by_key(rows_of(experiment, "sft_steps_0"))
    for path in sorted(removed.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    removed.rmdir()
    (experiment / "runs" / "sft_steps_0.done.json").unlink()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same float work as this process's one thread
    assert bench.main(argv(experiment)) == 0
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 2 and "sft_steps_0: trained in" in printed
    assert printed.count("evaluated earlier, skipped") == 3 and "sft_steps_0: evaluated in" in printed
    new_rows = by_key(rows_of(experiment, "sft_steps_0"))
    assert new_rows.keys() == old_rows.keys()
    for key, row in new_rows.items():
        assert math.isclose(row["nll"], old_rows[key]["nll"], rel_tol=1e-6), key
    assert {k: v for k, v in checkpoints(experiment).items() if "sft_steps_0" not in k} == {
        k: v for k, v in before.items() if "sft_steps_0" not in k}


def wait_until(predicate, process: subprocess.Popen, log: Path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {what} (exit code {process.poll()}):\n" + log.read_text(errors="replace")[-4000:])
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the training subprocess through Linux /proc")
def test_signals_reach_the_training_run_and_the_runner_waits_for_it(bench, tmp_path, capsys):
    """While a run trains in its subprocess, a second experiment on the same --out is refused with one line naming
    the runner. Then SIGTERM to the runner, and SIGINT while it waits (a user or a cluster that signals twice): the
    run gets both, finishes its step and saves, and the runner exits 143 only after it, so no training process
    outlives the runner to collide with a rerun."""
    out, log_path = tmp_path / "out", tmp_path / "runner.log"
    endless = ("trainer.total_steps=", "trainer.save_freq=", "trainer.test_freq=")
    command = [sys.executable, str(REPO_ROOT / "recipes" / "meta_vs_sft.py"),
               *[a for a in argv(out, "--methods", "fomaml") if not a.startswith(endless)],
               "trainer.total_steps=100000", "trainer.save_freq=100000", "trainer.test_freq=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log_path, "w") as log:
        runner = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics = out / "runs" / "fomaml_0" / "metrics.jsonl"
    child = None
    try:
        wait_until(lambda: metrics.is_file() and metrics.stat().st_size > 0, runner, log_path, "training step")
        child = int(Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()[0])
        assert bench.main(argv(out)) == 1
        assert f"error: --out={out}: in use by process {runner.pid} on host " in capsys.readouterr().err
        runner.send_signal(signal.SIGTERM)
        wait_until(lambda: "received SIGTERM" in log_path.read_text(errors="replace"), runner, log_path,
                   "SIGTERM passed on to the training run")
        runner.send_signal(signal.SIGINT)
        code = runner.wait(timeout=300)
        assert not Path(f"/proc/{child}").exists(), "the training run outlived the runner"
        assert code == 128 + signal.SIGTERM
    finally:  # on a failure: nothing left running
        if child is not None and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)
        if runner.poll() is None:
            runner.kill()
        runner.wait()
    assert "stopped at step" in log_path.read_text() and (out / "runs" / "fomaml_0" / "latest").is_file()


# --- tuning on validation tasks and the wrong-code control (issue 18's evidence rules) ---------------------
RULES_ARGV = ["--tiny", "--tiny-dims", "64,2", "--config", str(REPO_ROOT / "recipes" / "configs" / "rules_tiny.yaml"),
              "--source", "synthetic-rules:tasks=16,unseen=8,per_task=12", "--methods", "fomaml", "sft_tokens",
              "--seeds", "0", "1", "--eval-on", "holdout", "--validation-tasks", "3", "--adapt-grid", "1e-2:1",
              "3e-2:2", "--sft-lrs", "1e-3", "1e-2", "--n-shots", "0", "2", "--episodes", "1", "--test-per-episode",
              "2", "--n-boot", "100", "--icl", "--in-process", "--", "trainer.total_steps=2", "meta.meta_batch_size=2",
              "sft.batch_size=4", "trainer.save_freq=2", "trainer.test_freq=2", "trainer.logger=[jsonl]"]


@pytest.fixture(scope="module")
def tuned(bench, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("tuned")
    assert bench.main(["--out", str(out), *RULES_ARGV]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_validation_tasks_tune_and_are_never_reported(tuned):
    out, result = tuned
    validation, test = set(result["validation_tasks"]), set(result["test_tasks"])
    assert len(validation) == 3 and len(test) == 5 and not validation & test
    plan = json.loads((out / "eval" / "plan.json").read_text())
    assert {ep["task"] for ep in plan["validation_episodes"]} == validation
    for init in ("base", "fomaml_0", "fomaml_1", "sft_tokens_0", "sft_tokens_1"):
        assert {r["task"] for r in rows_of(out, init)} == test
        # The chosen adaptation is the grid's best validation score on the verdict metric (nll here),
        # recomputed from the cached rows.
        table = result["adaptation"][init]["validation"]
        assert result["adaptation"][init]["criterion"] == "nll"
        cached_as = Path(result["runs"][init]).name if init != "base" else init  # the run directory's name
        for entry in table:
            cached = json.loads((out / "eval" / "validation" / f"{cached_as}_lr{entry['lr']:g}_k{entry['steps']}.json")
                                .read_text())["rows"]
            assert {r["task"] for r in cached} <= validation and {r["n"] for r in cached} == {2}
            assert entry["nll"] == pytest.approx(np.mean([r["nll"] for r in cached]))
        best = min(table, key=lambda e: e["nll"])
        assert (result["adaptation"][init]["lr"], result["adaptation"][init]["steps"]) == (best["lr"], best["steps"])


def test_sft_rate_is_chosen_on_validation_tasks_and_trains_the_other_seeds(tuned):
    out, result = tuned
    sweep = result["sft_sweep"]["sft_tokens"]
    scores = {float(lr): v for lr, v in sweep["validation"].items()}
    # SFT + its best adaptation, on the verdict metric (nll here) at the largest n: the baseline the
    # meta-learners are judged against, so its rate is chosen on the same footing.
    assert sweep["criterion"] == "nll at n = 2 after its best --adapt-grid adaptation"
    assert set(scores) == {1e-3, 1e-2} and sweep["chosen_lr"] == min(scores, key=scores.get)
    for lr, score in scores.items():  # the sweep run's best grid setting, recomputed from its cached rows
        cached = [json.loads(p.read_text())["rows"] for p in (out / "eval" / "validation").glob(f"sft_tokens_lr{lr:g}_0_lr*")]
        assert cached and score == pytest.approx(min(np.mean([r["nll"] for r in rows]) for rows in cached))
    assert Path(result["runs"]["sft_tokens_0"]).name == f"sft_tokens_lr{sweep['chosen_lr']:g}_0"
    # The chosen run's adaptation comes from the rows its sweep scored, not from a second scoring.
    assert not list((out / "eval" / "validation").glob("sft_tokens_0_*"))
    later = yaml.safe_load((out / "runs" / f"sft_tokens_lr{sweep['chosen_lr']:g}_1" / "config.yaml").read_text())
    assert later["sft"]["lr"] == sweep["chosen_lr"] and Path(result["runs"]["sft_tokens_1"]).parent == out / "runs"


@contextlib.contextmanager
def evaluation_moved_aside(out: Path, prefix: str):
    """Rerun a module-scoped experiment in place: its evaluation and results are moved to ``<prefix>_<name>``
    for the block (readable there) and put back after it, whatever the block wrote."""
    kept = {name: out / name for name in ("eval", "results.json", "results.md")}
    for name, path in kept.items():
        path.rename(out / f"{prefix}_{name}")
    try:
        yield
    finally:
        for name, path in kept.items():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            (out / f"{prefix}_{name}").rename(path)


def test_a_sweep_that_changes_its_choice_trains_the_other_seeds_anew(bench, tuned):
    """Rerunning an experiment with other --sft-lrs whose choice differs: the later seeds train at the new rate
    in their own directories, the runs at the old rate stay. (Reruns the ``tuned`` experiment in place with its
    evaluation moved aside, and puts it back.)"""
    out, result = tuned
    old = result["sft_sweep"]["sft_tokens"]["chosen_lr"]
    (new,) = {1e-3, 1e-2} - {old}
    with evaluation_moved_aside(out, "kept"):
        argv_ = ["--out", str(out), *RULES_ARGV]
        at = argv_.index("--sft-lrs")
        argv_[at + 1 : at + 3] = [f"{new:g}"]
        assert bench.main(argv_) == 0
        rerun = json.loads((out / "results.json").read_text())
        assert rerun["sft_sweep"]["sft_tokens"]["chosen_lr"] == new
        for seed in (0, 1):
            assert rerun["runs"][f"sft_tokens_{seed}"] == str(out / "runs" / f"sft_tokens_lr{new:g}_{seed}")
        assert yaml.safe_load((out / "runs" / f"sft_tokens_lr{new:g}_1" / "config.yaml").read_text())["sft"]["lr"] == new
        assert (out / "runs" / f"sft_tokens_lr{old:g}_1.done.json").is_file()


def test_wrong_code_control_adapts_on_another_tasks_shots(tuned):
    out, result = tuned
    plan = json.loads((out / "eval" / "plan.json").read_text())
    at_tune = {(ep["task"], ep["seed"]): ep for ep in plan["episodes"] if ep["n"] == result["tune_n"]}
    assert len(plan["control_episodes"]) == len(at_tune) > 1
    donors = set()
    for ep in plan["control_episodes"]:
        own = at_tune[(ep["task"], ep["seed"])]
        assert ep["test_ids"] == own["test_ids"] and ep["n"] == own["n"]
        donor = {i.split("/")[1] for i in ep["shot_ids"]}
        assert len(donor) == 1 and donor != {ep["task"]}  # every shot from one other task
        donors |= donor
    assert donors == {ep["task"] for ep in plan["control_episodes"]}  # a permutation of the tasks
    control = result["control"]
    methods = [m + v for v in ("", "_icl") for m in ("base", "fomaml", "sft_tokens")]  # --icl: in context too
    assert {r["init"] for r in control["summary"]} == {f"{m}@wrong_code" for m in methods}
    assert {(r["a"], r["b"]) for r in control["comparisons"]} == {(m, f"{m}@wrong_code") for m in methods}
    assert result["floor"] == {"accuracy": pytest.approx(0.1), "nll": pytest.approx(math.log(10))}
    markdown = (out / "results.md").read_text()
    assert "**Floor**" in markdown and "**Control**" in markdown


def test_in_context_rows_pair_with_the_gradient_rows_and_face_the_meta_learners(tuned):
    """--icl: every init is also scored with the shots in its prompt and no gradient step, on the same episodes
    and problems (the rows pair); every meta-learner is compared with the base in context (the strongest
    obvious alternative), each method with itself in context, and the wrong-code control covers ICL too."""
    out, result = tuned
    for init in ("base", "fomaml_0", "fomaml_1", "sft_tokens_0", "sft_tokens_1"):
        gradient, icl = rows_of(out, init), rows_of(out, f"{init}_icl")
        assert list(by_key(icl)) == list(by_key(gradient))
        for plain, in_context in zip(gradient, icl):
            assert in_context["tokens"] == plain["tokens"] and in_context["shot_ids"] == plain["shot_ids"]
            if plain["n"] == 0:  # no shots: nothing in the prompt, nothing adapted
                assert in_context["nll"] == plain["nll"] == plain["nll_pre"]
            else:  # no gradient step: the scores are the init's own, with the shots in the prompt
                assert in_context["nll"] == in_context["nll_pre"] != plain["nll_pre"]
    pairs = {(c["a"], c["b"]) for c in result["comparisons"]}
    assert {("fomaml", "base_icl"), ("base_icl", "base"), ("fomaml_icl", "fomaml"), ("sft_tokens_icl", "sft_tokens")} <= pairs
    assert {r["init"] for r in result["control"]["summary"]} >= {"base_icl@wrong_code", "fomaml_icl@wrong_code"}
    markdown = (out / "results.md").read_text()
    assert "| base + ICL |" in markdown and "| FOMAML − base + ICL | 2 |" in markdown


def test_the_base_alone_by_gradient_and_in_context(bench, tmp_path, one_thread):
    """--methods with no method: nothing is trained; the base is scored adapted by gradient and, with --icl, with
    the shots in its prompt, and the two are compared (the real-LLM study's shape)."""
    out = tmp_path / "base_only"
    argv_ = ["--out", str(out), *RULES_ARGV]
    at = argv_.index("--methods")
    argv_[at + 1 : argv_.index("--seeds")] = []
    argv_[argv_.index("--sft-lrs") : argv_.index("--sft-lrs") + 3] = []
    assert bench.main(argv_) == 0
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())
    result = json.loads((out / "results.json").read_text())
    assert result["methods"] == [] and set(result["adaptation"]) == {"base"}
    assert {(c["a"], c["b"]) for c in result["comparisons"]} == {("base_icl", "base")}
    assert {r["init"] for r in result["summary"]} == {"base", "base_icl"}


def test_tuning_needs_validation_tasks(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path), *[a for a in RULES_ARGV if a not in ("--validation-tasks", "3")]]) == 1
    assert "--validation-tasks" in capsys.readouterr().err


def test_parallel_evaluation_scores_what_one_process_does_and_metasgd_keeps_its_rates(bench, tuned, monkeypatch,
                                                                                      capsys):
    """--jobs 2 evaluates the inits in two worker processes: the same rows as the one-process evaluation; a
    Meta-SGD run added to the same experiment adapts with the rates it learned, never a grid setting. (Reruns
    the ``tuned`` experiment in place with its evaluation moved aside, and puts everything back.)"""
    out, serial = tuned
    with evaluation_moved_aside(out, "serial"):
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # one thread per worker, as the serial run had
        command = [a for a in RULES_ARGV if a != "--in-process"]
        split = command.index("sft_tokens") + 1
        command = [*command[:split], "metasgd", *command[split:]]
        assert bench.main(["--out", str(out), "--jobs", "2", *command]) == 0
        assert "fomaml_0: finished earlier, skipped" in capsys.readouterr().out
        result = json.loads((out / "results.json").read_text())
        for init in ("base", "fomaml_0", "fomaml_1", "sft_tokens_0", "sft_tokens_1"):
            assert result["adaptation"][init] == serial["adaptation"][init]
            new = by_key(rows_of(out, init))
            old = by_key(json.loads((out / "serial_eval" / "rows" / f"{init}.json").read_text())["rows"])
            assert new.keys() == old.keys()
            for key, row in new.items():
                assert math.isclose(row["nll"], old[key]["nll"], rel_tol=1e-6), (init, key)
        for seed in (0, 1):
            assert result["adaptation"][f"metasgd_{seed}"] == {"lr": "learned", "steps": 3}
            assert not list((out / "eval" / "validation").glob(f"metasgd_{seed}_*"))


# --- MetaICL (issue 19) ------------------------------------------------------------------------------------
def test_metaicl_is_sft_on_k_shot_prompts_matched_in_label_tokens_to_fomaml(bench, tmp_path, capsys, one_thread):
    """--methods fomaml metaicl: metaicl trains the SFT recipe with sft.icl_max_shots = the largest --n-shots,
    matched in training label tokens to the same seed's fomaml run; the report names it MetaICL and compares
    it with FOMAML and the base. It needs fomaml and an --n-shots >= 1."""
    assert bench.main(argv(tmp_path / "alone", "--methods", "metaicl", "--in-process")) == 1
    assert "metaicl is matched to the fomaml run's tokens; add fomaml" in capsys.readouterr().err
    no_shots = argv(tmp_path / "none", "--methods", "fomaml", "metaicl")
    at = no_shots.index("--n-shots")
    no_shots[at + 1 : at + 1 + len(N_SHOTS)] = ["0"]
    assert bench.main(no_shots) == 1
    assert "--methods metaicl trains on up to the largest --n-shots shots" in capsys.readouterr().err
    assert bench.main([*argv(tmp_path / "override", "--methods", "fomaml", "metaicl", "--icl"),
                       "sft.icl_max_shots=1"]) == 1
    assert "sft.icl_max_shots is managed by this script" in capsys.readouterr().err
    for icl in ([], ["--icl", "base"]):  # MetaICL is used in context: scored so, or refused
        assert bench.main(argv(tmp_path / "no_icl", "--methods", "fomaml", "metaicl", *icl)) == 1
        assert "add --icl" in capsys.readouterr().err
    assert bench.main(argv(tmp_path / "unknown", "--methods", "fomaml", "metaicl", "--icl", "metaicl", "sft_tokens")) == 1
    assert "--icl sft_tokens: expected 'base' or names from --methods ['fomaml', 'metaicl']" in capsys.readouterr().err

    out = tmp_path / "run"  # in context: the base and MetaICL only (FOMAML by gradient alone)
    assert bench.main(argv(out, "--methods", "fomaml", "metaicl", "--icl", "base", "metaicl", "--in-process")) == 0
    cfg = yaml.safe_load((out / "runs" / "metaicl_0" / "config.yaml").read_text())
    assert cfg["sft"]["icl_max_shots"] == max(N_SHOTS)
    assert cfg["sft"]["match_tokens_of"] == str(out / "runs" / "fomaml_0" / "config.yaml")
    fomaml_rows = [json.loads(line) for line in (out / "runs" / "fomaml_0" / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "runs" / "metaicl_0" / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["sft/tokens"] for r in rows]
    assert sum(tokens) >= sum(r["meta/support_tokens"] + r["meta/query_tokens"] for r in fomaml_rows) > sum(tokens[:-1])
    assert all("sft/icl_shots" in r and "sft/context_tokens" in r for r in rows)
    result = json.loads((out / "results.json").read_text())
    assert {(c["a"], c["b"]) for c in result["comparisons"]} == {
        ("fomaml", "metaicl"), ("fomaml", "base"), ("metaicl", "base"),  # every init adapted by gradient
        ("fomaml", "base_icl"), ("fomaml", "metaicl_icl"),  # FOMAML against the shots in the prompt
        ("base_icl", "base"), ("metaicl_icl", "metaicl"),  # each init scored in context: ICL vs gradient
        ("metaicl_icl", "base_icl")}  # what MetaICL training buys the prompt
    assert result["icl"] == ["base", "metaicl"] and not (out / "eval" / "rows" / "fomaml_0_icl.json").exists()
    markdown = (out / "results.md").read_text()
    assert "| FOMAML − MetaICL |" in markdown and "| FOMAML − MetaICL + ICL |" in markdown
