"""Grade generated solutions against MATH reference answers.

A generation is graded on its final answer: the content of its last real ``\\boxed{...}`` (found
by :func:`lora_maml.boxed.last_boxed`, the same extractor data preparation uses; an echoed
``\\boxed{}`` after it does not count). When the gold has several comma-separated parts
(:func:`answer_parts`), the boxes that end the generation joined by connectives
(:func:`lora_maml.boxed.final_boxes`: "\\boxed{2} and \\boxed{7}") are one answer, ``2, 7``.
Two verdicts are reported side by side:

* ``math_verify``: semantic equivalence by the ``math-verify`` package (``\\frac12`` = ``0.5``,
  ``2\\sqrt3`` = ``\\sqrt{12}``, ``\\{1,2\\}`` = ``\\{2,1\\}``, ...), with its numeric leniency
  bounded: exact values that differ are never equal (see :func:`_numbers_differ`). This is the
  headline accuracy.
* ``strict``: equality of the two answers after the purely notational clean-up of
  :func:`normalize_answer`. A conservative cross-check on math-verify's leniency.

Grading never hangs and never raises on what a model generated. math-verify bounds its own work
with ``SIGALRM``, which Python only allows in the main thread, so:

* in the main thread, math-verify runs here with its signal timeouts (``timeout_s`` per parse and
  per comparison, so a few times ``timeout_s`` in the worst case);
* in any other thread, it runs in a child interpreter (started on first use, shared by all
  threads, one request at a time) whose main thread has working signal timeouts, and which is
  killed and replaced when a request overruns a hard deadline. A length cap alone cannot bound
  the work: ``9^{9^{9}}`` is nine characters and never finishes without a timeout.

Before math-verify sees them, both answers lose surrounding whitespace and trailing periods
(math-verify fails to parse ``5.``); answers longer than :data:`MAX_ANSWER_CHARS` are not given
to it at all (verdict False).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from lora_maml.boxed import final_boxes, last_boxed

DEFAULT_TIMEOUT_S = 5
# The longest reference answer in MATH (train + test) is 159 characters; a "final answer" 10x
# that is a runaway generation, and feeding it to sympy only burns the timeout.
MAX_ANSWER_CHARS = 2000
METRIC_PATH = Path(__file__).resolve().parent / "metric" / "math_accuracy.py"

# Hard deadline of one request to the child interpreter: its parses and comparisons each have
# ``timeout_s`` (gold parse + prediction parse + the symbolic comparison + the exact-number
# check), plus slack for IPC.
_CHILD_TIMEOUTS_PER_REQUEST = 5
_CHILD_SLACK_S = 5.0
# Starting the child imports sympy and math-verify (a few seconds; more on a loaded machine).
_CHILD_STARTUP_S = 120.0
_CHILD_READY = "ready"
_CHILD_MAIN = "from lora_maml.eval.grading import _serve_child; _serve_child()"


# ---------------------------------------------------------------------------------------------
# Strict notational match
# ---------------------------------------------------------------------------------------------

_TEXT_COMMANDS = r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mbox)"
# A text group closing the answer after some maths is a unit: ``5\text{ cm}``, ``3\mbox{ in}^2``.
_TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|textrm|mbox)\{[^{}]*\}(?:\^\{?\d\}?)?\s*$")
_TEXT_GROUP = re.compile(_TEXT_COMMANDS + r"\{([^{}]*)\}")
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
# ``\\`` (a matrix row break) is matched first so that its second backslash is never read as
# the start of ``\ `` (a spacing command) in ``1 \\ 2``.
_SPACING = re.compile(r"(\\\\)|\\[!,:; ]|\\q?quad(?![A-Za-z])|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree(?![A-Za-z])|°")
_FRAC_STYLES = re.compile(r"\\[dt]frac(?![A-Za-z])")
# ``\frac12`` / ``\frac1{2}`` / ``\frac{1}2`` / ``\sqrt3``: TeX takes one token as the argument.
_FRAC_SHORTHAND = re.compile(r"\\frac(\d|\{[^{}]*\})(\d|\{[^{}]*\})")
_SQRT_SHORTHAND = re.compile(r"\\sqrt(\d)")


def normalize_answer(answer: str) -> str:
    """Notational normal form of an answer, for the strict match. Exactly these steps, in order:

    1. ``\\$`` and ``$`` are removed (currency and math-mode delimiters).
    2. ``\\left`` / ``\\right`` and ``\\displaystyle`` are removed (the delimiters they size stay).
    3. ``\\dfrac`` / ``\\tfrac`` become ``\\frac``.
    4. Degree marks ``^\\circ``, ``^{\\circ}``, ``\\degree``, ``°`` and percent signs ``\\%``,
       ``%`` are removed.
    5. Units: a ``\\text{..}`` / ``\\textrm{..}`` / ``\\mbox{..}`` group (optionally squared/cubed,
       ``^2``) that ends the answer after some maths is removed, repeatedly (``5\\text{ cm}`` ->
       ``5``). Any other ``\\text``-like group (also ``\\textbf``, ``\\textit``, ``\\mathrm``,
       ``\\mathbf``) is replaced by its content (``\\text{(A)}`` -> ``(A)``).
    6. Spacing commands ``\\!``, ``\\,``, ``\\:``, ``\\;``, ``\\ ``, ``\\quad``, ``\\qquad``, ``~``
       and then all whitespace are removed.
    7. TeX one-token arguments get braces: ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt3`` ->
       ``\\sqrt{3}``.
    8. Trailing ``.`` are removed, and a leading ``.5`` becomes ``0.5``.

    Nothing else: ``x=5`` is not ``5``, ``0.5`` is not ``\\frac{1}{2}``, and order inside sets
    and tuples matters. Judging those is math-verify's job.
    """
    text = answer.replace("\\$", "").replace("$", "")
    text = _LEFT_RIGHT.sub("", text).replace("\\displaystyle", "")
    text = _FRAC_STYLES.sub(r"\\frac", text)
    text = _DEGREES.sub("", text).replace("\\%", "").replace("%", "")
    while True:
        without_unit = _TRAILING_UNIT.sub("", text)
        if without_unit == text:
            break
        text = without_unit
    text = _TEXT_GROUP.sub(r"\1", text)
    text = re.sub(r"\s+", "", _SPACING.sub(lambda m: m.group(1) or "", text))
    text = _FRAC_SHORTHAND.sub(lambda m: rf"\frac{_braced(m.group(1))}{_braced(m.group(2))}", text)
    text = _SQRT_SHORTHAND.sub(r"\\sqrt{\1}", text)
    text = text.rstrip(".")
    if text.startswith(".") and text[1:2].isdigit():
        text = "0" + text
    return text


def _braced(argument: str) -> str:
    return argument if argument.startswith("{") else "{" + argument + "}"


def strict_match(prediction: str, gold: str) -> bool:
    """True when both answers are non-empty and equal after :func:`normalize_answer`."""
    normalized = normalize_answer(prediction)
    return bool(normalized) and normalized == normalize_answer(gold)


# ---------------------------------------------------------------------------------------------
# math-verify
# ---------------------------------------------------------------------------------------------


def _verify_in_this_thread(gold: str, prediction: str, timeout_s: int) -> bool:
    """math-verify with its SIGALRM timeouts, then the exact-number check; main thread only."""
    # Imported here: sympy takes seconds to import, and strict-only users never need it.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException
    from math_verify.utils import timeout

    # Both answers are bare (no surrounding prose), so wrapping them in a box makes the LaTeX
    # extractor take the whole answer; the expression extractor catches plain ``1/2``.
    extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    try:
        gold_parsed, pred_parsed = (
            parse(f"$\\boxed{{{answer}}}$", extraction_config=extraction, parsing_timeout=timeout_s)
            for answer in (gold, prediction)
        )
        # Gold first: verify() is not symmetric (assignments and equation/interval conversion).
        if not verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s):
            return False
    except (Exception, TimeoutException):
        # Any failure to parse or compare a generated answer means "not shown correct".
        return False
    if normalize_answer(gold) == normalize_answer(prediction):
        return True  # the same text has the same value; no need to evaluate 9^{9^{9}}
    try:
        return not timeout(timeout_s)(_numbers_differ)(gold_parsed[0], pred_parsed[0])
    except (Exception, TimeoutException):
        # Values too large to evaluate in time: math-verify's verdict stands.
        return True


# math-verify's numeric fallback evaluates ``gold - prediction`` to 15 digits with ``chop=True``,
# which rounds any difference below ~1e-15 to zero: 1/2^70 "equals" 1/2^71, 10^-20 equals
# 2*10^-20 (math-verify issue #14). Its float rule rounds to 6 decimal places, so all numbers
# below 5e-7 are equal to each other. After math-verify says True, real values are checked again:
# * exact rationals (integers, fractions, powers, factorials: no decimal point) must be equal;
# * other exact reals (roots, pi, logs) must agree to a relative 10^-_EXACT_RELATIVE_DIGITS,
#   evaluated with guaranteed precision well beyond that;
# * where a decimal is involved, they must also agree to _SIGNIFICANT_DIGITS significant digits
#   (math-verify's 6 decimal places already make 1/3 = 0.333333, and keep doing so).
_EXACT_RELATIVE_DIGITS = 40
_SIGNIFICANT_DIGITS = 6


def _numbers_differ(gold, prediction) -> bool:
    """True when both parsed answers are real numbers, or equally shaped tuples / sets /
    intervals / matrices of rationals, or assignments ``x = number``, whose values differ."""
    import mpmath
    from sympy import Float

    gold_value, pred_value = _number_value(gold), _number_value(prediction)
    if gold_value is None or pred_value is None or gold_value[0] != pred_value[0]:
        return False
    (kind, gold_value), (_, pred_value) = gold_value, pred_value
    if kind != "number":
        return gold_value != pred_value
    if gold_value.is_Rational and pred_value.is_Rational:
        return gold_value != pred_value
    digits = _EXACT_RELATIVE_DIGITS + 10
    a, b = (mpmath.mpf(value.evalf(digits)) for value in (gold_value, pred_value))
    if gold_value.has(Float) or pred_value.has(Float):
        return mpmath.nstr(a, _SIGNIFICANT_DIGITS) != mpmath.nstr(b, _SIGNIFICANT_DIGITS)
    with mpmath.workdps(digits):
        return abs(a - b) > mpmath.mpf(10) ** -_EXACT_RELATIVE_DIGITS * max(abs(a), abs(b))


def _number_value(expr) -> tuple | None:
    """``(kind, value)`` of a parsed answer: ``("number", expr)`` for a real number or an
    assignment ``x = number``; ``("set", frozenset)``, ``(("array", shape), tuple)`` or
    ``("interval", (start, end, left_open, right_open))`` when made of rationals (and infinities);
    else None. Percentages (math-verify keeps their ``1/100`` unevaluated) are left to math-verify."""
    from sympy import Basic, Eq, FiniteSet, Interval, MatrixBase, Symbol, Tuple, UnevaluatedExpr, oo

    if isinstance(expr, Eq) and isinstance(expr.lhs, Symbol):
        return _number_value(expr.rhs)
    if isinstance(expr, (Tuple, FiniteSet, MatrixBase, Interval)):
        if isinstance(expr, Interval):
            ends, flags = expr.args[:2], expr.args[2:]
            items = [("number", end) if end in (oo, -oo) else _number_value(end) for end in ends]
        else:
            items = [_number_value(item) for item in (list(expr) if isinstance(expr, MatrixBase) else expr.args)]
        if not items or any(item is None or not (item[1].is_Rational or item[1].is_infinite) for item in items):
            return None
        values = tuple(value for _, value in items)
        if isinstance(expr, Interval):
            return "interval", values + tuple(flags)
        if isinstance(expr, FiniteSet):
            return "set", frozenset(values)
        return ("array", getattr(expr, "shape", (len(values),))), values
    if not isinstance(expr, Basic) or expr.free_symbols or expr.has(UnevaluatedExpr):
        return None
    value = expr.doit()
    return ("number", value) if value.is_extended_real and value.is_finite else None


class _ChildVerifier:
    """math-verify in a child interpreter, for graders running outside the main thread.

    Line protocol over pipes: the child writes ``ready`` once imported, then answers each JSON
    request ``{"gold", "prediction", "timeout_s"}`` with a JSON ``{"math_verify": bool}``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def forget_after_fork(self) -> None:
        """In a forked process: the inherited child (and lock state) belong to the parent."""
        self._lock = threading.Lock()
        self._process = None

    def verify(self, gold: str, prediction: str, timeout_s: int, deadline_s: float) -> bool:
        """math-verify's verdict, or False when the child has not answered within ``deadline_s``."""
        with self._lock:
            process = self._running()
            request = json.dumps({"gold": gold, "prediction": prediction, "timeout_s": timeout_s})
            deadline = time.monotonic() + deadline_s
            try:
                process.stdin.write((request + "\n").encode())
                process.stdin.flush()
                reply = _read_line(process, deadline)
                return bool(json.loads(reply)["math_verify"])
            except (OSError, ValueError, KeyError, TimeoutError):
                # Overran the deadline, or died (e.g. out of memory on a huge power): this answer
                # is not shown correct, and the next request gets a fresh child.
                self.close()
                return False

    def _running(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self.close()
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            ready = _read_line(self._process, time.monotonic() + _CHILD_STARTUP_S)
        except (OSError, TimeoutError) as error:
            self.close()
            raise RuntimeError(
                f"lora_maml/eval/grading.py: the math-verify child interpreter "
                f"({sys.executable}) did not start within {_CHILD_STARTUP_S:.0f}s ({error}); "
                "see its stderr above"
            ) from error
        if ready != _CHILD_READY:
            self.close()
            raise RuntimeError(
                f"lora_maml/eval/grading.py: the math-verify child interpreter said {ready!r} "
                f"instead of {_CHILD_READY!r}"
            )
        return self._process

    def close(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _read_line(process: subprocess.Popen, deadline: float) -> str:
    """One line from the child's stdout, or TimeoutError at ``deadline`` / OSError when it died."""
    fd = process.stdout.fileno()
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply before the deadline")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise OSError(f"child exited with code {process.wait()}")
            data += chunk
    return data.decode().strip()


def _serve_child() -> None:
    """Child side of :class:`_ChildVerifier`: serve requests on stdin until it closes."""
    # The protocol owns the real stdout; anything a library prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import math_verify  # noqa: F401  (import before "ready", so startup time is not request time)

    protocol.write(_CHILD_READY + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        gold, prediction, timeout_s = request["gold"], request["prediction"], request["timeout_s"]
        verdict = _verify_in_this_thread(gold, prediction, timeout_s)
        protocol.write(json.dumps({"math_verify": verdict}) + "\n")
        protocol.flush()


_CHILD = _ChildVerifier()
atexit.register(_CHILD.close)
# A forked process (e.g. a fork-started data-loader worker) must not write into its parent's
# child's pipes, nor kill it.
os.register_at_fork(after_in_child=_CHILD.forget_after_fork)


def math_verify_match(prediction: str, gold: str, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """True when math-verify shows the predicted answer equal to the gold answer (both bare)."""
    # math-verify cannot parse a number with a trailing period (``\boxed{5.}``), which only ends
    # the sentence.
    prediction, gold = prediction.strip().rstrip("."), gold.strip().rstrip(".")
    if not prediction or not gold:
        return False
    if len(prediction) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    if threading.current_thread() is threading.main_thread():
        return _verify_in_this_thread(gold, prediction, timeout_s)
    deadline_s = _CHILD_TIMEOUTS_PER_REQUEST * timeout_s + _CHILD_SLACK_S
    return _CHILD.verify(gold, prediction, timeout_s, deadline_s)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

# A comma between digit groups ("1,000") is a thousands separator, not a separator of parts.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def answer_parts(answer: str) -> list[str]:
    """The comma-separated parts of an answer at bracket depth 0: ``"2, 7"`` -> ``["2", "7"]``;
    ``"(2, 7)"``, ``"\\{2,7\\}"`` and ``"1,000"`` are one part each."""
    parts, depth, start = [], 0, 0
    text = _THOUSANDS_COMMA.sub(" ", answer)
    for i, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(answer[start:i].strip())
            start = i + 1
    parts.append(answer[start:].strip())
    return parts



def grade(prediction_text: str, gold_answer: str, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> dict:
    """Grade one generation against one reference answer.

    ``gold_answer`` is the bare reference answer (a record's ``"answer"``); a full reference
    solution also works (its last box is used). Returns ``{"extracted": str | None,
    "math_verify": bool, "strict": bool}``: ``extracted`` is the answer compared: the last boxed
    answer of the generation, or its final boxes joined by ``", "`` when the gold has several
    parts (None when it has none, and then both verdicts are False).
    """
    if not isinstance(prediction_text, str):
        raise TypeError(
            f"grade(): prediction_text must be str, got {type(prediction_text).__name__}"
        )
    if not isinstance(gold_answer, str):
        raise TypeError(f"grade(): gold_answer must be str, got {type(gold_answer).__name__}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s < 1:
        # signal.alarm() counts whole seconds; 0 would silently disable the timeout.
        raise ValueError(f"grade(): timeout_s must be a positive int (seconds), got {timeout_s!r}")
    boxes = final_boxes(prediction_text)
    if boxes is None:
        return {"extracted": None, "math_verify": False, "strict": False}
    gold = last_boxed(gold_answer)
    if gold is None:
        gold = gold_answer
    # "The solutions are \boxed{2} and \boxed{7}." answers a gold "2, 7" as a whole; against a
    # one-part gold only the last box counts, as always.
    extracted = ", ".join(boxes) if len(answer_parts(gold)) > 1 else boxes[-1]
    return {
        "extracted": extracted,
        "math_verify": math_verify_match(extracted, gold, timeout_s=timeout_s),
        "strict": strict_match(extracted, gold),
    }


def grade_batch(
    predictions: Sequence[str], golds: Sequence[str], *, timeout_s: int = DEFAULT_TIMEOUT_S
) -> list[dict]:
    """:func:`grade` over aligned lists of generations and reference answers."""
    if len(predictions) != len(golds):
        raise ValueError(
            f"grade_batch(): {len(predictions)} predictions but {len(golds)} gold answers; "
            "they must be aligned one to one"
        )
    return [grade(p, g, timeout_s=timeout_s) for p, g in zip(predictions, golds)]


def accuracy(grades: Sequence[dict]) -> dict[str, float]:
    """``{"accuracy", "strict_accuracy"}``: fractions of grades with each verdict True."""
    if not grades:
        raise ValueError("accuracy(): no grades; accuracy of an empty set is undefined")
    n = len(grades)
    return {
        "accuracy": sum(g["math_verify"] for g in grades) / n,
        "strict_accuracy": sum(g["strict"] for g in grades) / n,
    }


def load_metric(**load_kwargs):
    """The ``math_accuracy`` :mod:`evaluate` metric (:data:`METRIC_PATH`), loaded offline: the grader
    the few-shot evaluation uses, and ``evaluate.load(str(METRIC_PATH))`` for your own generations.

    ``load_kwargs`` go to :func:`evaluate.load`; ``keep_in_memory`` defaults to True (no Arrow
    cache files for a single-process metric).
    """
    # Imported here: evaluate pulls in datasets, which grading itself does not need.
    import evaluate

    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(METRIC_PATH), **load_kwargs)
