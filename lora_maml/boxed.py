"""Extract the final answer of a worked solution: the content of its last ``\\boxed{...}``.

One implementation serves both data preparation (the reference answer of a MATH solution) and
grading (the answer a model generated), so the two can never disagree on what "the answer" is.

Forms understood (the last one in the text wins, whatever its form):

* ``\\boxed{...}`` and ``\\fbox{...}``: braces are matched, so nested groups such as
  ``\\boxed{\\frac{1}{2}}`` come back whole; a backslash escapes the next character, so ``\\{`` and
  ``\\}`` (literal braces in LaTeX) never open or close a group. Whitespace between the command and
  its ``{`` is allowed, as in LaTeX.
* ``\\boxed 5``: the space form some MATH solutions use; the answer runs up to the next whitespace or
  ``$``.

``None`` means "no answer": no box at all, the last box never closes, or a space form with nothing
after it. ``\\boxed{}`` is a present, balanced, empty box and gives ``""``; callers that need a usable
answer treat the empty string as missing.
"""

from __future__ import annotations

import re

# A command name ends at the first non-letter: ``\boxedx`` is some other macro, not a box.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACE_FORM_END = re.compile(r"[\s$]")


def last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed 5`` in ``text``."""
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    rest = text[last.end():]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _braced_group(stripped)
    if last.group().endswith("boxed") and stripped and len(stripped) < len(rest):
        # Space form: ``\boxed 5`` needs whitespace between the command and the answer.
        token = _SPACE_FORM_END.split(stripped, maxsplit=1)[0]
        return token or None
    return None


def _braced_group(text: str) -> str | None:
    """Content of the ``{...}`` group that ``text`` starts with, or None when it never closes."""
    depth = 0
    i = 0
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
                return text[1:i]
        i += 1
    return None
