"""The hidden-code task family (lora_maml/data/rules.py) and its path through prepare."""

from __future__ import annotations

import io
import math
from collections import defaultdict

import pytest

from lora_maml.boxed import last_boxed
from lora_maml.data.math import DataError
from lora_maml.data.prepare import list_tasks, load_split, read_manifest, summary_text
from lora_maml.data.rules import CHANCE_NLL, code, parse_source, rules_records
from recipes.prepare_math_data import main as prepare_main

SMALL = "synthetic-rules:tasks=30,unseen=6,per_task=12"


def problem(record: dict) -> str:
    return record["prompt"].rsplit("Encode ", 1)[1]


def test_tasks_conflict_and_each_answer_follows_its_code():
    records, unseen = rules_records(SMALL, seed=3)
    assert unseen == [f"code_{i:03d}" for i in range(24, 30)]
    for r in records:
        rule = code(3, r["subject"])
        digits = problem(r).split(" with")[0].split()
        assert r["answer"] == " ".join(rule[d] for d in digits)
        assert last_boxed(r["response"]).strip() == r["answer"]
    codes = {task: tuple(code(3, task).values()) for task in {r["subject"] for r in records}}
    assert len(set(codes.values())) == len(codes) == 30  # every task its own bijection
    assert all(sorted(c) == list("abcdefghij") for c in codes.values())
    # Conflict: the prompts are the same across tasks (only the digits vary), the answers are not: each
    # digit's letter takes many values across the 30 codes, so no unadapted answer can be right for all.
    prompts = {r["prompt"].replace(problem(r).split(" with")[0], "<digits>") for r in records}
    assert len(prompts) == 1
    for digit in "0123456789":
        assert len({c[int(digit)] for c in codes.values()}) >= 8


def test_generation_is_deterministic_and_seeded():
    assert rules_records(SMALL, seed=3) == rules_records(SMALL, seed=3)
    assert rules_records(SMALL, seed=3)[0] != rules_records(SMALL, seed=4)[0]


def test_five_shots_almost_always_show_every_digit():
    records, _ = rules_records("synthetic-rules:tasks=40,unseen=0,per_task=10", seed=0)
    missing = []
    by_task = defaultdict(list)
    for r in records:
        by_task[r["subject"]].append(set(problem(r).split(" with")[0].split()))
    for shots in by_task.values():
        missing.append(10 - len(set().union(*shots[:5])))
    # 5 shots x 5 digits: a digit is unseen with probability 0.9^25 = 7%, i.e. ~0.7 of 10 per task.
    assert sum(missing) / len(missing) < 1.5


def test_pretraining_text_names_the_first_codes_and_never_an_unseen_one():
    records, unseen = rules_records("synthetic-rules:tasks=30,unseen=6,per_task=4,named=3,named_per_task=20", seed=0)
    assert unseen == []
    tasks = {r["subject"] for r in records}
    assert tasks == {f"code_{i:03d}" for i in range(24)}  # the meta-training codes only
    named = [r for r in records if "secret code." not in r["prompt"]]
    assert {r["subject"] for r in named} == {"code_000", "code_001", "code_002"} and len(named) == 60
    assert all(r["prompt"].endswith(f"code {int(r['subject'][-3:])}.") for r in named)


@pytest.mark.parametrize("source, key", [
    ("synthetic-rules:tasks=x", "tasks=x"), ("synthetic-rules:size=3", "size=3"),
    ("synthetic-rules:tasks=5,unseen=5", "unseen"), ("synthetic-rules:digits=1,per_task=9", "digits"),
    ("synthetic-rules:tasks=10,unseen=2,named=9", "named=9"),
])
def test_bad_specs_name_the_key(source, key):
    with pytest.raises(DataError, match=key):
        parse_source(source)


def test_prepare_holds_the_unseen_codes_out_and_prints_the_floor(tmp_path, capsys):
    out = tmp_path / "rules"
    assert prepare_main(["--source", SMALL, "--output-dir", str(out), "--seed", "1", "--validate"]) == 0
    printed = capsys.readouterr().out
    tasks = list_tasks(out)
    assert tasks["holdout"] == [f"code_{i:03d}" for i in range(24, 30)]
    assert len(tasks["meta_train"]) == 24 and not set(tasks["meta_train"]) & set(tasks["holdout"])
    assert len(load_split(out, "code_025", "test")) == 12
    manifest = read_manifest(out)
    assert manifest["source"]["chance_nll_per_answer_token"] == pytest.approx(math.log(10)) == pytest.approx(CHANCE_NLL)
    assert "no model beats 2.303 nats per answer letter" in printed and "Validation passed" in printed
    summary = io.StringIO(summary_text(manifest))
    assert "24 meta-training tasks" in summary.getvalue() and "6 held-out tasks *" in summary.getvalue()
