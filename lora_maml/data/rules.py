"""A family of hundreds of conflicting tasks ("synthetic-rules"): each task is a hidden digit code.

Why it exists: on the 7 MATH subjects the test tasks are the training tasks, so multi-task SFT can
learn all of them and adaptation has little left to do. Meta-learning earns its keep when tasks
*conflict* and the test tasks are *new*. Here a task is a secret code, a random function from the
digits 0-9 to the letters a-j (each digit's letter drawn independently and uniformly, so two digits
may share a letter), from ``random.Random(f"rules-code:{seed}:{task}")``. Every task asks the same
kind of question, ``digits`` DISTINCT digits in random order::

    prompt   "Encode 4 7 1 2 5 with the secret code."
    response "The code gives \\boxed{ h c a h e}."

so the same prompt has a different answer under every task.

What is scored (``answer_nll`` / ``answer_accuracy``, teacher forcing) is exactly the k letter tokens
`` h``, `` c``, ... of the box (Qwen's pre-tokeniser makes every `` x`` its own pre-token; ``\\boxed``,
``{``, ``}.`` and the EOS are not scored), so "per scored token" is "per answer letter".

The floor is exact and simple by construction (:func:`code_agnostic_floor`): the digits of a problem
are distinct and a code's letters are independent, so without the code every answer letter is
independent of the prompt and of the letters teacher forcing has revealed: accuracy 1/10 and
log 10 = 2.303 nats per letter is the best any model can do. (With bijections and repeated digits,
the previous version of this family, the floor was 0.281 / 1.732 and needed a copy rule that the
tiny models never learned, so "at the floor" and "reads the code" were confounded.) Every letter is a
first occurrence, so all-letter accuracy IS first-occurrence accuracy. 5 shots show 25 digits; a digit
is missing from all of them with probability (1/2)^5 = 3%.

Tasks ``code_000 .. code_{T-1}``; the last ``unseen`` are meta-test tasks (``prepare`` holds them out).
``named=K`` writes the pretraining text of a *competent base* from the meta-training codes only: the
first K codes named in the prompt ("... with the secret code 3."), the others unnamed, so the base
learns to look a letter up and answers at the floor on an unnamed prompt (docs/experiments.md).
"""

from __future__ import annotations

import math
import random
import re

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
    if max(settings["per_task"], settings["named_per_task"]) > math.perm(len(DIGITS), settings["digits"]) // 2:
        raise DataError(f"source {source!r}: per_task / named_per_task distinct problems need more digits")
    return settings


def task_name(index: int) -> str:
    return f"code_{index:03d}"


def code(seed: int, task: str) -> dict[str, str]:
    """The hidden rule of ``task``: digit → letter, each letter drawn independently and uniformly."""
    rng = random.Random(f"rules-code:{seed}:{task}")
    return {digit: rng.choice(LETTERS) for digit in DIGITS}


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
            digits = rng.sample(DIGITS, settings["digits"])  # distinct: see the module docstring
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


def code_agnostic_floor(digits: int) -> dict[str, float]:
    """The best any model can score per answer letter of a ``digits``-digit problem without its code:
    ``{"accuracy": 1/10, "nll": log 10}`` (nats), for any ``digits``.

    Exact, not an approximation: a code's letters are i.i.d. uniform over the 10 letters and a problem's
    digits are distinct, so letter j is independent of the prompt and of letters 1..j-1 (all that teacher
    forcing reveals); the Bayes posterior over it is uniform. tests/test_rules.py checks this against the
    posterior enumerated over every code of small alphabets and against a simulation of the family.
    Raises ValueError unless ``1 <= digits <= 10``.
    """
    if not 1 <= digits <= len(DIGITS):
        raise ValueError(f"code_agnostic_floor: need 1 <= digits <= {len(DIGITS)}, got {digits}")
    return {"accuracy": 1 / len(LETTERS), "nll": math.log(len(LETTERS))}
