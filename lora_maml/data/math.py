"""Read the MATH dataset (Hendrycks et al., 2021) into records, from whichever form the user has.

Sources, chosen by :func:`load_math_records` from ``source``:

* an existing directory in the original layout ``[MATH/]{train,test}/<subject>/<n>.json``;
* an existing ``.tar`` / ``.tar.gz`` / ``.tgz`` archive of that layout, read member by member (never
  extracted to disk);
* an existing ``.jsonl`` or ``.parquet`` file whose records have ``problem``, ``solution``, ``type``
  and ``level`` (optionally ``id``). Such a file *is* one split, so ``split`` does not filter it;
* otherwise, a Hugging Face hub dataset id ``owner/name`` (default :data:`DEFAULT_HUB_DATASET`), one
  config per subject, loaded with ``datasets.load_dataset``. A missing path that looks like a file
  (``.jsonl``, ``.tar.gz``, a leading ``./``...) is reported as missing, never sent to the hub.

Records are ``{"id", "prompt", "response", "answer", "subject", "level"}``, all strings, with
``prompt = make_prompt(problem)``, ``response = solution`` and ``answer = last_boxed(solution)``.
Ids are deterministic: ``{split}/{subject}/{file stem}`` for directories and archives,
``{split}/{subject}/{row}`` for hub configs, and the ``id`` field or ``{file stem}/{line or row}``
(1-based) for jsonl/parquet. They are unique; a repeated id is an error.

What fails and what is skipped. Structural problems mean the source is not what the user thinks it
is, so they raise :class:`DataError` naming the file (and line/row): a missing path, malformed JSON
or undecodable text, a record that is not an object, a missing or non-string field, an unknown
subject, a repeated id, no records at all. Problems of single records that a large scraped dataset
always has a few of are skipped and counted in the returned report instead (with up to
:data:`MAX_REPORTED_IDS` example ids per reason), so one bad record does not block a run:

* ``no_boxed_answer``: the solution has no ``\\boxed{}``/``\\fbox{}`` (or the last one never closes);
* ``empty_boxed_answer``: the last box is ``\\boxed{}`` (two MATH train solutions are like this);
* ``empty_<field>``: ``problem``, ``solution``, ``level`` or ``type`` is empty or only whitespace.
  These are skipped rather than fatal for the same reason: the record cannot be used, but the
  dataset as a whole is fine. A *missing* field is different: it means a wrong schema, so it fails.

``level`` is kept as written ("Level 1".."Level 5", and "Level ?" for two MATH train problems); an
integer level in a jsonl/parquet file is accepted as "Level <n>".
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lora_maml.boxed import last_boxed
from lora_maml.data import SUBJECTS
from lora_maml.errors import LoraMamlError

logger = logging.getLogger(__name__)

DEFAULT_HUB_DATASET = "EleutherAI/hendrycks_math"
SPLITS = ("train", "test", "all")
REQUIRED_FIELDS = ("problem", "solution", "type", "level")
MAX_REPORTED_IDS = 20

PROMPT_INSTRUCTION = (
    "Solve the following math problem step by step. Put your final answer in \\boxed{}."
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PATH_LIKE_SUFFIXES = (".json", ".jsonl", ".parquet", ".tar", ".gz", ".tgz")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What a truncated or corrupt (compressed) archive raises, depending on where the damage is.
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


class DataError(LoraMamlError, ValueError):
    """A data source or a prepared data directory is not usable; the message names the file."""


def make_prompt(problem: str) -> str:
    """The instruction every MATH-style problem is asked with, followed by the problem."""
    return f"{PROMPT_INSTRUCTION}\n\n{problem.strip()}"


def normalise_subject(name: str, where: str | None = None) -> str:
    """Map a MATH ``type`` ("Counting & Probability") or directory name to a task name.

    ``where`` (a file, line...) goes into the error raised for a name that is not a MATH subject.
    """
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower().replace("&", " and ")).strip("_")
    if key in SUBJECTS:
        return key
    prefix = f"{where}: " if where else ""
    raise DataError(f"{prefix}unknown subject {name!r}; expected one of {', '.join(SUBJECTS)}")


def load_math_records(source: str | Path, split: str = "train") -> tuple[list[dict], dict]:
    """Read MATH from ``source`` (see module docstring); return ``(records, report)``.

    ``split`` is ``train``, ``test`` or ``all``. The report is
    ``{"source", "split", "read", "kept", "skipped": {reason: {"count", "examples"}}}``.
    Records come back in a fixed order (split, subject, natural order of the id), whatever the
    order of files in the source.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    collector = _Collector(source=str(source), split=split)
    for raw, where, record_id, subject in _iter_raw(source, split):
        collector.add(raw, where, record_id, subject)
    if not collector.read:
        raise DataError(
            f"{source}: no MATH records found for split {split!r} (expected the layout "
            "MATH/{train,test}/<subject>/<n>.json, or a .jsonl/.parquet file)"
        )
    records = sorted(collector.records, key=_record_order)
    return records, collector.report()


def _iter_raw(source: str | Path, split: str) -> Iterator[tuple[Any, str, str, str | None]]:
    """Yield ``(raw_record, where, record_id, subject_or_None)`` from the right reader."""
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _iter_directory(path, split)
    elif path.is_file():
        name = path.name.lower()
        if name.endswith(_TAR_SUFFIXES):
            yield from _iter_tar(path, split)
        elif name.endswith(".jsonl"):
            yield from iter_jsonl(path)
        elif name.endswith(".parquet"):
            yield from iter_parquet(path)
        else:
            raise DataError(
                f"{path}: unsupported file type; expected a directory, .tar, .tar.gz, .tgz, "
                ".jsonl or .parquet"
            )
    elif looks_like_hub_id(str(source)):
        yield from _iter_hub(str(source), split)
    else:
        raise DataError(
            f"{source}: no such file or directory (expected a MATH directory, .tar/.tar.gz, "
            f".jsonl or .parquet file, or a hub dataset id such as {DEFAULT_HUB_DATASET})"
        )


def looks_like_hub_id(source: str) -> bool:
    """Whether a source that is not an existing path is a hub id ``owner/name`` (a missing path that looks
    like a file, ``.jsonl`` or a leading ``./``, is not: it is reported missing, never sent to the hub)."""
    if source.startswith((".", "/", "~")) or source.lower().endswith(_PATH_LIKE_SUFFIXES):
        return False
    return bool(_HUB_ID.match(source))


def _wanted_splits(split: str) -> tuple[str, ...]:
    return ("train", "test") if split == "all" else (split,)


def _layout_parts(parts: tuple[str, ...], splits: tuple[str, ...]) -> tuple[str, str, str] | None:
    """``(split, subject_dir, stem)`` for a ``.../<split>/<subject>/<stem>.json`` path, else None."""
    if len(parts) < 3 or not parts[-1].endswith(".json") or parts[-1].startswith("."):
        return None
    split, subject_dir, filename = parts[-3:]
    if split not in splits:
        return None
    return split, subject_dir, filename[: -len(".json")]


def _iter_directory(root: Path, split: str) -> Iterator[tuple[Any, str, str, str]]:
    splits = _wanted_splits(split)
    for file in sorted(root.rglob("*.json")):
        parsed = _layout_parts(file.relative_to(root).parts, splits)
        if parsed is None:
            continue
        file_split, subject_dir, stem = parsed
        subject = normalise_subject(subject_dir, where=str(file))
        yield _parse_json(file.read_bytes(), str(file)), str(file), f"{file_split}/{subject}/{stem}", subject


def _iter_tar(path: Path, split: str) -> Iterator[tuple[Any, str, str, str]]:
    splits = _wanted_splits(split)
    try:
        archive = tarfile.open(path, "r:*")
    except _TAR_ERRORS as exc:
        raise DataError(f"{path}: cannot open as a tar archive: {exc}") from exc
    with archive:
        try:
            for member in archive:
                if not member.isfile():
                    continue
                parsed = _layout_parts(tuple(p for p in member.name.split("/") if p not in ("", ".")), splits)
                if parsed is None:
                    continue
                file_split, subject_dir, stem = parsed
                where = f"{path}:{member.name}"
                subject = normalise_subject(subject_dir, where=where)
                handle = archive.extractfile(member)
                assert handle is not None  # regular files always have content
                yield _parse_json(handle.read(), where), where, f"{file_split}/{subject}/{stem}", subject
        except _TAR_ERRORS as exc:
            raise DataError(f"{path}: corrupt or truncated tar archive: {exc}") from exc


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON: {exc}") from exc


def iter_jsonl(path: Path) -> Iterator[tuple[Any, str, str, None]]:
    """``(raw, where, id, None)`` per non-blank line of a jsonl file: the ``id`` field or ``{stem}/{line}``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text: {exc}") from exc
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        raw = _parse_json(line.encode("utf-8"), where)
        yield raw, where, _file_record_id(raw, path, line_number, where), None


def iter_parquet(path: Path, required: Sequence[str] = REQUIRED_FIELDS) -> Iterator[tuple[Any, str, str, None]]:
    """``(raw, where, id, None)`` per row of a parquet file that has the ``required`` columns: the ``id``
    column or ``{stem}/{row}``."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as parquet: {exc}") from exc
    missing = [field for field in required if field not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(required)}")
    for row_number, raw in enumerate(table.to_pylist(), start=1):
        where = f"{path}:row {row_number}"
        yield raw, where, _file_record_id(raw, path, row_number, where), None


def _file_record_id(raw: Any, path: Path, number: int, where: str) -> str:
    if isinstance(raw, dict) and raw.get("id") is not None:
        record_id = raw["id"]
        if isinstance(record_id, bool) or not isinstance(record_id, (str, int)) or str(record_id).strip() == "":
            raise DataError(f"{where}: field 'id' must be a non-empty string or integer, got {record_id!r}")
        return str(record_id)
    return f"{path.stem}/{number}"


def _iter_hub(dataset_id: str, split: str) -> Iterator[tuple[Any, str, str, str]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a hard dependency
        raise DataError(f"{dataset_id}: reading a hub dataset needs the 'datasets' package") from exc
    for subject in SUBJECTS:
        for hub_split in _wanted_splits(split):
            try:
                rows = datasets.load_dataset(dataset_id, subject, split=hub_split)
            except Exception as exc:  # network, auth, missing config: all end the same way
                raise DataError(
                    f"{dataset_id} (config {subject!r}, split {hub_split!r}): cannot load from the "
                    f"Hugging Face hub: {exc}. Offline? Pass a local MATH directory or .tar.gz instead."
                ) from exc
            for row_number, raw in enumerate(rows):
                where = f"{dataset_id}[{subject}/{hub_split}]:row {row_number}"
                yield raw, where, f"{hub_split}/{subject}/{row_number}", subject


class _Collector:
    """Turns raw records into checked records and keeps the skip report."""

    def __init__(self, source: str, split: str) -> None:
        self.source = source
        self.split = split
        self.read = 0
        self.records: list[dict] = []
        self.skipped: dict[str, dict] = {}
        self._ids: dict[str, str] = {}

    def add(self, raw: Any, where: str, record_id: str, subject: str | None) -> None:
        self.read += 1
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        if record_id in self._ids:
            raise DataError(f"{where}: duplicate record id {record_id!r} (also at {self._ids[record_id]})")
        self._ids[record_id] = where
        fields = {name: _string_field(raw, name, where) for name in REQUIRED_FIELDS}
        empty = next((name for name in REQUIRED_FIELDS if not fields[name].strip()), None)
        if empty is not None:
            self._skip(f"empty_{empty}", record_id, where)
            return
        if subject is None:
            subject = normalise_subject(fields["type"], where=where)
        answer = last_boxed(fields["solution"])
        if answer is None:
            self._skip("no_boxed_answer", record_id, where)
            return
        if not answer.strip():
            self._skip("empty_boxed_answer", record_id, where)
            return
        self.records.append(
            {
                "id": record_id,
                "prompt": make_prompt(fields["problem"]),
                "response": fields["solution"],
                "answer": answer.strip(),
                "subject": subject,
                "level": fields["level"].strip(),
            }
        )

    def _skip(self, reason: str, record_id: str, where: str) -> None:
        logger.warning("skipping %s (%s): %s", record_id, where, reason.replace("_", " "))
        entry = self.skipped.setdefault(reason, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_REPORTED_IDS:
            entry["examples"].append(record_id)

    def report(self) -> dict:
        return {
            "source": self.source,
            "split": self.split,
            "read": self.read,
            "kept": len(self.records),
            "skipped": {reason: self.skipped[reason] for reason in sorted(self.skipped)},
        }


def _string_field(raw: dict, name: str, where: str) -> str:
    if name not in raw or raw[name] is None:
        raise DataError(f"{where}: record is missing field {name!r} (required: {', '.join(REQUIRED_FIELDS)})")
    value = raw[name]
    if name == "level" and isinstance(value, int) and not isinstance(value, bool):
        return f"Level {value}"
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _record_order(record: dict) -> tuple:
    """Split, then subject in canonical order, then the id with its numbers compared as numbers."""
    record_id = record["id"]
    split = record_id.split("/", 1)[0]
    # re.split with a group alternates text (even positions) and digit runs (odd positions).
    chunks = re.split(r"(\d+)", record_id)
    natural = tuple(int(chunk) if i % 2 else chunk for i, chunk in enumerate(chunks))
    return (split, SUBJECTS.index(record["subject"]), natural, record_id)

