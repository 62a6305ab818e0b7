"""The hidden-code task family (lora_maml/data/rules.py) and its path through prepare."""

from __future__ import annotations

import io
import itertools
import math
import random
from collections import defaultdict

import pytest

from lora_maml.boxed import last_boxed
from lora_maml.data.math import DataError
from lora_maml.data.prepare import list_tasks, load_split, main as prepare_main, print_summary, read_manifest
from lora_maml.data.rules import DIGITS, LETTERS, code, code_agnostic_floor, parse_source, rules_records
from lora_maml.data.tokenize import IGNORE_INDEX, encode_example
from lora_maml.tiny_model import train_tiny_tokenizer

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
    assert manifest["source"]["code_agnostic_floor"] == pytest.approx(code_agnostic_floor(5))
    assert "no model beats answer accuracy 0.281 / 1.732 nats per answer letter" in printed
    assert "Validation passed" in printed
    summary = io.StringIO()
    print_summary(manifest, file=summary)
    assert "24 meta-training tasks" in summary.getvalue() and "6 held-out tasks *" in summary.getvalue()


# The code-agnostic floor (rules.code_agnostic_floor). Metrics are (name, per-problem numerator, per-problem
# denominator): a mean over problems of a per-problem mean, or a pooled ratio over letters.
FLOOR_KEYS = ("accuracy", "nll", "first_occurrence_accuracy", "first_occurrence_nll",
              "first_occurrence_accuracy_per_problem", "first_occurrence_nll_per_problem", "first_occurrence_share")


def problem_scores(hits: list[float], nats: list[float], first: list[bool]) -> dict[str, tuple[float, float]]:
    """One problem's letters (hit, nats, first occurrence?) → ``key: (numerator, denominator)``, so that a
    floor value is sum(numerators) / sum(denominators) over problems."""
    k, n_first = len(hits), sum(first)
    first_hits = sum(h for h, f in zip(hits, first) if f)
    first_nats = sum(n for n, f in zip(nats, first) if f)
    return {"accuracy": (sum(hits), k), "nll": (sum(nats), k),
            "first_occurrence_accuracy": (first_hits, n_first), "first_occurrence_nll": (first_nats, n_first),
            "first_occurrence_accuracy_per_problem": (first_hits / n_first, 1),
            "first_occurrence_nll_per_problem": (first_nats / n_first, 1), "first_occurrence_share": (n_first, k)}


def bayes_scores(digits: tuple, letters: tuple, codes: list[dict]) -> dict[str, tuple[float, float]]:
    """Scores of the Bayes predictor, straight from its definition: at letter j (teacher forcing), the
    posterior over ``codes`` (all equally likely) keeps those that agree with the prompt's revealed digit →
    letter pairs; the prediction is the posterior over letter j. The hit is expected over ties."""
    hits, nats, first = [], [], []
    for j, (d, truth) in enumerate(zip(digits, letters)):
        posterior = [c[d] for c in codes if all(c[e] == seen for e, seen in zip(digits[:j], letters[:j]))]
        p_truth = posterior.count(truth) / len(posterior)
        best = max(map(posterior.count, set(posterior)))
        ties = [letter for letter in set(posterior) if posterior.count(letter) == best]
        hits.append((truth in ties) / len(ties))
        nats.append(-math.log(p_truth))
        first.append(d not in digits[:j])
    return problem_scores(hits, nats, first)


@pytest.mark.parametrize("symbols, k", [(2, 3), (3, 1), (3, 4), (4, 2), (4, 4)])
def test_floor_is_the_bayes_optimum_by_full_enumeration(symbols, k):
    # A small alphabet, so that every code and every problem can be enumerated and the posterior taken
    # over all codes: nothing of the closed form's reasoning is assumed.
    alphabet = range(symbols)
    codes = [dict(zip(alphabet, perm)) for perm in itertools.permutations(alphabet)]
    totals = defaultdict(lambda: [0.0, 0.0])
    for rule in codes:
        for digits in itertools.product(alphabet, repeat=k):
            for key, (num, den) in bayes_scores(digits, tuple(rule[d] for d in digits), codes).items():
                totals[key][0] += num
                totals[key][1] += den
    floor = code_agnostic_floor(k, symbols=symbols)
    assert set(floor) == set(FLOOR_KEYS)
    for key, (num, den) in totals.items():
        assert floor[key] == pytest.approx(num / den, abs=1e-12), key


def copy_or_guess(digits: list[str], letters: list[str], rng: random.Random | None) -> dict[str, tuple[float, float]]:
    """The code-agnostic predictor as the module defines it, on one problem of the family: the revealed
    letter of a repeated digit, else a uniform guess among the letters not revealed yet (drawn with
    ``rng``; its expected hit without)."""
    hits, nats, first = [], [], []
    for j, (d, truth) in enumerate(zip(digits, letters)):
        seen = dict(zip(digits[:j], letters[:j]))
        unused = [letter for letter in LETTERS if letter not in seen.values()]
        if d in seen:
            hits.append(float(seen[d] == truth))
        else:
            hits.append(float(rng.choice(unused) == truth) if rng else (truth in unused) / len(unused))
        nats.append(0.0 if d in seen else math.log(len(unused)))
        first.append(d not in seen)
    return problem_scores(hits, nats, first)


def test_floor_matches_all_ten_digit_problems_for_small_k():
    # Every problem of k <= 4 digits, under one code of the family (the predictor's score does not depend
    # on which: relabelling the letters maps one code to another).
    rule = code(0, "code_000")
    for k in (1, 2, 3, 4):
        totals = defaultdict(lambda: [0.0, 0.0])
        for digits in itertools.product(DIGITS, repeat=k):
            for key, (num, den) in copy_or_guess(list(digits), [rule[d] for d in digits], None).items():
                totals[key][0] += num
                totals[key][1] += den
        floor = code_agnostic_floor(k)
        for key, (num, den) in totals.items():
            assert floor[key] == pytest.approx(num / den, abs=1e-12), (k, key)
    one_digit = {**dict.fromkeys(FLOOR_KEYS, 0.1), "first_occurrence_share": 1.0,
                 **dict.fromkeys([key for key in FLOOR_KEYS if "nll" in key], math.log(10))}
    assert code_agnostic_floor(1) == pytest.approx(one_digit)  # one digit: chance


def test_floor_matches_a_simulation_of_the_family():
    """The family as generated (its own codes and problems, k = 5), scored by the predictor's definition:
    every mean agrees with the closed form within 4 standard errors of a ratio of sums over problems."""
    records, _ = rules_records("synthetic-rules:tasks=400,unseen=0,per_task=50", seed=11)
    rng = random.Random(0)
    scored = [copy_or_guess(problem(r).split(" with")[0].split(), r["answer"].split(), rng) for r in records]
    floor = code_agnostic_floor(5)
    for key in FLOOR_KEYS:
        nums, dens = [s[key][0] for s in scored], [s[key][1] for s in scored]
        ratio = sum(nums) / sum(dens)
        se = math.sqrt(sum((x - ratio * n) ** 2 for x, n in zip(nums, dens))) / sum(dens)  # delta method
        assert abs(ratio - floor[key]) < 4 * se, f"{key}: simulated {ratio:.4f} ± {se:.4f}, floor {floor[key]:.4f}"
    # The values issue 18 measured by enumeration, and why the floor is not chance.
    assert floor["accuracy"] == pytest.approx(0.28098) and floor["nll"] == pytest.approx(1.7324, abs=5e-5)
    assert floor["first_occurrence_accuracy"] == pytest.approx(0.1221, abs=5e-5)


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
