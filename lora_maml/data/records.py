"""Your own collection of named tasks as a source: ``records:PATH_OR_HUB_ID[,key=value,...]``.

The field's few-shot benchmarks (CrossFit, Super-NaturalInstructions, UnifiedQA) are collections of named
tasks; this source reads one from a ``.jsonl`` file, a ``.parquet`` file or a Hugging Face dataset id
(``datasets.load_dataset(id, split=...)``) into the project's records (docs/data.md, "Your own tasks").

Each record (a JSON object per line, a parquet row, a dataset row) has a task column and EITHER a prompt and a
response column OR a chat ``messages`` column, an optional answer column and an optional ``id``. Keys of the
spec (the column names are the defaults; ``messages`` has none, naming it picks the chat form):

    task=COL       the task's name (default ``task``): letters, digits, _ . - (it becomes a file name)
    prompt=COL     the prompt, a non-empty string (default ``prompt``)
    response=COL   the response the model learns to write, a non-empty string (default ``response``)
    messages=COL   instead of prompt/response: a list of ``{"role", "content"}``, exactly one ``user`` turn then
                   one ``assistant`` turn (prompt = the user's content, response = the assistant's). A system
                   turn or a longer history cannot be held by a single-prompt record: an error naming the record
    answer=COL     the final answer (default ``answer``); when the column is absent, NLL-only scoring
    split=NAME     the split of a hub dataset (default ``train``)
    holdout=A+B    tasks held out of meta-training (``+``-separated), evaluated as unseen tasks

Answers. Either every record has one or none does. An answer must be the response's last ``\\boxed{...}``
answer (:mod:`lora_maml.boxed`): that is where evaluation scores the answer's tokens in the reference and
finds the answer of a generation to grade. Without answers the prepared records carry ``answer = ""`` and
evaluation scores the NLL of the response only (answer_nll / answer_accuracy are absent, nothing is graded).

Records: ``{"id", "prompt", "response", "answer", "subject" (= the task), "level" (= "n/a")}``; ids are the
``id`` field (a non-empty string or integer) or ``{file stem}/{line or row}`` (1-based; a hub dataset:
``{split}/{row}``), and a repeated id is an error. Every problem of a record (a missing column, an empty task or
prompt, a non-string value, an unknown role, an unsafe task name...) is a :class:`DataError` naming the file and
line or row and the expected shape: the source is the user's own, so nothing is skipped silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_maml.boxed import last_boxed
from lora_maml.data.math import DataError, iter_jsonl, iter_parquet, looks_like_hub_id
from lora_maml.data import TASK_NAME_RULE, is_task_name

PREFIX = "records:"
LEVEL = "n/a"  # the record schema's level: user tasks have none
COLUMN_KEYS = ("task", "prompt", "response", "messages", "answer")
KEYS = (*COLUMN_KEYS, "split", "holdout")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RecordsSpec:
    """A parsed ``records:`` source: where the records are and what their columns are called."""

    location: str
    task: str = "task"
    prompt: str = "prompt"
    response: str = "response"
    messages: str | None = None  # the chat form when set
    answer: str = "answer"
    split: str = "train"
    holdout: tuple[str, ...] = ()

    def shape(self) -> str:
        """The record shape this spec expects, for error messages."""
        body = (f"{self.messages!r}: [{{'role': 'user', 'content': ...}}, {{'role': 'assistant', 'content': ...}}]"
                if self.messages else f"{self.prompt!r} and {self.response!r} (non-empty strings)")
        return (f"an object with {self.task!r} (a task name) and {body}; optional {self.answer!r} (the response's "
                "last \\boxed{} answer) and 'id'")


def is_records_source(source: str) -> bool:
    """Whether ``source`` (``data.source`` / ``prepare --source``) is a ``records:`` source."""
    return str(source).startswith(PREFIX)


def parse_source(source: str) -> RecordsSpec:
    """``records:PATH_OR_HUB_ID[,key=value,...]`` → :class:`RecordsSpec` (module docstring for the keys).
    A path holding a comma cannot be given. Raises :class:`DataError` naming the bad item."""
    if not is_records_source(source):
        raise DataError(f"source {source!r}: expected {PREFIX}PATH_OR_HUB_ID[,key=value,...]")
    location, *items = str(source)[len(PREFIX):].split(",")
    if not location.strip():
        raise DataError(f"source {source!r}: no file or hub dataset id after {PREFIX!r}")
    given: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS or not value or key in given:
            problem = (f"{key!r} given twice" if key in given
                       else f"{item!r} is not key=value with key one of {', '.join(KEYS)}")
            raise DataError(f"source {source!r}: {problem} (a path cannot hold a comma)")
        given[key] = value
    if "messages" in given and given.keys() & {"prompt", "response"}:
        raise DataError(f"source {source!r}: give messages=COL or prompt=/response= columns, not both")
    holdout = tuple(filter(None, given.pop("holdout", "").split("+")))
    return RecordsSpec(location=location, holdout=holdout, **given)


def absolute_source(source: str) -> str:
    """``source`` with its location made absolute when it is a local path (a hub id stays as it is): a run's
    saved config then reads the same file from any working directory."""
    spec = parse_source(source)
    path = Path(spec.location).expanduser()
    if not (spec.location.startswith((".", "/", "~")) or path.exists()):
        return source
    rest = str(source)[len(PREFIX) + len(spec.location):]
    return f"{PREFIX}{path.resolve()}{rest}"


def read_records(source: str) -> tuple[list[dict], list[str], list[str], dict]:
    """``(records, tasks, holdout, description)`` of a ``records:`` source: the records in input order, the
    task names sorted, the spec's held-out tasks and ``{"source", "read", "answers", "columns"}`` for the
    manifest. Raises :class:`DataError` naming the file and record for anything that does not fit."""
    spec = parse_source(source)
    records: list[dict] = []
    seen: dict[str, str] = {}
    answered: tuple[bool, str] | None = None  # (has an answer, where) of the first record
    for raw, where, record_id in _iter_raw(spec):
        if record_id in seen:
            raise DataError(f"{where}: duplicate record id {record_id!r} (also at {seen[record_id]})")
        seen[record_id] = where
        record = _record(raw, where, record_id, spec)
        has_answer = bool(record["answer"])
        if answered is None:
            answered = (has_answer, where)
        elif has_answer != answered[0]:
            with_, without = (where, answered[1]) if has_answer else (answered[1], where)
            raise DataError(f"{without}: no {spec.answer!r}, but {with_} has one; give every record an answer or "
                            "none (none: NLL-only scoring)")
        records.append(record)
    if not records:
        raise DataError(f"{spec.location}: no records; expected one per line/row, each {spec.shape()}")
    tasks = sorted({r["subject"] for r in records})
    columns = {key: getattr(spec, key) for key in COLUMN_KEYS if getattr(spec, key) is not None}
    description = {"source": source, "read": len(records), "answers": answered[0], "columns": columns,
                   **({"split": spec.split} if _is_hub(spec) else {})}
    return records, tasks, list(spec.holdout), description


def _is_hub(spec: RecordsSpec) -> bool:
    return not Path(spec.location).expanduser().exists() and looks_like_hub_id(spec.location)


def _iter_raw(spec: RecordsSpec) -> Iterator[tuple[Any, str, str]]:
    """``(raw record, where, id)`` from the file or hub dataset of ``spec``."""
    path = Path(spec.location).expanduser()
    required = [spec.task, *((spec.messages,) if spec.messages else (spec.prompt, spec.response))]
    if path.is_file() and path.name.lower().endswith(".jsonl"):
        rows = iter_jsonl(path)
    elif path.is_file() and path.name.lower().endswith(".parquet"):
        rows = iter_parquet(path, required)
    elif path.exists():
        raise DataError(f"{path}: unsupported {'directory' if path.is_dir() else 'file type'}; a records source is "
                        "a .jsonl or .parquet file or a hub dataset id")
    elif _is_hub(spec):
        rows = _iter_hub(spec, required)
    else:
        raise DataError(f"{spec.location}: no such file (expected a .jsonl or .parquet file, or a hub dataset id "
                        "owner/name)")
    for raw, where, record_id, _ in rows:
        yield raw, where, record_id


def _iter_hub(spec: RecordsSpec, required: list[str]) -> Iterator[tuple[Any, str, str, None]]:
    import datasets

    try:
        rows = datasets.load_dataset(spec.location, split=spec.split)
    except Exception as exc:  # network, auth, missing split: all end the same way
        raise DataError(f"{spec.location} (split {spec.split!r}): cannot load from the Hugging Face hub: {exc}. "
                        "Offline? Save it as a .jsonl or .parquet file and pass that path.") from exc
    missing = [column for column in required if column not in rows.column_names]
    if missing:
        raise DataError(f"{spec.location} (split {spec.split!r}): missing column(s) {', '.join(missing)}; "
                        f"expected rows each {spec.shape()}")
    for number, raw in enumerate(rows, start=1):
        where = f"{spec.location}[{spec.split}]:row {number}"
        yield raw, where, _hub_id(raw, spec.split, number, where), None


def _hub_id(raw: dict, split: str, number: int, where: str) -> str:
    record_id = raw.get("id")
    if record_id is None:
        return f"{split}/{number}"
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or not str(record_id).strip():
        raise DataError(f"{where}: field 'id' must be a non-empty string or integer, got {record_id!r}")
    return str(record_id)


def _record(raw: Any, where: str, record_id: str, spec: RecordsSpec) -> dict:
    """One raw record → the project's record; :class:`DataError` naming ``where`` when it does not fit."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected {spec.shape()}, got a {type(raw).__name__}")
    task = _text(raw, spec.task, where, spec)
    if not is_task_name(task):
        raise DataError(f"{where}: task {task!r} is not a safe file name ({TASK_NAME_RULE}); task names become "
                        "the prepared files' names")
    if spec.messages:
        prompt, response = _chat(raw, where, spec)
    else:
        prompt, response = _text(raw, spec.prompt, where, spec), _text(raw, spec.response, where, spec)
    answer = ""
    if raw.get(spec.answer) is not None:
        answer = _text(raw, spec.answer, where, spec).strip()
        boxed = (last_boxed(response) or "").strip()
        if boxed != answer:
            raise DataError(
                f"{where}: {spec.answer!r} {answer!r} is not the response's last \\boxed{{}} answer "
                f"({'none' if not boxed else repr(boxed)}); evaluation scores and grades the answer there: end the "
                f"response with \\boxed{{{answer}}}, or leave {spec.answer!r} out for NLL-only scoring"
            )
    return {"id": record_id, "prompt": prompt, "response": response, "answer": answer, "subject": task,
            "level": LEVEL}


def _text(raw: dict, column: str, where: str, spec: RecordsSpec) -> str:
    """A non-empty string field of ``raw``."""
    if raw.get(column) is None:
        raise DataError(f"{where}: no {column!r}; expected {spec.shape()}")
    value = raw[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} must be a string, got {type(value).__name__}; expected {spec.shape()}")
    if not value.strip():
        raise DataError(f"{where}: {column!r} is empty; expected {spec.shape()}")
    return value


def _chat(raw: dict, where: str, spec: RecordsSpec) -> tuple[str, str]:
    """(prompt, response) of a ``messages`` record: exactly one user turn, then one assistant turn."""
    turns = raw.get(spec.messages)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {spec.messages!r} must be a non-empty list of turns; expected {spec.shape()}")
    roles = []
    for number, turn in enumerate(turns, start=1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise DataError(f"{where}: {spec.messages!r} turn {number} must be {{'role': str, 'content': str}}, "
                            f"got {turn!r:.100}")
        if turn["role"] not in ROLES:
            raise DataError(f"{where}: {spec.messages!r} turn {number}: unknown role {turn['role']!r}; expected one "
                            f"of {', '.join(ROLES)}")
        if not turn["content"].strip():
            raise DataError(f"{where}: {spec.messages!r} turn {number} ({turn['role']}) is empty")
        roles.append(turn["role"])
    if roles != ["user", "assistant"]:
        why = ("a system turn" if "system" in roles else f"the turns {'/'.join(roles)}")
        raise DataError(f"{where}: {spec.messages!r} has {why}, which a record (one prompt, one response) cannot "
                        "hold without losing it; expected exactly one user turn then one assistant turn")
    return turns[0]["content"], turns[1]["content"]
