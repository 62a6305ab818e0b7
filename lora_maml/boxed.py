"""Extract the final answer of a worked solution: the content of its last ``\\boxed{...}``.

One implementation serves both data preparation (the reference answer of a MATH solution) and
grading (the answer a model generated), so the two can never disagree on what "the answer" is.

Forms understood:

* ``\\boxed{...}`` and ``\\fbox{...}``: braces are matched, so nested groups such as
  ``\\boxed{\\frac{1}{2}}`` come back whole; a backslash escapes the next character, so ``\\{`` and
  ``\\}`` (literal braces in LaTeX) never open or close a group. Whitespace between the command and
  its ``{`` is allowed, as in LaTeX.
* ``\\boxed 5``: the space form some MATH solutions use; the answer runs up to the next whitespace or
  ``$``.

Which box is the answer: the last one, whatever its form, except that a *placeholder* box (empty,
or a stand-in such as ``\\boxed{answer}`` / ``\\boxed{...}``, see :data:`PLACEHOLDERS`) never
overrides an earlier real answer. Small models echo their instructions after answering ("The total
is \\boxed{12}. (Remember to put your final answer in \\boxed{}.)"), and that echo is not an answer.
When every box is a placeholder, the last one's content is returned (``""`` for ``\\boxed{}``):
present, but saying nothing; callers that need a usable answer treat it as missing.

``None`` means "no answer": no box at all, the last box never closes (a generation cut off while
writing its answer), or a space form with nothing after it.
"""

from __future__ import annotations

import re

# A command name ends at the first non-letter: ``\boxedx`` is some other macro, not a box.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACE_FORM_END = re.compile(r"[\s$]")
_SPACES = re.compile(r"\s*")

# Box contents that stand for "the answer goes here" rather than being one (compared after
# dropping whitespace, ``$`` and a ``\text{..}`` wrapper, case-insensitively).
PLACEHOLDERS = frozenset(
    {"", "...", "\\ldots", "\\dots", "\\cdots", "?", "answer", "theanswer", "youranswer",
     "finalanswer", "thefinalanswer", "yourfinalanswer", "ans"}
)
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textrm|textbf|textit|mathrm|mbox)\{(.*)\}$")

# What may stand between two boxes of one multi-part answer ("\boxed{2} and \boxed{7}",
# "$x = \boxed{2}$ or $x = \boxed{7}$", "\boxed{2},\quad \boxed{7}"): connectives and an optional
# "name =" before the next box. Anything else (a sentence, a computation) separates two answers.
_MAX_CONNECTIVE_CHARS = 64
_CONNECTIVE_NOISE = re.compile(r"\$|\\[,;:! ]|\\q?quad(?![A-Za-z])|\\\\|~|\\(?:text|textrm|mbox)\{|\}")
_CONNECTIVE = re.compile(
    r"(?:\s|,|;|&|\band\b|\bor\b)*(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*)?", re.IGNORECASE
)


def is_placeholder(content: str) -> bool:
    """True when a box's content is a stand-in for an answer (``""``, ``answer``, ``\\ldots``...)."""
    text = re.sub(r"[\s$]", "", content)
    wrapped = _TEXT_WRAPPER.match(text)
    if wrapped:
        text = wrapped.group(1)
    return text.lower() in PLACEHOLDERS


def last_boxed(text: str) -> str | None:
    """Return the content of the last real ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5``."""
    boxes = final_boxes(text)
    return None if boxes is None else boxes[-1]


def final_boxes(text: str) -> list[str] | None:
    """Contents of the boxes that end the solution: the last real box (see :func:`last_boxed`)
    and the boxes before it that are joined to it only by connectives (``,``, ``and``, ``or``,
    ``x =``), in text order. ``["2", "7"]`` for "The solutions are \\boxed{2} and \\boxed{7}.";
    ``["5"]`` for "First \\boxed{3}, then correcting: \\boxed{5}". None when there is no answer.
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    placeholder = None
    run: list[str] = []
    run_start = 0
    for match in reversed(matches):
        box = _box_at(text, match)
        if not run:
            if box is None:
                # The last box never closes (or a space form is empty): the answer was cut off.
                # Before any real box, this ends the search; an echo after it is still no answer.
                return None if placeholder is None else [placeholder]
            content, _ = box
            if is_placeholder(content):
                placeholder = content if placeholder is None else placeholder
                continue
            run, run_start = [content], match.start()
            continue
        if box is None or is_placeholder(box[0]) or not _is_connective(text[box[1]:run_start]):
            break
        run.append(box[0])
        run_start = match.start()
    if run:
        return run[::-1]
    return [placeholder]


def _box_at(text: str, match: re.Match) -> tuple[str, int] | None:
    """(content, end offset) of the box whose command is ``match``, or None when it has none."""
    # Offsets into ``text``, never slices of its rest: a generation can hold 10^5 boxes.
    start = _SPACES.match(text, match.end()).end()
    if text.startswith("{", start):
        close = _braced_group_close(text, start)
        return None if close is None else (text[start + 1:close], close + 1)
    if match.group().endswith("boxed") and start < len(text) and start > match.end():
        # Space form: ``\boxed 5`` needs whitespace between the command and the answer.
        end = _SPACE_FORM_END.search(text, start)
        end = len(text) if end is None else end.start()
        return (text[start:end], end) if end > start else None
    return None


def _braced_group_close(text: str, start: int) -> int | None:
    """Index of the ``}`` closing the ``{...}`` group opened at ``text[start]``, or None."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _is_connective(between: str) -> bool:
    if len(between) > _MAX_CONNECTIVE_CHARS:
        return False
    return _CONNECTIVE.fullmatch(_CONNECTIVE_NOISE.sub(" ", between)) is not None
