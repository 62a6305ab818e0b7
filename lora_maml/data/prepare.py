"""Split records into per-task support/query/test files, reproducibly, and read them back.

Layout written by :func:`prepare` (from records) and :func:`prepare_from_source` (from a MATH source, the
synthetic suite, a generated family or your own records; the program is ``recipes/prepare_math_data.py`` =
``lora-maml prepare``)::

    <output_dir>/meta_train/{task}_support.parquet   support examples of meta-training tasks
    <output_dir>/meta_train/{task}_query.parquet     query examples of meta-training tasks
    <output_dir>/few_shot_eval/{task}_test.parquet   the rest of every task; all of a held-out task
    <output_dir>/dataset_summary.csv                 task, support, query, test, total
    <output_dir>/manifest.json                       how it was made, and row counts + hashes

Splitting, per task: records sorted by id (input order never matters), shuffled with
``random.Random(f"{seed}:{task}")``, cut to ``max_samples``, then ``floor(n * support_ratio)`` go to
support, ``floor(n * query_ratio)`` to query and the rest to test. Held-out tasks go wholly to test.

Leakage guards. Records whose problems are equal (prompt lowercased, whitespace collapsed, and answer) are
kept together: inside a task, a group of equal problems goes to one split as a whole (the cut
points move by at most the group size; MATH train has one such pair, in algebra); across tasks,
the problem stays with the first task in task order and its copies in later tasks are
dropped and listed in the manifest under ``dropped`` (MATH train+test has one such pair).

Reproducibility: the same records and arguments give byte-identical files on the same pyarrow
version (fixed schema, no pandas metadata, fixed compression, no timestamps). The manifest holds
both the sha256 of every file and a pyarrow-independent sha256 of its rows.

Everything is written into a temporary directory next to ``output_dir`` and renamed into place at
the end, so a failed run leaves nothing behind and a reader never sees half a dataset.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lora_maml.atomic import atomic_dir
from lora_maml import __version__
from lora_maml.boxed import last_boxed
from lora_maml.data import SUBJECTS, TASK_NAME_RULE, is_task_name
from lora_maml.data.math import DataError, load_math_records, normalise_subject
from lora_maml.data.records import is_records_source, read_records
from lora_maml.data.rules import code_agnostic_floor, is_rules_source, parse_source, rules_records
from lora_maml.data.synthetic import synthetic_records

MANIFEST = "manifest.json"
SUMMARY = "dataset_summary.csv"
FORMAT_VERSION = 1
COLUMNS = ("id", "prompt", "response", "answer", "subject", "level")
PARTS = ("support", "query", "test")
COMPRESSION = "zstd"
MAX_REPORTED_IDS = 20
SUMMARY_MAX_ROWS = 20  # more tasks (a generated family) are summarised per group, not one row each


def normalise_problem(text: str) -> str:
    """Problem text compared lowercased, whitespace collapsed."""
    return " ".join(text.lower().split())


def problem_key(record: dict) -> str:
    """What makes two records the same problem: the normalised prompt AND the answer. A family of
    conflicting tasks asks one prompt with a different answer per task: those are different problems."""
    return f"{normalise_problem(record['prompt'])}\x00{record['answer'].strip()}"


def part_path(task: str, part: str) -> str:
    """Path of a task's split file, relative to the data directory (never outside it: ``task`` must be a task
    name, :data:`lora_maml.data.TASK_NAME_RULE`)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if not is_task_name(task):
        raise ValueError(f"task {task!r:.120} is not a task name ({TASK_NAME_RULE})")
    folder = "few_shot_eval" if part == "test" else "meta_train"
    return f"{folder}/{task}_{part}.parquet"


# --- prepare ---------------------------------------------------------------------------------
def prepare(
    records: Iterable[dict],
    output_dir: str | Path,
    *,
    support_ratio: float,
    query_ratio: float,
    seed: int,
    holdout_tasks: Sequence[str] = (),
    max_samples: int | None = None,
    source_description: dict,
    overwrite: bool = False,
    tasks: Sequence[str] = SUBJECTS,
) -> dict:
    """Split ``records`` per task and write the prepared layout; return the manifest.

    ``tasks`` are the task names, in their canonical order (the 7 MATH subjects by default; a generated
    family names its own); every record's ``subject`` must be one of them and each needs records. Records have
    an answer each or none does (``answer == ""``: a ``records:`` source without answers); the manifest's
    ``answers`` says which (:func:`has_answers`).
    ``source_description`` (JSON-serialisable: source, split, the loader's skip report...) is stored
    as the manifest's ``source``. Raises ``ValueError`` for bad arguments and :class:`DataError`
    for unusable records or an unusable ``output_dir``; nothing is written then.
    """
    _check_ratios(support_ratio, query_ratio)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive integer or None, got {max_samples!r}")
    tasks = _check_tasks(tasks)
    holdout = _check_holdout(holdout_tasks, tasks)
    try:
        source = json.loads(json.dumps(source_description, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"source_description must be JSON-serialisable: {exc}") from exc
    output_dir = Path(output_dir).expanduser()
    _check_output_dir(output_dir, overwrite)

    by_task, dropped, answers = _group_by_task(records, tasks)
    splits: dict[str, dict[str, list[dict]]] = {}
    for task in tasks:
        splits[task] = _split_task(task, by_task[task], support_ratio, query_ratio, seed, max_samples, task in holdout)

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "source": source,
        "seed": seed,
        "support_ratio": support_ratio,
        "query_ratio": query_ratio,
        "max_samples": max_samples,
        "holdout_tasks": [task for task in tasks if task in holdout],
        "tasks": {
            "meta_train": [task for task in tasks if task not in holdout],
            "few_shot_eval": list(tasks),
        },
        "dropped": dropped,
        "answers": answers,
        "counts": {
            task: {**{part: len(splits[task][part]) for part in PARTS}, "total": sum(map(len, splits[task].values()))}
            for task in tasks
        },
        "files": {},
    }
    _write_atomically(output_dir, overwrite, lambda tmp: _write_layout(tmp, splits, manifest))
    return manifest


def _check_ratios(support_ratio: float, query_ratio: float) -> None:
    for name, value in (("support_ratio", support_ratio), ("query_ratio", query_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    if support_ratio + query_ratio >= 1:
        raise ValueError(
            f"support_ratio + query_ratio must be below 1 to leave a test split, got "
            f"{support_ratio} + {query_ratio} = {support_ratio + query_ratio}"
        )


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = list(tasks)
    bad = [t for t in tasks if not is_task_name(t)]
    if not tasks or bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct names ({TASK_NAME_RULE}), got {bad or tasks}")
    folded: dict[str, str] = {}
    for task in tasks:  # "Sst2" and "sst2" would share their files on a case-insensitive file system
        other = folded.setdefault(task.casefold(), task)
        if other != task:
            raise ValueError(f"tasks {other!r} and {task!r} differ only in case; their files would collide")
    return tasks


def _check_holdout(holdout_tasks: Sequence[str], tasks: Sequence[str]) -> set[str]:
    if isinstance(holdout_tasks, str):
        raise ValueError(f"holdout_tasks must be a list of task names, got the string {holdout_tasks!r}")
    holdout = set()
    for name in holdout_tasks:
        if name not in tasks:
            raise ValueError(f"unknown holdout task {name!r}; expected one of {_names(tasks)}")
        holdout.add(name)
    if len(holdout) == len(tasks):
        raise ValueError("all tasks are held out; at least one must remain for meta-training")
    return holdout


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: output path exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise DataError(
                f"{output_dir}: output directory exists and is not empty; "
                "pass overwrite=True to replace it"
            )
        if not (output_dir / MANIFEST).is_file():
            raise DataError(
                f"{output_dir}: refusing to overwrite a non-empty directory that is not a prepared "
                f"dataset (no {MANIFEST}); choose another output_dir"
            )


def _names(tasks: Sequence[str], limit: int = 10) -> str:
    """Task names for an error message: all of them, or the first ``limit`` and a count."""
    shown = ", ".join(tasks[:limit])
    return shown if len(tasks) <= limit else f"{shown}, ... ({len(tasks)} tasks)"


def _group_by_task(records: Iterable[dict], tasks: Sequence[str]) -> tuple[dict[str, list[dict]], dict, bool]:
    """Check records, bucket them by subject, drop cross-task copies of a problem (see module doc); and
    whether the records have answers (all of them, or none: ``answer == ""``, NLL-only scoring)."""
    by_task: dict[str, list[dict]] = {task: [] for task in tasks}
    seen_ids: set[str] = set()
    first: dict | None = None
    for position, record in enumerate(records):
        _check_record(record, position, by_task)
        if record["id"] in seen_ids:
            raise DataError(f"record {record['id']!r}: duplicate id")
        seen_ids.add(record["id"])
        first = first or record
        if bool(record["answer"]) != bool(first["answer"]):
            without = record if not record["answer"] else first
            raise DataError(f"record {without['id']!r}: empty answer while other records have one; records have an "
                            "answer each or none (none: NLL-only scoring)")
        by_task[record["subject"]].append({column: record[column] for column in COLUMNS})
    owner: dict[str, str] = {}
    dropped_ids: list[str] = []
    for task in tasks:
        by_task[task].sort(key=lambda record: record["id"])
        kept = []
        for record in by_task[task]:
            key = problem_key(record)
            if owner.setdefault(key, task) != task:
                dropped_ids.append(record["id"])
                continue
            kept.append(record)
        by_task[task] = kept
    dropped = {}
    if dropped_ids:
        dropped["duplicate_of_other_task"] = {"count": len(dropped_ids), "examples": dropped_ids[:MAX_REPORTED_IDS]}
    return by_task, dropped, bool(first and first["answer"])


def _check_record(record: Any, position: int, tasks: dict | Sequence[str]) -> None:
    if not isinstance(record, dict):
        raise DataError(f"record #{position}: expected a dict, got {type(record).__name__}")
    name = f"record {record.get('id', f'#{position}')!r}"
    for column in COLUMNS:
        value = record.get(column)
        if not isinstance(value, str):
            raise DataError(f"{name}: field {column!r} must be a string, got {type(value).__name__}")
        if not value.strip() and not (column == "answer" and value == ""):  # "": no answer (NLL-only scoring)
            raise DataError(f"{name}: field {column!r} is empty")
    if record["subject"] not in tasks:
        raise DataError(f"{name}: unknown subject {record['subject']!r}; expected one of {_names(list(tasks))}")


def _split_task(
    task: str,
    records: list[dict],
    support_ratio: float,
    query_ratio: float,
    seed: int,
    max_samples: int | None,
    held_out: bool,
) -> dict[str, list[dict]]:
    if not records:
        raise DataError(f"task {task!r} has no records; every task needs some")
    rng = random.Random(f"{seed}:{task}")
    shuffled = list(records)
    rng.shuffle(shuffled)
    if max_samples is not None:
        shuffled = shuffled[:max_samples]
    if held_out:
        return {"support": [], "query": [], "test": shuffled}
    n = len(shuffled)
    n_support, n_query = math.floor(n * support_ratio), math.floor(n * query_ratio)
    if n_support == 0 or n_query == 0:
        raise DataError(
            f"task {task!r}: {n} records give {n_support} support and {n_query} query examples with "
            f"ratios {support_ratio}/{query_ratio}; use more records or larger ratios"
        )
    # Equal problems travel together; groups keep the order of their first member in the shuffle.
    groups: dict[str, list[dict]] = {}
    for record in shuffled:
        groups.setdefault(problem_key(record), []).append(record)
    pending = list(groups.values())
    parts = {}
    for part, target in (("support", n_support), ("query", n_query)):
        taken: list[dict] = []
        rest = []
        for group in pending:
            if len(taken) + len(group) <= target:
                taken.extend(group)
            else:
                rest.append(group)
        parts[part] = taken
        pending = rest
    parts["test"] = [record for group in pending for record in group]
    empty = [part for part in PARTS if not parts[part]]
    if empty:  # equal problems, kept together, can overflow a small split's target
        raise DataError(
            f"task {task!r}: its {n} records ({len(groups)} distinct problems) leave the {'/'.join(empty)} split "
            f"empty with ratios {support_ratio}/{query_ratio}; use more records or other ratios"
        )
    return parts


# --- writing ---------------------------------------------------------------------------------
def _schema() -> pa.Schema:
    return pa.schema([pa.field(column, pa.string(), nullable=False) for column in COLUMNS])


def _write_parquet(path: Path, rows: list[dict]) -> None:
    table = pa.Table.from_pylist(rows, schema=_schema())
    pq.write_table(table, path, compression=COMPRESSION)


def _rows_sha256(rows: list[dict]) -> str:
    """Hash of the rows themselves, independent of how pyarrow lays out the file."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row[column] for column in COLUMNS], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _summary_csv(counts: dict[str, dict[str, int]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", *PARTS, "total"])
    for task, row in counts.items():
        writer.writerow([task, *(row[part] for part in PARTS), row["total"]])
    return buffer.getvalue()


def _write_layout(root: Path, splits: dict[str, dict[str, list[dict]]], manifest: dict) -> None:
    (root / "meta_train").mkdir()
    (root / "few_shot_eval").mkdir()
    holdout = set(manifest["holdout_tasks"])
    for task in manifest["tasks"]["few_shot_eval"]:
        for part in PARTS:
            if part != "test" and task in holdout:
                continue
            relative = part_path(task, part)
            rows = splits[task][part]
            _write_parquet(root / relative, rows)
            manifest["files"][relative] = {
                "task": task,
                "part": part,
                "rows": len(rows),
                "sha256": _file_sha256(root / relative),
                "rows_sha256": _rows_sha256(rows),
            }
    (root / SUMMARY).write_text(_summary_csv(manifest["counts"]), encoding="utf-8")
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_atomically(output_dir: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    try:
        with atomic_dir(output_dir) as tmp:
            write(tmp)
            # Re-checked here: another run may have created output_dir while this one was writing.
            _check_output_dir(output_dir, overwrite)
    except OSError as exc:
        raise DataError(f"{output_dir}: cannot write the output directory here: {exc}") from exc


# --- reading ---------------------------------------------------------------------------------
def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared directory; :class:`DataError` if it was not prepared."""
    return copy.deepcopy(_shared_manifest(data_dir))


def _shared_manifest(data_dir: str | Path) -> dict:
    """:func:`read_manifest` without the copy, for readers that do not modify it."""
    path = Path(data_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found; {data_dir} is not a prepared data directory (run `lora-maml prepare`)")
    stat = path.stat()
    # A family of hundreds of tasks reads its manifest once per split file: parse it once per version.
    return _parse_manifest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse_manifest(path_text: str, mtime_ns: int, size: int) -> dict:
    path = Path(path_text)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from exc
    for key in ("format_version", "tasks", "files", "counts", "holdout_tasks"):
        if not isinstance(manifest, dict) or key not in manifest:
            raise DataError(f"{path}: missing key {key!r}; not a manifest written by `lora-maml prepare`")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest['format_version']!r}, this version reads {FORMAT_VERSION}")
    return manifest


def has_answers(data_dir: str | Path) -> bool:
    """Whether the records of a prepared directory have answers; without (a ``records:`` source with no answer
    column) evaluation scores NLL only and has nothing to grade."""
    return bool(_shared_manifest(data_dir).get("answers", True))  # prepared before the key: MATH-shaped, answered


def list_tasks(data_dir: str | Path) -> dict[str, list[str]]:
    """``{"meta_train": [...], "few_shot_eval": [...], "holdout": [...]}`` of a prepared directory."""
    manifest = _shared_manifest(data_dir)
    return {
        "meta_train": list(manifest["tasks"]["meta_train"]),
        "few_shot_eval": list(manifest["tasks"]["few_shot_eval"]),
        "holdout": list(manifest["holdout_tasks"]),
    }


def load_split(data_dir: str | Path, task: str, part: str) -> list[dict]:
    """Records of ``task``'s ``part`` (``support``, ``query`` or ``test``) of a prepared directory;
    :class:`DataError` naming the file when it is missing, unreadable or empty."""
    manifest = _shared_manifest(data_dir)
    relative = part_path(task, part)
    if relative not in manifest["files"]:
        if task in manifest["holdout_tasks"]:
            raise DataError(f"{data_dir}: task {task!r} is held out (few_shot_eval only); it has no {part} split")
        raise DataError(f"{data_dir}: no {part} split for task {task!r}; tasks are {', '.join(manifest['counts'])}")
    path = Path(data_dir).expanduser() / relative
    rows = _read_parquet(path)
    if not rows:  # prepare writes no empty split: nothing could be drawn or scored from it
        raise DataError(f"{path}: 0 rows; every split needs records (prepare the directory again with lora-maml prepare)")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: listed in the manifest but missing")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as parquet: {exc}") from exc
    if tuple(table.column_names) != COLUMNS or not table.schema.equals(_schema(), check_metadata=False):
        missing = [c for c in COLUMNS if c not in table.column_names]
        extra = [c for c in table.column_names if c not in COLUMNS]
        problem = f"missing column(s) {missing}" if missing else f"unexpected column(s) {extra}" if extra else (
            f"columns {table.schema} are not the expected ones in this order")
        raise DataError(f"{path}: {problem}; expected {', '.join(COLUMNS)} (all strings)")
    return table.to_pylist()


def validate(data_dir: str | Path) -> None:
    """Re-read a prepared directory and check it; :class:`DataError` names the first problem.

    Checks: the manifest's files exist, hold rows, with the expected columns; no missing or empty values (but
    every answer empty when the manifest says the records have none); every answer is the last boxed answer of
    its response (stripped); subjects match file names; ids are
    unique; no problem occurs in two files (within or across tasks); the summary, row counts and
    hashes equal the manifest's.
    """
    data_dir = Path(data_dir).expanduser()
    manifest = read_manifest(data_dir)
    listed = set(manifest["files"])
    present = {path.relative_to(data_dir).as_posix() for path in data_dir.glob("*/*.parquet")}
    if present - listed:
        raise DataError(f"{data_dir}: files not in the manifest: {', '.join(sorted(present - listed))}")
    answers = has_answers(data_dir)
    problem_owner: dict[str, tuple[str, str]] = {}
    id_owner: dict[str, str] = {}
    # Contents first, hashes last: a tampered file then gets the specific reason, not just "modified".
    contents = {relative: _read_parquet(data_dir / relative) for relative in sorted(listed)}
    for relative, rows in contents.items():
        entry = manifest["files"][relative]
        if not rows:
            raise DataError(f"{data_dir / relative}: 0 rows; every split needs records")
        for number, row in enumerate(rows, start=1):
            where = f"{data_dir / relative}: row {number} (id {row.get('id')!r})"
            for column in COLUMNS:
                if row[column] is None or not (row[column].strip() or (column == "answer" and not answers)):
                    raise DataError(f"{where}: empty {column!r}")
            if row["subject"] != entry["task"]:
                raise DataError(f"{where}: subject {row['subject']!r} in the file of task {entry['task']!r}")
            if not answers and row["answer"]:
                raise DataError(f"{where}: answer {row['answer']!r}, but the manifest says the records have none")
            if answers and (last_boxed(row["response"]) or "").strip() != row["answer"]:
                raise DataError(f"{where}: answer {row['answer']!r} is not the last boxed answer of the response")
            if row["id"] in id_owner:
                raise DataError(f"{where}: id also used in {id_owner[row['id']]}")
            id_owner[row["id"]] = relative
            key = problem_key(row)
            owner = problem_owner.setdefault(key, (relative, row["id"]))
            if owner[0] != relative:
                raise DataError(
                    f"{where}: same problem as {owner[1]!r} in {owner[0]} (support/query/test must be disjoint)"
                )
    for relative, rows in contents.items():
        entry = manifest["files"][relative]
        if not len(rows) == entry["rows"] == manifest["counts"][entry["task"]][entry["part"]]:
            raise DataError(f"{data_dir / relative}: {len(rows)} rows, the manifest says {entry['rows']}")
        if _rows_sha256(rows) != entry["rows_sha256"] or _file_sha256(data_dir / relative) != entry["sha256"]:
            raise DataError(f"{data_dir / relative}: content differs from the manifest's sha256 (file modified?)")
    summary = data_dir / SUMMARY
    if not summary.is_file() or summary.read_text(encoding="utf-8") != _summary_csv(manifest["counts"]):
        raise DataError(f"{summary}: missing or does not match the manifest's counts")


_validate = validate  # prepare_from_source's keyword ``validate`` shadows the function


# --- from a source ---------------------------------------------------------------------------
def read_source(
    source: str, *, seed: int, split: str = "train", synthetic_per_task: int = 200, holdout_tasks: Sequence[str] = ()
) -> tuple[list[dict], list[str], list[str], dict]:
    """``(records, tasks, holdout, description)`` of a source: MATH (directory, .tar/.tar.gz archive,
    jsonl/parquet file, hub id), ``synthetic`` (the generated 7-domain suite, ``synthetic_per_task`` records
    per task), ``synthetic-rules[:...]`` (the family of hidden digit codes, :mod:`lora_maml.data.rules`) or
    ``records:...`` (your own named tasks, :mod:`lora_maml.data.records`; ``split`` is MATH's only).
    ``holdout_tasks`` are checked against the source's tasks (MATH subject names are normalised); a rules
    family adds its own unseen tasks to them, a records source the tasks its spec holds out."""
    if isinstance(holdout_tasks, str):
        raise ValueError(f"holdout_tasks must be a list of task names, got the string {holdout_tasks!r}")
    tasks: list[str] = list(SUBJECTS)
    names = list(holdout_tasks)
    if source == "synthetic":
        records = synthetic_records(synthetic_per_task, seed)
        description = {"source": "synthetic", "n_per_task": synthetic_per_task, "seed": seed}
    elif is_rules_source(source):
        records, unseen = rules_records(source, seed)
        tasks = list(dict.fromkeys(r["subject"] for r in records))
        names = [*unseen, *names]
        description = {"source": source, **parse_source(source), "seed": seed,
                       "code_agnostic_floor": code_agnostic_floor(parse_source(source)["digits"])}
    elif is_records_source(source):
        records, tasks, held_out, description = read_records(source)
        names = [*held_out, *names]  # the user's own names, checked against the tasks by prepare
    else:
        # The loader's report (source, split, read, kept, skipped) describes the source.
        records, description = load_math_records(source, split=split)
    if not (is_rules_source(source) or is_records_source(source)):
        names = [normalise_subject(name, where="holdout_tasks") for name in names]
    return records, tasks, list(dict.fromkeys(names)), description


def prepare_from_source(
    source: str,
    output_dir: str | Path,
    *,
    seed: int = 42,
    support_ratio: float = 0.30,
    query_ratio: float = 0.40,
    source_split: str = "train",
    max_samples: int | None = None,
    holdout_tasks: Sequence[str] = (),
    synthetic_per_task: int = 200,
    overwrite: bool = False,
    validate: bool = False,
) -> dict:
    """Read ``source`` (:func:`read_source`; ``source_split`` is the MATH split) and write its prepared
    layout to ``output_dir`` (:func:`prepare`); with ``validate``, re-read and check it (:func:`validate`).
    ``seed`` shuffles the split and seeds the generated sources. Returns the manifest.

    Raises ``ValueError`` for bad arguments, :class:`DataError` for an unusable source or ``output_dir``,
    ``OSError`` (e.g. ``FileNotFoundError``) for a source that cannot be read; nothing is written then.
    """
    output_dir = Path(output_dir).expanduser()
    # Fail before the (slow) read when the output directory is going to be refused anyway.
    _check_output_dir(output_dir, overwrite)
    records, tasks, holdout, description = read_source(
        source, seed=seed, split=source_split, synthetic_per_task=synthetic_per_task, holdout_tasks=holdout_tasks
    )
    manifest = prepare(
        records, output_dir, support_ratio=support_ratio, query_ratio=query_ratio, seed=seed, holdout_tasks=holdout,
        max_samples=max_samples, source_description=description, overwrite=overwrite, tasks=tasks,
    )
    if validate:
        _validate(output_dir)
    return manifest


# --- summary ---------------------------------------------------------------------------------
def summary_text(manifest: dict) -> str:
    """The tasks found and a task/support/query/test/total table of a manifest, as lines of text.

    With more than :data:`SUMMARY_MAX_ROWS` tasks the table has one row per group (meta-training, held out)
    with the sums and the per-task range; ``dataset_summary.csv`` always lists every task.
    """
    lines = []
    counts = manifest["counts"]
    holdout = set(manifest["holdout_tasks"])
    if len(counts) <= SUMMARY_MAX_ROWS:
        found = ", ".join(f"{task} ({row['total']})" for task, row in counts.items())
        lines.append(f"Found {len(counts)} subjects: {found}")
    else:
        lines.append(f"Found {len(counts)} tasks ({len(holdout)} held out); every task is in {SUMMARY}")
    skipped = manifest["source"].get("skipped", {}) if isinstance(manifest["source"], dict) else {}
    for reason, entry in {**skipped, **manifest["dropped"]}.items():
        examples = ", ".join(entry["examples"][:3])
        lines.append(f"Skipped {entry['count']} record(s): {reason.replace('_', ' ')} (e.g. {examples})")
    keys = (*PARTS, "total")
    if len(counts) <= SUMMARY_MAX_ROWS:
        rows = [(f"{task} *" if task in holdout else task, {k: str(row[k]) for k in keys}) for task, row in counts.items()]
    else:
        rows = []
        for label, group in (("meta-training tasks", [t for t in counts if t not in holdout]),
                             ("held-out tasks *", [t for t in counts if t in holdout])):
            if group:
                cells = {}
                for k in keys:
                    values = [counts[t][k] for t in group]
                    cells[k] = f"{sum(values)} ({min(values)}-{max(values)})" if min(values) != max(values) else \
                        f"{sum(values)} ({values[0]} each)"
                rows.append((f"{len(group)} {label}", cells))
    width = max(len("task"), *(len(label) for label, _ in rows))
    cell = max(8, *(len(v) for _, cells in rows for v in cells.values()))
    header = f"{'task':<{width}} " + " ".join(f"{k:>{cell}}" for k in keys)
    lines += [header, "-" * len(header)]
    for label, cells in rows:
        lines.append(f"{label:<{width}} " + " ".join(f"{cells[k]:>{cell}}" for k in keys))
    lines.append("-" * len(header))
    totals = {k: str(sum(row[k] for row in counts.values())) for k in keys}
    lines.append(f"{'total':<{width}} " + " ".join(f"{totals[k]:>{cell}}" for k in keys))
    if holdout:
        lines.append("* held out: all records in few_shot_eval, none in meta_train")
    floor = manifest["source"].get("code_agnostic_floor") if isinstance(manifest["source"], dict) else None
    if floor is not None:
        lines.append(f"Tasks conflict: without adapting to an unnamed code, no model beats answer accuracy "
                     f"{floor['accuracy']:.3f} / {floor['nll']:.3f} nats per answer letter (the exact floor)")
    return "\n".join(lines) + "\n"
