"""Split records into per-task support/query/test files, reproducibly, and read them back.

Layout written by :func:`prepare` (``lora-maml prepare`` and ``recipes/prepare_math_data.py``)::

    <output_dir>/meta_train/{task}_support.parquet   support examples of meta-training tasks
    <output_dir>/meta_train/{task}_query.parquet     query examples of meta-training tasks
    <output_dir>/few_shot_eval/{task}_test.parquet   the rest of every task; all of a held-out task
    <output_dir>/dataset_summary.csv                 task, support, query, test, total
    <output_dir>/manifest.json                       how it was made, and row counts + hashes

Splitting, per task: records sorted by id (input order never matters), shuffled with
``random.Random(f"{seed}:{task}")``, cut to ``max_samples``, then ``floor(n * support_ratio)`` go to
support, ``floor(n * query_ratio)`` to query and the rest to test. Held-out tasks go wholly to test.

Leakage guards. Records whose problems are equal after lowercasing and collapsing whitespace are
kept together: inside a task, a group of equal problems goes to one split as a whole (the cut
points move by at most the group size; MATH train has one such pair, in algebra); across tasks,
the problem stays with the first task in ``SUBJECTS`` order and its copies in later tasks are
dropped and listed in the manifest under ``dropped`` (MATH train+test has one such pair).

Reproducibility: the same records and arguments give byte-identical files on the same pyarrow
version (fixed schema, no pandas metadata, fixed compression, no timestamps). The manifest holds
both the sha256 of every file and a pyarrow-independent sha256 of its rows.

Everything is written into a temporary directory next to ``output_dir`` and renamed into place at
the end, so a failed run leaves nothing behind and a reader never sees half a dataset.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from lora_maml.atomic import atomic_dir
from lora_maml import __version__
from lora_maml.boxed import last_boxed
from lora_maml.data import SUBJECTS
from lora_maml.data.math import DEFAULT_HUB_DATASET, SPLITS, DataError, load_math_records, normalise_subject

MANIFEST = "manifest.json"
SUMMARY = "dataset_summary.csv"
FORMAT_VERSION = 1
COLUMNS = ("id", "prompt", "response", "answer", "subject", "level")
PARTS = ("support", "query", "test")
COMPRESSION = "zstd"
MAX_REPORTED_IDS = 20


def normalise_problem(text: str) -> str:
    """The key two problems are compared by: lowercased, whitespace collapsed."""
    return " ".join(text.lower().split())


def part_path(task: str, part: str) -> str:
    """Path of a task's split file, relative to the data directory."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
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
) -> dict:
    """Split ``records`` per subject and write the prepared layout; return the manifest.

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
    holdout = _check_holdout(holdout_tasks)
    try:
        source = json.loads(json.dumps(source_description, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"source_description must be JSON-serialisable: {exc}") from exc
    output_dir = Path(output_dir).expanduser()
    _check_output_dir(output_dir, overwrite)

    by_task, dropped = _group_by_task(records)
    splits: dict[str, dict[str, list[dict]]] = {}
    for task in SUBJECTS:
        splits[task] = _split_task(task, by_task[task], support_ratio, query_ratio, seed, max_samples, task in holdout)

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "source": source,
        "seed": seed,
        "support_ratio": support_ratio,
        "query_ratio": query_ratio,
        "max_samples": max_samples,
        "holdout_tasks": [task for task in SUBJECTS if task in holdout],
        "tasks": {
            "meta_train": [task for task in SUBJECTS if task not in holdout],
            "few_shot_eval": list(SUBJECTS),
        },
        "dropped": dropped,
        "counts": {
            task: {**{part: len(splits[task][part]) for part in PARTS}, "total": sum(map(len, splits[task].values()))}
            for task in SUBJECTS
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


def _check_holdout(holdout_tasks: Sequence[str]) -> set[str]:
    if isinstance(holdout_tasks, str):
        raise ValueError(f"holdout_tasks must be a list of task names, got the string {holdout_tasks!r}")
    holdout = set()
    for name in holdout_tasks:
        if name not in SUBJECTS:
            raise ValueError(f"unknown holdout task {name!r}; expected one of {', '.join(SUBJECTS)}")
        holdout.add(name)
    if len(holdout) == len(SUBJECTS):
        raise ValueError("all tasks are held out; at least one must remain for meta-training")
    return holdout


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir}: output path exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise DataError(
                f"{output_dir}: output directory exists and is not empty; "
                "pass overwrite=True (--overwrite) to replace it"
            )
        if not (output_dir / MANIFEST).is_file():
            raise DataError(
                f"{output_dir}: refusing to overwrite a non-empty directory that is not a prepared "
                f"dataset (no {MANIFEST}); choose another --output-dir"
            )


def _group_by_task(records: Iterable[dict]) -> tuple[dict[str, list[dict]], dict]:
    """Check records, bucket them by subject, drop cross-task copies of a problem (see module doc)."""
    by_task: dict[str, list[dict]] = {task: [] for task in SUBJECTS}
    seen_ids: set[str] = set()
    for position, record in enumerate(records):
        _check_record(record, position)
        if record["id"] in seen_ids:
            raise DataError(f"record {record['id']!r}: duplicate id")
        seen_ids.add(record["id"])
        by_task[record["subject"]].append({column: record[column] for column in COLUMNS})
    owner: dict[str, str] = {}
    dropped_ids: list[str] = []
    for task in SUBJECTS:
        by_task[task].sort(key=lambda record: record["id"])
        kept = []
        for record in by_task[task]:
            key = normalise_problem(record["prompt"])
            if owner.setdefault(key, task) != task:
                dropped_ids.append(record["id"])
                continue
            kept.append(record)
        by_task[task] = kept
    dropped = {}
    if dropped_ids:
        dropped["duplicate_of_other_task"] = {"count": len(dropped_ids), "examples": dropped_ids[:MAX_REPORTED_IDS]}
    return by_task, dropped


def _check_record(record: Any, position: int) -> None:
    if not isinstance(record, dict):
        raise DataError(f"record #{position}: expected a dict, got {type(record).__name__}")
    name = f"record {record.get('id', f'#{position}')!r}"
    for column in COLUMNS:
        value = record.get(column)
        if not isinstance(value, str):
            raise DataError(f"{name}: field {column!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{name}: field {column!r} is empty")
    if record["subject"] not in SUBJECTS:
        raise DataError(f"{name}: unknown subject {record['subject']!r}; expected one of {', '.join(SUBJECTS)}")


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
        raise DataError(f"task {task!r} has no records; every one of {', '.join(SUBJECTS)} needs some")
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
        groups.setdefault(normalise_problem(record["prompt"]), []).append(record)
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
    return parts


# --- writing ---------------------------------------------------------------------------------
def _schema():
    import pyarrow as pa

    return pa.schema([pa.field(column, pa.string(), nullable=False) for column in COLUMNS])


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    for task in SUBJECTS:
        for part in PARTS:
            if part != "test" and task in manifest["holdout_tasks"]:
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
    path = Path(data_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found; {data_dir} is not a prepared data directory (run `lora-maml prepare`)")
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


def list_tasks(data_dir: str | Path) -> dict[str, list[str]]:
    """``{"meta_train": [...], "few_shot_eval": [...], "holdout": [...]}`` of a prepared directory."""
    manifest = read_manifest(data_dir)
    return {
        "meta_train": list(manifest["tasks"]["meta_train"]),
        "few_shot_eval": list(manifest["tasks"]["few_shot_eval"]),
        "holdout": list(manifest["holdout_tasks"]),
    }


def load_split(data_dir: str | Path, task: str, part: str) -> list[dict]:
    """Records of ``task``'s ``part`` (``support``, ``query`` or ``test``) of a prepared directory."""
    manifest = read_manifest(data_dir)
    relative = part_path(task, part)
    if relative not in manifest["files"]:
        if task in manifest["holdout_tasks"]:
            raise DataError(f"{data_dir}: task {task!r} is held out (few_shot_eval only); it has no {part} split")
        raise DataError(f"{data_dir}: no {part} split for task {task!r}; tasks are {', '.join(manifest['counts'])}")
    return _read_parquet(Path(data_dir).expanduser() / relative)


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

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

    Checks: the manifest's files exist with the expected columns; no missing or empty values;
    every answer is the last boxed answer of its response (stripped); subjects match file names; ids are
    unique; no problem occurs in two files (within or across tasks); the summary, row counts and
    hashes equal the manifest's.
    """
    data_dir = Path(data_dir).expanduser()
    manifest = read_manifest(data_dir)
    listed = set(manifest["files"])
    present = {path.relative_to(data_dir).as_posix() for path in data_dir.glob("*/*.parquet")}
    if present - listed:
        raise DataError(f"{data_dir}: files not in the manifest: {', '.join(sorted(present - listed))}")
    problem_owner: dict[str, tuple[str, str]] = {}
    id_owner: dict[str, str] = {}
    # Contents first, hashes last: a tampered file then gets the specific reason, not just "modified".
    contents = {relative: _read_parquet(data_dir / relative) for relative in sorted(listed)}
    for relative, rows in contents.items():
        entry = manifest["files"][relative]
        for number, row in enumerate(rows, start=1):
            where = f"{data_dir / relative}: row {number} (id {row.get('id')!r})"
            for column in COLUMNS:
                if row[column] is None or not row[column].strip():
                    raise DataError(f"{where}: empty {column!r}")
            if row["subject"] != entry["task"]:
                raise DataError(f"{where}: subject {row['subject']!r} in the file of task {entry['task']!r}")
            if (last_boxed(row["response"]) or "").strip() != row["answer"]:
                raise DataError(f"{where}: answer {row['answer']!r} is not the last boxed answer of the response")
            if row["id"] in id_owner:
                raise DataError(f"{where}: id also used in {id_owner[row['id']]}")
            id_owner[row["id"]] = relative
            key = normalise_problem(row["prompt"])
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


# --- summary and command line ----------------------------------------------------------------
def print_summary(manifest: dict, file: TextIO | None = None) -> None:
    """Print the subjects found and a task/support/query/test/total table."""
    out = file or sys.stdout
    counts = manifest["counts"]
    holdout = set(manifest["holdout_tasks"])
    found = ", ".join(f"{task} ({row['total']})" for task, row in counts.items())
    print(f"Found {len(counts)} subjects: {found}", file=out)
    skipped = manifest["source"].get("skipped", {}) if isinstance(manifest["source"], dict) else {}
    for reason, entry in {**skipped, **manifest["dropped"]}.items():
        examples = ", ".join(entry["examples"][:3])
        print(f"Skipped {entry['count']} record(s): {reason.replace('_', ' ')} (e.g. {examples})", file=out)
    width = max(len("task"), *(len(task) + 2 for task in counts))
    header = f"{'task':<{width}} {'support':>8} {'query':>8} {'test':>8} {'total':>8}"
    print(header, file=out)
    print("-" * len(header), file=out)
    totals = dict.fromkeys((*PARTS, "total"), 0)
    for task, row in counts.items():
        label = f"{task} *" if task in holdout else task
        print(f"{label:<{width}} " + " ".join(f"{row[key]:>8}" for key in totals), file=out)
        for key in totals:
            totals[key] += row[key]
    print("-" * len(header), file=out)
    print(f"{'total':<{width}} " + " ".join(f"{totals[key]:>8}" for key in totals), file=out)
    if holdout:
        print("* held out: all records in few_shot_eval, none in meta_train", file=out)


def add_prepare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``prepare`` options to ``parser`` (shared by the recipe and ``lora-maml prepare``)."""
    parser.add_argument(
        "--source",
        required=True,
        help=f"MATH directory, .tar/.tar.gz, .jsonl or .parquet file, hub id (e.g. {DEFAULT_HUB_DATASET}), "
        "or 'synthetic' for the generated suite",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="directory to create")
    parser.add_argument(
        "--support-ratio", type=float, default=0.30, help="share of each task for support (default 0.30)"
    )
    parser.add_argument(
        "--query-ratio", type=float, default=0.40, help="share of each task for query (default 0.40)"
    )
    parser.add_argument("--seed", type=int, default=42, help="shuffle seed (and synthetic seed); default 42")
    parser.add_argument("--source-split", choices=SPLITS, default="train", help="MATH split to read (default train)")
    parser.add_argument("--max-samples", type=int, default=None, help="cap on records per task, after shuffling")
    parser.add_argument(
        "--holdout-tasks", default="", help="comma-separated tasks kept out of meta-training (all in few_shot_eval)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    parser.add_argument("--validate", action="store_true", help="re-read and check the written files")
    parser.add_argument(
        "--synthetic-per-task", type=int, default=200, help="records per task with --source synthetic (default 200)"
    )
    return parser


def run_prepare(args: argparse.Namespace, *, report_errors: bool = True) -> int:
    """Run ``prepare`` for parsed arguments; errors go to stderr and give exit code 1 (raised as they
    are with ``report_errors=False``, for a caller that reports them itself)."""
    try:
        names = [name for name in args.holdout_tasks.split(",") if name.strip()]
        holdout = [normalise_subject(name, where="--holdout-tasks") for name in names]
        # Fail before the (slow) read when the output directory is going to be refused anyway.
        _check_output_dir(args.output_dir.expanduser(), args.overwrite)
        if args.source == "synthetic":
            from lora_maml.data.synthetic import synthetic_records

            records = synthetic_records(args.synthetic_per_task, args.seed)
            source = {"source": "synthetic", "n_per_task": args.synthetic_per_task, "seed": args.seed}
        else:
            # The loader's report (source, split, read, kept, skipped) describes the source.
            records, source = load_math_records(args.source, split=args.source_split)
        manifest = prepare(
            records,
            args.output_dir,
            support_ratio=args.support_ratio,
            query_ratio=args.query_ratio,
            seed=args.seed,
            holdout_tasks=holdout,
            max_samples=args.max_samples,
            source_description=source,
            overwrite=args.overwrite,
        )
        print_summary(manifest)
        print(f"Wrote {args.output_dir}")
        if args.validate:
            validate(args.output_dir)
            print("Validation passed")
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        if not report_errors:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``recipes/prepare_math_data.py``."""
    parser = argparse.ArgumentParser(
        description="Split MATH (or the synthetic suite) into per-subject support/query/test files."
    )
    return run_prepare(add_prepare_args(parser).parse_args(argv))
