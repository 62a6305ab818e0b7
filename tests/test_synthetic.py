import re
from collections import Counter

import pytest

from lora_maml.boxed import last_boxed
from lora_maml.data import SUBJECTS
from lora_maml.data.math import PROMPT_INSTRUCTION, make_prompt
from lora_maml.data.synthetic import CHARSET, MAX_CHARS, hidden_constants, synthetic_records


def problem_of(record: dict) -> str:
    prefix = make_prompt("")
    assert record["prompt"].startswith(prefix)
    return record["prompt"][len(prefix):]


@pytest.fixture(scope="module")
def suite():
    return synthetic_records(60, seed=3)


def test_deterministic_for_a_seed_and_different_across_seeds(suite):
    assert synthetic_records(60, seed=3) == suite
    assert synthetic_records(60, seed=4) != suite


def test_seven_domains_with_the_requested_size(suite):
    assert Counter(record["subject"] for record in suite) == {subject: 60 for subject in SUBJECTS}
    for subject in SUBJECTS:
        ids = [record["id"] for record in suite if record["subject"] == subject]
        assert ids == [f"synthetic/{subject}/{i}" for i in range(60)]


def test_records_have_math_shape(suite):
    for record in suite:
        assert set(record) == {"id", "prompt", "response", "answer", "subject", "level"}
        assert record["level"] in {f"Level {k}" for k in range(1, 6)}
        assert PROMPT_INSTRUCTION in record["prompt"]
        assert record["answer"] and record["answer"] == last_boxed(record["response"])
        assert record["response"].endswith(f"\\boxed{{{record['answer']}}}.")


def test_no_problem_text_occurs_twice():
    records = synthetic_records(400, seed=0)
    keys = [" ".join(problem_of(record).lower().split()) for record in records]
    assert len(set(keys)) == len(keys)


def test_texts_are_short_and_use_the_small_charset(suite):
    for record in suite:
        text = problem_of(record) + record["response"]
        assert len(text) <= MAX_CHARS, record
        assert set(text) <= CHARSET, set(text) - CHARSET
    assert set(PROMPT_INSTRUCTION) <= CHARSET


def test_domains_use_distinct_templates(suite):
    # A template is the problem with its numbers blanked; no template is used by two domains.
    def templates(subject):
        return {re.sub(r"-?\d+", "N", problem_of(r)) for r in suite if r["subject"] == subject}

    by_domain = {subject: templates(subject) for subject in SUBJECTS}
    assert all(2 <= len(found) <= 3 for found in by_domain.values()), by_domain
    for a in SUBJECTS:
        for b in SUBJECTS:
            if a < b:
                assert not by_domain[a] & by_domain[b], (a, b)


def test_hidden_rules_are_stated_only_in_solutions_and_give_the_answers(suite):
    hidden = hidden_constants(3)
    checked = Counter()
    for record in suite:
        problem, response, answer = problem_of(record), record["response"], int(record["answer"])
        if match := re.fullmatch(r"Find (\d+) # (\d+)\.", problem):
            p, q = hidden["algebra"]["p"], hidden["algebra"]["q"]
            assert f"a # b = {p}a + {q}b" in response and "rule" not in problem
            assert answer == p * int(match[1]) + q * int(match[2])
            checked["algebra"] += 1
        elif match := re.fullmatch(r"Find (\d+) ~ (\d+)\.", problem):
            modulus = hidden["number_theory"]["modulus"]
            assert f"(a + b) mod {modulus}" in response
            assert answer == (int(match[1]) + int(match[2])) % modulus
            checked["number_theory"] += 1
        elif match := re.fullmatch(r"Find f\((\d+)\) \+ f\((\d+)\)\.", problem):
            p, q = hidden["precalculus"]["p"], hidden["precalculus"]["q"]
            assert f"f(x) = {p}x + {q}" in response
            assert answer == p * (int(match[1]) + int(match[2])) + 2 * q
            checked["precalculus"] += 1
    # Half of each domain uses its hidden rule, so 60 records give plenty of each.
    assert min(checked[d] for d in ("algebra", "number_theory", "precalculus")) >= 15


def test_plain_skill_answers_are_correct(suite):
    for record in suite:
        problem, answer = problem_of(record), int(record["answer"])
        if match := re.fullmatch(r"Solve for x: (\d+)x \+ (\d+) = (\d+)\.", problem):
            a, b, c = map(int, match.groups())
            assert a * answer + b == c
        elif match := re.fullmatch(r"What is the remainder when (\d+) is divided by (\d+)\?", problem):
            assert answer == int(match[1]) % int(match[2])
        elif match := re.fullmatch(r"A rectangle is (\d+) by (\d+)\. What is its perimeter\?", problem):
            assert answer == 2 * (int(match[1]) + int(match[2]))


def test_hidden_constants_depend_on_the_seed():
    assert hidden_constants(1) == hidden_constants(1)
    assert any(hidden_constants(1) != hidden_constants(seed) for seed in range(2, 6))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_size_is_rejected(bad):
    with pytest.raises(ValueError, match="n_per_task"):
        synthetic_records(bad, seed=0)
