"""The hidden-code task family (lora_maml/data/rules.py) and its path through prepare."""

from __future__ import annotations

import io
import itertools
import math
from collections import defaultdict

import pytest

from lora_maml.boxed import last_boxed
from lora_maml.data.math import DataError
from lora_maml.data.prepare import list_tasks, load_split, read_manifest, summary_text
from lora_maml.data.rules import LETTERS, code, code_agnostic_floor, parse_source, rules_records
from lora_maml.data.tokenize import IGNORE_INDEX, encode_example
from lora_maml.tiny_model import train_tiny_tokenizer
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
    assert len(set(codes.values())) == len(codes) == 30  # every task its own code
    assert all(set(c) <= set(LETTERS) for c in codes.values())
    assert any(len(set(c)) < 10 for c in codes.values())  # functions, not bijections: letters may repeat
    assert all(len(set(digits)) == len(digits) for digits in (problem(r).split(" with")[0].split() for r in records))
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
    # 5 shots of 5 distinct digits: a digit is unseen with probability (1/2)^5 = 3%, i.e. ~0.3 of 10 per task.
    assert sum(missing) / len(missing) < 1.0


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
    assert manifest["source"]["code_agnostic_floor"] == pytest.approx({"accuracy": 0.1, "nll": math.log(10)})
    assert "no model beats answer accuracy 0.100 / 2.303 nats per answer letter" in printed
    assert "Validation passed" in printed
    summary = io.StringIO(summary_text(manifest))
    assert "24 meta-training tasks" in summary.getvalue() and "6 held-out tasks *" in summary.getvalue()


# The code-agnostic floor (rules.code_agnostic_floor), checked against the Bayes posterior itself.
def bayes_scores(digits: tuple, letters: tuple, codes: list[dict]) -> tuple[float, float]:
    """Summed (expected hits, nats) of the Bayes predictor on one problem, straight from its definition:
    at letter j (teacher forcing) the posterior over ``codes`` (all equally likely) keeps those that agree
    with the revealed digit -> letter pairs, and predicts letter j from them; ties split the hit."""
    hits = nats = 0.0
    for j, (d, truth) in enumerate(zip(digits, letters)):
        posterior = [c[d] for c in codes if all(c[e] == seen for e, seen in zip(digits[:j], letters[:j]))]
        best = max(map(posterior.count, set(posterior)))
        ties = [letter for letter in set(posterior) if posterior.count(letter) == best]
        hits += (truth in ties) / len(ties)
        nats -= math.log(posterior.count(truth) / len(posterior))
    return hits, nats


@pytest.mark.parametrize("symbols, letters, k", [(2, 2, 2), (3, 2, 3), (3, 3, 2), (4, 3, 3)])
def test_floor_is_the_bayes_optimum_by_full_enumeration(symbols, letters, k):
    # Small alphabets, so that every code (every function digits -> letters) and every problem of distinct
    # digits can be enumerated and the posterior taken over all codes: nothing of the docstring's argument
    # is assumed. The floor is chance, 1/letters and log(letters), whatever k.
    alphabet, letter_set = range(symbols), [chr(ord("a") + i) for i in range(letters)]
    codes = [dict(zip(alphabet, values)) for values in itertools.product(letter_set, repeat=symbols)]
    hits = nats = count = 0.0
    for rule in codes:
        for digits in itertools.permutations(alphabet, k):
            h, n = bayes_scores(digits, tuple(rule[d] for d in digits), codes)
            hits, nats, count = hits + h, nats + n, count + k
    assert hits / count == pytest.approx(1 / letters, abs=1e-12)
    assert nats / count == pytest.approx(math.log(letters), abs=1e-12)


def test_floor_matches_a_simulation_of_the_family():
    """What the floor's argument needs of the generator (its own codes and problems, k = 5): digits distinct
    within a problem, and every code's letters uniform over the 10 letters, within 4 standard errors over the
    4,000 (code, digit) entries (the letters of one code's problems are not independent draws: the code is)."""
    records, _ = rules_records("synthetic-rules:tasks=400,unseen=0,per_task=50", seed=11)
    assert all(len(set(problem(r).split(" with")[0].split())) == 5 for r in records)
    entries = [letter for task in {r["subject"] for r in records} for letter in code(11, task).values()]
    n = len(entries)
    assert n == 4000
    for x in LETTERS:
        assert abs(entries.count(x) / n - 0.1) < 4 * math.sqrt(0.09 / n), x
    assert code_agnostic_floor(5) == {"accuracy": 0.1, "nll": math.log(10)}
    with pytest.raises(ValueError):
        code_agnostic_floor(11)


def test_the_scored_answer_tokens_are_exactly_the_letters():
    # The floor is per answer letter; it is per scored token because each letter is one scored token and
    # nothing else in the box (\\boxed, {, }, the EOS) is scored.
    records, _ = rules_records(SMALL, seed=0)
    tokenizer = train_tiny_tokenizer([f"{r['prompt']}\n{r['response']}" for r in records])
    for r in records[:50]:
        example = encode_example(tokenizer, r["prompt"], r["response"], max_length=256, truncation="error",
                                 answer=r["answer"])
        scored = tokenizer.convert_ids_to_tokens([t for t in example["answer_labels"] if t != IGNORE_INDEX])
        assert scored == [f"Ġ{letter}" for letter in r["answer"].split()]  # Ġ: the byte-level BPE's space
