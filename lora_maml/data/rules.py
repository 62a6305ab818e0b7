"""A family of hundreds of conflicting tasks ("synthetic-rules"): each task is a hidden digit code.

Why it exists: on the 7 MATH subjects the test tasks are the training tasks, so multi-task SFT can
learn all of them and adaptation has little left to do. Meta-learning earns its keep when tasks
*conflict* and the test tasks are *new*. Here a task is a secret substitution code, a random bijection
from the digits 0-9 to the letters a-j, drawn from ``random.Random(f"rules-code:{seed}:{task}")``.
Every task asks the same kind of question::

    prompt   "Encode 4 7 1 2 5 with the secret code."
    response "The code gives \\boxed{ h c a b e}."

so the same prompt has a different answer under every task. (No MATH instruction before the problem:
with the chat template an example is ~35 tokens, which keeps the CPU demo to minutes.)

What is scored (``answer_nll`` / ``answer_accuracy``, teacher forcing) is the tokens that overlap the
answer's characters ``h c a b e`` inside the box (:func:`lora_maml.data.tokenize.encode_example`). Qwen's
pre-tokeniser makes every `` x`` its own pre-token, so with the tiny tokenizer (and Qwen's) those are
exactly the k letter tokens `` h``, `` c``, ...; ``\\boxed``, ``{``, ``}.`` and the EOS are not scored.
Per scored token is therefore per answer letter.

The floor is not chance (0.1 / log 10). Without the code, the Bayes-optimal predictor under a uniform
prior over bijections (:func:`code_agnostic_floor`) still knows two things every code shares: a digit
already seen in the problem has the letter teacher forcing revealed for it, and a new digit's letter is
uniform over the letters not used yet. For k = 5 that is accuracy 0.281 and 1.732 nats per answer letter
(first occurrences alone: 0.122 / 2.115). A few shots determine the rule: 5 shots show 25 digits, and a
digit is missing from all of them with probability 0.9^25 = 7%.

Tasks ``code_000 .. code_{T-1}`` are meta-training tasks; the last ``unseen`` of them are meta-test
tasks (``prepare`` holds them out: every record in ``few_shot_eval``, none in ``meta_train``), so
few-shot evaluation adapts to codes never seen in training.

``named=K`` writes the text a *competent base* is pretrained on, from the meta-training codes only: the
first K codes with their name in the prompt ("... with the secret code 3."), so that the base learns to
route each digit to its answer position and look its letter up (what a pretrained LLM brings to a new
task), and the other codes unnamed, so that on an unnamed prompt the base answers at best the
code-agnostic optimum above instead of confidently guessing one of the K codes. (A named prompt says
which code it is, so no floor holds there: the floor is that of an unnamed code.) Meta-learning then has
to learn an initialisation from which a few gradient steps write a NEW code. A base trained on unnamed codes only
learns no lookup, and nothing meta-learns on top of it.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from fractions import Fraction

from lora_maml.data.math import DataError

DIGITS = "0123456789"
LETTERS = "abcdefghij"
SOURCE_NAME = "synthetic-rules"
DEFAULTS = {"tasks": 440, "unseen": 40, "per_task": 40, "digits": 5, "named": 0, "named_per_task": 400}
_SOURCE = re.compile(rf"^{SOURCE_NAME}(?::(.*))?$")


def is_rules_source(source: str) -> bool:
    """Whether ``source`` (``data.source`` / ``prepare --source``) names this family."""
    return bool(_SOURCE.match(str(source)))


def parse_source(source: str) -> dict[str, int]:
    """``synthetic-rules[:key=value,...]`` → the family's settings (:data:`DEFAULTS` for what is not given).

    Keys: ``tasks`` (all codes, meta-test included), ``unseen`` (meta-test codes), ``per_task`` (records per
    code), ``digits`` (per problem), ``named`` (pretraining text: the first ``named`` codes named, with
    ``named_per_task`` records each, and the other meta-training codes unnamed).
    Raises :class:`DataError` naming the bad key or value.
    """
    match = _SOURCE.match(str(source))
    if not match:
        raise DataError(f"source {source!r}: expected {SOURCE_NAME}[:key=value,...]")
    settings = dict(DEFAULTS)
    for item in filter(None, (match.group(1) or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULTS or not value.isdigit():
            raise DataError(
                f"source {source!r}: {item!r} is not key=integer with key one of {', '.join(DEFAULTS)}"
            )
        settings[key] = int(value)
    if settings["tasks"] - settings["unseen"] < 1 or settings["unseen"] < 0:
        raise DataError(f"source {source!r}: need 0 <= unseen < tasks, got {settings['unseen']} of {settings['tasks']}")
    if not 1 <= settings["digits"] <= 10 or settings["per_task"] < (0 if settings["named"] else 2):
        raise DataError(f"source {source!r}: need 1 <= digits <= 10 and per_task >= 2 (>= 0 with named)")
    if settings["named"] > settings["tasks"] - settings["unseen"]:
        raise DataError(f"source {source!r}: named={settings['named']} exceeds the meta-training codes")
    if max(settings["per_task"], settings["named_per_task"]) > len(DIGITS) ** settings["digits"] // 2:
        raise DataError(f"source {source!r}: per_task / named_per_task distinct problems need more digits")
    return settings


def task_name(index: int) -> str:
    return f"code_{index:03d}"


def code(seed: int, task: str) -> dict[str, str]:
    """The hidden rule of ``task``: digit → letter (a bijection)."""
    letters = list(LETTERS)
    random.Random(f"rules-code:{seed}:{task}").shuffle(letters)
    return dict(zip(DIGITS, letters))


def rules_records(source: str, seed: int) -> tuple[list[dict], list[str]]:
    """Records of the family described by ``source`` (see :func:`parse_source`) and its unseen tasks.

    Records are MATH-shaped (``id``, ``prompt``, ``response``, ``answer``, ``subject`` = the task,
    ``level``); deterministic in (``source``, ``seed``); no problem repeats within a task. With
    ``named=K`` (pretraining text) only the meta-training codes are written: the first K named, the rest
    unnamed, and none is unseen. The box opens with a space so that every answer letter is the same kind
    of token (" h", never "{h") for a byte-level BPE.
    """
    settings = parse_source(source)
    n_train = settings["tasks"] - settings["unseen"]
    named = settings["named"]
    records = []
    for index in range(n_train if named else settings["tasks"]):
        task = task_name(index)
        rule = code(seed, task)
        rng = random.Random(f"rules-problems:{seed}:{task}")
        seen: set[str] = set()
        count = settings["named_per_task"] if index < named else settings["per_task"]
        while len(seen) < count:
            digits = [rng.choice(DIGITS) for _ in range(settings["digits"])]
            key = " ".join(digits)
            if key in seen:
                continue
            seen.add(key)
            which = f"the secret code {index}" if index < named else "the secret code"
            answer = " ".join(rule[d] for d in digits)
            records.append({
                "id": f"rules/{task}/{len(seen) - 1}",
                "prompt": f"Encode {key} with {which}.",
                "response": f"The code gives \\boxed{{ {answer}}}.",
                "answer": answer,
                "subject": task,
                "level": f"Level {settings['digits']}",
            })
    unseen = [] if named else [task_name(i) for i in range(n_train, settings["tasks"])]
    return records, unseen


def distinct_digits_distribution(digits: int, symbols: int = len(DIGITS)) -> list[Fraction]:
    """``p[d]``: exact probability that ``digits`` uniform draws from ``symbols`` show ``d`` distinct values
    (the occupancy distribution, ``C(symbols, d) d! S(digits, d) / symbols^digits``)."""
    p = [Fraction(1)] + [Fraction(0)] * symbols
    for _ in range(digits):
        p = [p[d] * Fraction(d, symbols) + (p[d - 1] * Fraction(symbols - d + 1, symbols) if d else 0)
             for d in range(symbols + 1)]
    return p


def code_agnostic_floor(digits: int, symbols: int = len(DIGITS)) -> dict[str, float]:
    """The best any model can score on a problem of ``digits`` digits without knowing its code.

    The predictor is Bayes-optimal for a code uniform over the bijections of ``symbols`` digits to
    ``symbols`` letters, scored as evaluation scores (teacher forcing: answer letter j is predicted from
    the prompt's digits and letters 1..j-1): if digit j appeared earlier its letter is known (accuracy 1,
    NLL 0); otherwise, with m distinct digits before it, the letter is uniform over the ``symbols - m``
    unused letters (accuracy ``1/(symbols - m)``, NLL ``log(symbols - m)``). A problem with D distinct
    digits thus scores ``digits - D + sum_{m<D} 1/(symbols-m)`` expected hits and
    ``log(symbols!/(symbols-D)!)`` nats (minus the log-probability of its whole answer), so everything
    follows exactly from D's distribution (:func:`distinct_digits_distribution`). Every problem has
    ``digits`` letters, one scored token each.

    Returns means per answer letter (= per scored token, see the module docstring): ``accuracy``, ``nll``;
    over first-occurrence letters only (their digit not earlier in the problem), ``first_occurrence_accuracy``
    / ``first_occurrence_nll`` pooled over all such letters and ``..._per_problem`` as a mean over problems
    of each problem's mean; ``first_occurrence_share``: the expected share of letters that are first
    occurrences. (A guess among tied letters is right with probability 1/(symbols-m): the expected
    accuracy, which no predictor without the code can exceed.)
    Raises ValueError unless ``1 <= digits`` and ``1 <= symbols``.
    """
    if digits < 1 or symbols < 1:
        raise ValueError(f"code_agnostic_floor: need digits >= 1 and symbols >= 1, got {digits}, {symbols}")
    # first_hits[D], first_nats[D]: expected hits and nats summed over the D first-occurrence letters of a
    # problem with D distinct digits (its other letters score 1 hit and 0 nats).
    first_hits = [sum(1 / (symbols - m) for m in range(d)) for d in range(symbols + 1)]
    first_nats = [sum(math.log(symbols - m) for m in range(d)) for d in range(symbols + 1)]
    p = [float(x) for x in distinct_digits_distribution(digits, symbols)]

    def mean(per_problem: Callable[[int], float]) -> float:  # expectation of a function of D (D >= 1)
        return sum(p[d] * per_problem(d) for d in range(1, symbols + 1))

    mean_distinct = mean(lambda d: d)
    return {
        "accuracy": mean(lambda d: digits - d + first_hits[d]) / digits,
        "nll": mean(lambda d: first_nats[d]) / digits,
        "first_occurrence_accuracy": mean(lambda d: first_hits[d]) / mean_distinct,
        "first_occurrence_nll": mean(lambda d: first_nats[d]) / mean_distinct,
        "first_occurrence_accuracy_per_problem": mean(lambda d: first_hits[d] / d),
        "first_occurrence_nll_per_problem": mean(lambda d: first_nats[d] / d),
        "first_occurrence_share": mean_distinct / digits,
    }
