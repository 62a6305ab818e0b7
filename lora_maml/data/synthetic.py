"""A procedurally generated 7-domain maths suite, one domain per MATH subject, for tiny-model runs.

Why it exists: the real MATH problems are far beyond a model small enough to train in a CPU test,
so nothing meta-learning does would show. This suite keeps MATH's shape (records, subjects, levels,
worked solutions ending in ``\\boxed{answer}``) with problems a tiny model can learn.

Design, aimed at the question meta-learning asks ("does an init that adapts fast beat multi-task
training when a task has only a few examples?"):

* Each domain has its own templates and vocabulary (shared within the domain, different across
  domains), so examples of a domain look alike and unlike other domains.
* Each domain has a **hidden convention**: a family whose problems do not say the rule that
  decides the answer ("Find 4 # 7."), while every worked solution states it ("By the rule,
  a # b = 3a + 2b."). The rule's constants are drawn per domain from the seed, so nothing but
  examples of that domain reveals them: a few support examples really help, and a model that
  learned to pick the constants up quickly is rewarded. Half of a domain's problems use it.
* The other families are plain skills of the subject (solve a linear equation, count pairs,
  a rectangle's perimeter...), so the domain's skills are worth adapting to as well.
* Levels 1-5 set the size of the numbers (and so the difficulty of the arithmetic).

Domains (hidden constants p, q; see ``_DOMAINS``):

* algebra: solve ``ax + b = c``; hidden operator ``a # b = pa + qb``.
* counting_and_probability: one-of-each choices ``a * b``; handshakes ``n(n-1)/2``;
  hidden operator ``a @ b = (a + p)b``.
* geometry: rectangle perimeter; triangle area; tiles that are a regular polygon with a hidden
  number of sides p, perimeter of several tiles.
* intermediate_algebra: evaluate a quadratic; Vieta ``r^2 + t^2``; hidden ``a % b = a^2 + pb``.
* number_theory: remainders; hidden ``a ~ b = (a + b) mod p``.
* prealgebra: order of operations; a fraction of a number; shop with hidden prices p and q.
* precalculus: dot products; 2x2 determinants; hidden line ``f(x) = px + q``, find ``f(a) + f(b)``.

Texts are short (problem + solution at most :data:`MAX_CHARS` characters, checked) and use a small
character set (:data:`CHARSET`) so a tiny BPE tokenizer covers them. Generation is deterministic
given ``seed`` (string-seeded ``random.Random``, independent of ``PYTHONHASHSEED``), and no problem
text (compared lowercased, whitespace collapsed) occurs twice in the suite.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from lora_maml.data import SUBJECTS
from lora_maml.data.math import make_prompt

MAX_CHARS = 250
CHARSET = frozenset(string.ascii_letters + string.digits + " \n.,:?=+-*/()^#@%~\\{}")

# Operand range per level: bigger numbers make the same step harder.
_LEVEL_RANGE = {1: (1, 9), 2: (2, 19), 3: (3, 39), 4: (10, 99), 5: (10, 199)}
# Try this many draws per requested problem before deciding a domain's space is used up.
_ATTEMPTS_PER_PROBLEM = 50

Problem = tuple[str, str, int]  # problem text, solution without the box, answer
Family = Callable[[random.Random, int, dict[str, int]], Problem]


def _num(rng: random.Random, level: int) -> int:
    low, high = _LEVEL_RANGE[level]
    return rng.randint(low, high)


def _small(rng: random.Random, level: int) -> int:
    """A number kept small because it gets squared or multiplied by a hidden constant."""
    return rng.randint(1, 2 + 2 * level)


# --- algebra ---------------------------------------------------------------------------------
def _linear_equation(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, x, b = rng.randint(2, 9), _num(rng, level), _num(rng, level)
    c = a * x + b
    return (
        f"Solve for x: {a}x + {b} = {c}.",
        f"Subtract {b} from both sides: {a}x = {c - b}.\nDivide by {a}: x =",
        x,
    )


def _hash_operator(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p, q = hidden["p"], hidden["q"]
    a, b = _num(rng, level), _num(rng, level)
    return (
        f"Find {a} # {b}.",
        f"By the rule, a # b = {p}a + {q}b.\nSo {a} # {b} = {p * a} + {q * b} =",
        p * a + q * b,
    )


# --- counting_and_probability ----------------------------------------------------------------
def _one_of_each(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, b = _num(rng, level), _num(rng, level)
    return (
        f"A cafe has {a} drinks and {b} cakes. In how many ways can we pick one drink and one cake?",
        f"Each drink goes with each cake, so there are {a} * {b} =",
        a * b,
    )


def _handshakes(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    n = _num(rng, level) + 1
    return (
        f"Each of {n} people shakes hands once with each other person. How many handshakes are there?",
        f"Each pair shakes once: {n} * {n - 1} / 2 = {n * (n - 1)} / 2 =",
        n * (n - 1) // 2,
    )


def _at_operator(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p = hidden["p"]
    a, b = _num(rng, level), _small(rng, level)
    return (
        f"Count {a} @ {b}.",
        f"By the rule, a @ b = (a + {p})b.\nSo {a} @ {b} = {a + p} * {b} =",
        (a + p) * b,
    )


# --- geometry --------------------------------------------------------------------------------
def _rectangle_perimeter(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, b = _num(rng, level), _num(rng, level)
    return (
        f"A rectangle is {a} by {b}. What is its perimeter?",
        f"The perimeter is 2({a} + {b}) = 2 * {a + b} =",
        2 * (a + b),
    )


def _triangle_area(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    base, height = 2 * _num(rng, level), _num(rng, level)
    return (
        f"A triangle has base {base} and height {height}. What is its area?",
        f"The area is {base} * {height} / 2 = {base * height} / 2 =",
        base * height // 2,
    )


def _polygon_tiles(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p = hidden["p"]
    side, tiles = _num(rng, level), _small(rng, level)
    return (
        f"Each tile is the regular polygon of the set, with side {side}. "
        f"What is the total perimeter of {tiles} tiles?",
        f"A tile has {p} sides, so its perimeter is {p} * {side} = {p * side}.\n"
        f"For {tiles} tiles: {tiles} * {p * side} =",
        tiles * p * side,
    )


# --- intermediate_algebra --------------------------------------------------------------------
def _quadratic_value(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, b, x = _num(rng, level), _num(rng, level), _small(rng, level)
    return (
        f"Let f(x) = x^2 + {a}x + {b}. Find f({x}).",
        f"f({x}) = {x}^2 + {a} * {x} + {b} = {x * x} + {a * x} + {b} =",
        x * x + a * x + b,
    )


def _vieta_squares(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    r, t = _small(rng, level), _small(rng, level)
    s, product = r + t, r * t
    return (
        f"The roots of x^2 - {s}x + {product} = 0 are r and t. Find r^2 + t^2.",
        f"By Vieta, r + t = {s} and rt = {product}.\n"
        f"r^2 + t^2 = {s}^2 - 2 * {product} = {s * s} - {2 * product} =",
        s * s - 2 * product,
    )


def _percent_operator(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p = hidden["p"]
    a, b = _small(rng, level), _num(rng, level)
    return (
        f"Compute {a} % {b}.",
        f"By the rule, a % b = a^2 + {p}b.\nSo {a} % {b} = {a * a} + {p * b} =",
        a * a + p * b,
    )


# --- number_theory ---------------------------------------------------------------------------
def _remainder(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    m = rng.randint(2, 12)
    a = _num(rng, level) * rng.randint(1, 9) + rng.randint(0, m - 1)
    return (
        f"What is the remainder when {a} is divided by {m}?",
        f"{a} = {m} * {a // m} + {a % m}, so the remainder is",
        a % m,
    )


def _tilde_modulus(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p = hidden["modulus"]
    a, b = _num(rng, level), _num(rng, level)
    total = a + b
    return (
        f"Find {a} ~ {b}.",
        f"By the rule, a ~ b is (a + b) mod {p}.\n"
        f"{a} + {b} = {total} = {p} * {total // p} + {total % p}, so {a} ~ {b} =",
        total % p,
    )


# --- prealgebra ------------------------------------------------------------------------------
def _order_of_operations(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, b, c = _num(rng, level), _num(rng, level), rng.randint(2, 9)
    return (
        f"What is {a} + {b} * {c}?",
        f"Multiply first: {b} * {c} = {b * c}.\nThen {a} + {b * c} =",
        a + b * c,
    )


def _fraction_of(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    d = rng.randint(2, 9)
    n = rng.randint(1, d - 1)
    m = d * _num(rng, level)
    return (
        f"What is {n}/{d} of {m}?",
        f"{m} / {d} = {m // d}, and {n} * {m // d} =",
        n * (m // d),
    )


def _shop_prices(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p, q = hidden["p"], hidden["q"]
    pens, pads = _num(rng, level), _num(rng, level)
    return (
        f"At the shop, how much do {pens} pens and {pads} pads cost?",
        f"A pen costs {p} and a pad costs {q}.\n"
        f"{pens} * {p} + {pads} * {q} = {pens * p} + {pads * q} =",
        pens * p + pads * q,
    )


# --- precalculus -----------------------------------------------------------------------------
def _signed(rng: random.Random, level: int) -> int:
    return rng.choice((-1, 1)) * _num(rng, level)


def _dot_product(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, b, c, d = (_signed(rng, level) for _ in range(4))
    return (
        f"Find the dot product of ({a}, {b}) and ({c}, {d}).",
        f"({a})({c}) + ({b})({d}) = {a * c} + {b * d} =",
        a * c + b * d,
    )


def _determinant(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    a, b, c, d = (_num(rng, level) for _ in range(4))
    return (
        f"Find the determinant of the matrix with rows ({a}, {b}) and ({c}, {d}).",
        f"ad - bc = {a} * {d} - {b} * {c} = {a * d} - {b * c} =",
        a * d - b * c,
    )


def _hidden_line(rng: random.Random, level: int, hidden: dict[str, int]) -> Problem:
    p, q = hidden["p"], hidden["q"]
    a, b = _num(rng, level), _num(rng, level)
    return (
        f"Find f({a}) + f({b}).",
        f"Here f(x) = {p}x + {q}.\nf({a}) = {p * a + q} and f({b}) = {p * b + q}, so the sum is",
        p * (a + b) + 2 * q,
    )


# Per domain: the hidden-convention family (drawn half of the time), the plain skill families,
# and how the hidden constants are drawn.
_DOMAINS: dict[str, tuple[Family, tuple[Family, ...], Callable[[random.Random], dict[str, int]]]] = {
    "algebra": (
        _hash_operator,
        (_linear_equation,),
        lambda rng: {"p": rng.randint(2, 9), "q": rng.randint(2, 9)},
    ),
    "counting_and_probability": (
        _at_operator,
        (_one_of_each, _handshakes),
        lambda rng: {"p": rng.randint(2, 9)},
    ),
    "geometry": (
        _polygon_tiles,
        (_rectangle_perimeter, _triangle_area),
        lambda rng: {"p": rng.randint(5, 12)},
    ),
    "intermediate_algebra": (
        _percent_operator,
        (_quadratic_value, _vieta_squares),
        lambda rng: {"p": rng.randint(2, 9)},
    ),
    "number_theory": (
        _tilde_modulus,
        (_remainder,),
        lambda rng: {"modulus": rng.randint(5, 13)},
    ),
    "prealgebra": (
        _shop_prices,
        (_order_of_operations, _fraction_of),
        lambda rng: {"p": rng.randint(2, 9), "q": rng.randint(2, 9)},
    ),
    "precalculus": (
        _hidden_line,
        (_dot_product, _determinant),
        lambda rng: {"p": rng.randint(2, 9), "q": rng.randint(1, 9)},
    ),
}
assert tuple(_DOMAINS) == SUBJECTS


def hidden_constants(seed: int) -> dict[str, dict[str, int]]:
    """The hidden constants of every domain for ``seed`` (for analysis; problems never state them)."""
    return {
        domain: draw(random.Random(f"synthetic-hidden:{seed}:{domain}"))
        for domain, (_, _, draw) in _DOMAINS.items()
    }


def synthetic_records(n_per_task: int, seed: int) -> list[dict]:
    """``n_per_task`` records per domain, ids ``synthetic/<domain>/<i>``, deterministic in ``seed``."""
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise ValueError(f"n_per_task must be a positive integer, got {n_per_task!r}")
    hidden = hidden_constants(seed)
    seen: set[str] = set()
    records: list[dict] = []
    for domain, (convention, skills, _) in _DOMAINS.items():
        rng = random.Random(f"synthetic:{seed}:{domain}")
        made = attempts = 0
        while made < n_per_task:
            attempts += 1
            if attempts > _ATTEMPTS_PER_PROBLEM * n_per_task + 1000:
                raise ValueError(
                    f"synthetic domain {domain!r}: only {made} distinct problems found for "
                    f"n_per_task={n_per_task}; ask for fewer"
                )
            level = rng.randint(1, 5)
            family = convention if rng.random() < 0.5 else rng.choice(skills)
            problem, steps, answer = family(rng, level, hidden[domain])
            key = " ".join(problem.lower().split())
            if key in seen:
                continue
            seen.add(key)
            records.append(_record(domain, made, level, problem, steps, str(answer)))
            made += 1
    return records


def _record(domain: str, index: int, level: int, problem: str, steps: str, answer: str) -> dict:
    return {
        "id": f"synthetic/{domain}/{index}",
        "prompt": make_prompt(problem),
        "response": f"{steps} \\boxed{{{answer}}}.",
        "answer": answer,
        "subject": domain,
        "level": f"Level {level}",
    }
