"""Argument types of the programs' numeric options: a value out of range is refused while the command
line is parsed (argparse's one ``error:`` line, exit code 2), before anything is read or loaded.

``float("nan")`` and ``float("inf")`` parse, and NaN fails no ``<`` comparison, so a bare ``type=float``
lets ``--adapt-lr nan`` run a whole evaluation before anything notices; every float option takes one of
these instead. A type also works where a program parses values itself (``--adapt-lr NAME=V``): the error
is a ``ValueError`` too.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from lora_maml.config import MIN_MAX_LENGTH


class OutOfRange(argparse.ArgumentTypeError, ValueError):
    """A value that does not parse or is out of range; argparse prints its message."""


def _number(cast: Callable[[str], float], expected: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise OutOfRange(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise OutOfRange(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


positive_float = _number(float, "a finite number > 0", lambda v: v > 0)
non_negative_float = _number(float, "a finite number >= 0", lambda v: v >= 0)
fraction = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
positive_int = _number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
# A token cap: see lora_maml.config.MIN_MAX_LENGTH for why it has a floor.
length_cap = _number(int, f"an integer >= {MIN_MAX_LENGTH} (the chat template's markers alone take 8 tokens)",
                     lambda v: v >= MIN_MAX_LENGTH)
