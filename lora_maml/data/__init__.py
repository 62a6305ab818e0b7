"""Data: MATH sources, the embedded synthetic suite, your own records, prepared splits, tokenisation, episodes."""

import re

# The 7 MATH subjects are the meta-learning tasks; this order is the canonical one everywhere.
SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

# A task's name is part of its split files' names (prepare.part_path): nothing that could leave the directory
# ("..", a separator) or hide a file (a leading "."), and short enough for any file system with the suffix.
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
TASK_NAME_RULE = "letters, digits, _ . - starting with a letter or digit, at most 100 characters"


def is_task_name(name: object) -> bool:
    """Whether ``name`` can name a task (:data:`TASK_NAME_RULE`)."""
    return isinstance(name, str) and _TASK_NAME.fullmatch(name) is not None
