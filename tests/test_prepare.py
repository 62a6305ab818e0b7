"""Prepared layout: splitting, determinism, atomic writing, validation, reading back, command line.

MATH-shaped records are written by the tests themselves; the real archive is only read in place.
"""

import csv
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_maml.data import SUBJECTS
from lora_maml.data.math import DataError, make_prompt
from lora_maml.data.prepare import (
    COLUMNS,
    list_tasks,
    load_split,
    prepare,
    summary_text,
    validate,
)
from lora_maml.data.synthetic import synthetic_records
from lora_maml.errors import run_main
from recipes import prepare_math_data

REPO_ROOT = Path(__file__).resolve().parents[1]
RATIOS = {"support_ratio": 0.3, "query_ratio": 0.4}


def record(subject: str, i: int, problem: str | None = None) -> dict:
    return {
        "id": f"train/{subject}/{i}",
        "prompt": make_prompt(problem or f"Find {i} times two in {subject}."),
        "response": f"{i} * 2 = \\boxed{{{2 * i}}}",
        "answer": str(2 * i),
        "subject": subject,
        "level": "Level 1",
    }


def records(per_subject: int = 10) -> list[dict]:
    return [record(subject, i) for subject in SUBJECTS for i in range(per_subject)]


def main(argv):
    """``lora-maml prepare`` (recipes/prepare_math_data.py) as the command line runs it: a user error is one
    ``error:`` line and exit code 1."""
    return run_main(prepare_math_data.main, argv)


def run(records_, out, **kwargs):
    options = {**RATIOS, "seed": 1, "source_description": {"source": "test"}, **kwargs}
    return prepare(records_, out, **options)


def hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir())


def math_tar(path: Path, raws: dict[str, dict | str]) -> Path:
    """A MATH-layout archive; a str value is written as is (to make broken JSON)."""
    with tarfile.open(path, "w:gz") as archive:
        for name, raw in raws.items():
            data = raw.encode() if isinstance(raw, str) else json.dumps(raw).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def raw(subject_type: str, i: int, **overrides) -> dict:
    return {
        "problem": f"How many sides does the {subject_type} shape {i} have?",
        "level": "Level 2",
        "type": subject_type,
        "solution": f"It has $\\boxed{{{i}}}$ sides.",
        **overrides,
    }


def full_tar(path: Path, extra: dict[str, dict | str] | None = None, skip_subject: str | None = None) -> Path:
    raws = {
        f"MATH/train/{subject}/{i}.json": raw(subject, i)
        for subject in SUBJECTS
        if subject != skip_subject
        for i in range(1, 11)
    }
    return math_tar(path, {**raws, **(extra or {})})


# --- the real data -----------------------------------------------------------------------------
def test_real_archive_end_to_end(math_archive, tmp_path, capsys):
    out = tmp_path / "math_meta"
    argv = ["--source", str(math_archive), "--output-dir", str(out), "--support-ratio", "0.30",
            "--query-ratio", "0.40", "--seed", "42", "--validate"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Validation passed" in printed and "algebra" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["algebra"] == {"support": 523, "query": 697, "test": 524, "total": 1744}
    totals = sum(row["total"] for row in manifest["counts"].values())
    skipped = sum(entry["count"] for entry in manifest["source"]["skipped"].values())
    assert manifest["source"]["read"] == 7500 and totals + skipped == 7500
    for task, row in manifest["counts"].items():
        n = row["total"]
        assert (row["support"], row["query"]) == (int(n * 0.3), int(n * 0.4)), task
    assert len(load_split(out, "algebra", "query")) == 697
    assert list_tasks(out)["meta_train"] == list(SUBJECTS)


# --- splitting ---------------------------------------------------------------------------------
def test_split_sizes_files_and_reading_back(tmp_path):
    manifest = run(records(10), tmp_path / "out")
    out = tmp_path / "out"
    for task in SUBJECTS:
        assert manifest["counts"][task] == {"support": 3, "query": 4, "test": 3, "total": 10}
        parts = {part: load_split(out, task, part) for part in ("support", "query", "test")}
        assert [len(parts[p]) for p in ("support", "query", "test")] == [3, 4, 3]
        ids = [r["id"] for rows in parts.values() for r in rows]
        assert sorted(ids) == sorted(r["id"] for r in records(10) if r["subject"] == task)
        assert all(set(r) == set(COLUMNS) and r["subject"] == task for rows in parts.values() for r in rows)
    assert list_tasks(out) == {"meta_train": list(SUBJECTS), "few_shot_eval": list(SUBJECTS), "holdout": []}
    with open(out / "dataset_summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["task"] for row in rows] == list(SUBJECTS)
    assert rows[0] == {"task": "algebra", "support": "3", "query": "4", "test": "3", "total": "10"}
    validate(out)


def test_output_is_byte_identical_whatever_the_input_order(tmp_path):
    suite = synthetic_records(20, seed=5)
    shuffled = list(suite)
    random.Random(0).shuffle(shuffled)
    run(suite, tmp_path / "a", seed=7)
    run(reversed(shuffled), tmp_path / "b", seed=7)
    first, second = hashes(tmp_path / "a"), hashes(tmp_path / "b")
    assert len(first) == 7 * 3 + 2
    assert first == second
    run(suite, tmp_path / "c", seed=8)
    assert hashes(tmp_path / "c") != first


def test_synthetic_suite_prepares_and_validates(tmp_path):
    run(synthetic_records(30, seed=0), tmp_path / "syn")
    validate(tmp_path / "syn")


def test_holdout_tasks_go_wholly_to_few_shot_eval(tmp_path):
    out = tmp_path / "out"
    manifest = run(records(10), out, holdout_tasks=["geometry", "precalculus"])
    assert manifest["counts"]["geometry"] == {"support": 0, "query": 0, "test": 10, "total": 10}
    assert not (out / "meta_train" / "geometry_support.parquet").exists()
    assert not (out / "meta_train" / "precalculus_query.parquet").exists()
    tasks = list_tasks(out)
    assert "geometry" not in tasks["meta_train"] and len(tasks["meta_train"]) == 5
    assert tasks["holdout"] == ["geometry", "precalculus"]
    assert len(load_split(out, "geometry", "test")) == 10
    with pytest.raises(DataError, match="'geometry' is held out"):
        load_split(out, "geometry", "support")
    validate(out)
    summary = io.StringIO(summary_text(manifest))
    assert "geometry *" in summary.getvalue() and "held out" in summary.getvalue()


def test_max_samples_caps_each_task(tmp_path):
    manifest = run(records(20), tmp_path / "out", max_samples=10)
    assert all(row["total"] == 10 for row in manifest["counts"].values())
    assert manifest["max_samples"] == 10


def test_equal_problems_stay_in_one_split_and_cross_task_copies_are_dropped(tmp_path):
    data = records(10)
    twin = record("algebra", 99, problem="Find 3 times two in algebra.")  # equal to algebra/3 ...
    twin["prompt"] = twin["prompt"].replace("Find", "find  ")  # ... after normalisation
    copy = {**record("algebra", 5), "id": "train/prealgebra/98", "subject": "prealgebra"}  # a copy of algebra/5
    # The same prompt with another answer is another problem (a family of conflicting tasks asks exactly that).
    conflict = {**record("algebra", 6), "id": "train/prealgebra/97", "subject": "prealgebra", "answer": "13",
                "response": "By the other rule: \\boxed{13}"}
    manifest = run([*data, twin, copy, conflict], tmp_path / "out")
    out = tmp_path / "out"
    where = {r["id"]: part for part in ("support", "query", "test") for r in load_split(out, "algebra", part)}
    assert where["train/algebra/3"] == where["train/algebra/99"]
    assert manifest["dropped"] == {"duplicate_of_other_task": {"count": 1, "examples": ["train/prealgebra/98"]}}
    assert manifest["counts"]["prealgebra"]["total"] == 11
    validate(out)


# --- argument and record errors leave nothing behind --------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"support_ratio": 0.0}, "support_ratio must be a number strictly between 0 and 1"),
        ({"query_ratio": 1.2}, "query_ratio must be"),
        ({"support_ratio": 0.6, "query_ratio": 0.4}, "must be below 1"),
        ({"holdout_tasks": ["calculus"]}, "unknown holdout task 'calculus'"),
        ({"holdout_tasks": list(SUBJECTS)}, "all tasks are held out"),
        ({"max_samples": 0}, "max_samples must be a positive integer"),
        ({"source_description": {"x": object()}}, "JSON-serialisable"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(records(10), tmp_path / "out", **kwargs)
    assert leftovers(tmp_path) == []


def test_empty_subject_is_named(tmp_path):
    data = [r for r in records(10) if r["subject"] != "number_theory"]
    with pytest.raises(DataError, match="task 'number_theory' has no records"):
        run(data, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_too_few_records_for_a_support_split(tmp_path):
    with pytest.raises(DataError, match=r"task 'algebra': 3 records give 0 support"):
        run(records(3), tmp_path / "out")


def test_bad_records_are_named(tmp_path):
    data = records(10)
    data[4] = {**data[4], "answer": ""}  # records have an answer each or none (NLL-only scoring)
    with pytest.raises(DataError, match=r"record 'train/algebra/4': empty answer while other records have one"):
        run(data, tmp_path / "out")
    data[4] = {**data[4], "answer": " "}
    with pytest.raises(DataError, match=r"record 'train/algebra/4': field 'answer' is empty"):
        run(data, tmp_path / "out")
    data = records(10) + [records(10)[0]]
    with pytest.raises(DataError, match="duplicate id"):
        run(data, tmp_path / "out")
    assert leftovers(tmp_path) == []


# --- output directory --------------------------------------------------------------------------
def test_existing_output_needs_overwrite_and_is_swapped(tmp_path):
    out = tmp_path / "out"
    run(records(10), out, seed=1)
    before = hashes(out)
    with pytest.raises(DataError, match="exists and is not empty; pass overwrite=True"):
        run(records(10), out, seed=2)
    assert hashes(out) == before
    run(records(10), out, seed=2, overwrite=True)
    assert hashes(out) != before
    validate(out)
    assert leftovers(tmp_path) == ["out"]


def test_overwrite_refuses_a_directory_that_is_not_a_prepared_dataset(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a prepared dataset"):
        run(records(10), tmp_path / "home", overwrite=True)
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_an_empty_existing_directory_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    run(records(10), tmp_path / "out")
    validate(tmp_path / "out")


def test_unwritable_output_location(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"file/out: cannot write the output directory here"):
        run(records(10), tmp_path / "file" / "out")
    assert leftovers(tmp_path) == ["file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_directory(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(DataError, match="cannot write the output directory here"):
            run(records(10), parent / "out")
    finally:
        parent.chmod(0o700)
    assert leftovers(parent) == []


def test_permission_denied_is_a_clear_error(tmp_path, monkeypatch):
    import lora_maml.atomic as atomic_module

    def denied(**kwargs):
        raise PermissionError(13, "Permission denied", kwargs["dir"])

    monkeypatch.setattr(atomic_module.tempfile, "mkdtemp", denied)
    with pytest.raises(DataError, match=r"out: cannot write the output directory here: .*Permission denied"):
        run(records(10), tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_no_partial_output(tmp_path, monkeypatch):
    import lora_maml.data.prepare as prepare_module

    out = tmp_path / "out"
    run(records(10), out)
    before = hashes(out)
    real_write = prepare_module._write_parquet
    calls = []

    def failing_write(path, rows):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real_write(path, rows)

    monkeypatch.setattr(prepare_module, "_write_parquet", failing_write)
    with pytest.raises(DataError, match="No space left on device"):
        run(records(10), out, seed=3, overwrite=True)
    calls.clear()
    with pytest.raises(DataError, match="No space left on device"):
        run(records(10), tmp_path / "fresh")
    assert hashes(out) == before
    assert leftovers(tmp_path) == ["out"]


# --- validation and reading ---------------------------------------------------------------------
def rewrite(path: Path, rows: list[dict]) -> None:
    schema = pa.schema([pa.field(column, pa.string(), nullable=False) for column in COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")


def test_validate_catches_a_problem_in_two_splits(tmp_path):
    out = tmp_path / "out"
    run(records(10), out)
    support = pq.read_table(out / "meta_train/algebra_support.parquet").to_pylist()
    query_path = out / "meta_train/algebra_query.parquet"
    query = pq.read_table(query_path).to_pylist()
    query[0] = {**query[0], "prompt": support[0]["prompt"].upper(), "response": support[0]["response"],
                "answer": support[0]["answer"]}
    rewrite(query_path, query)
    expected = r"algebra_(query|support)\.parquet: row \d+ .*same problem as .* in meta_train/algebra_(support|query)"
    with pytest.raises(DataError, match=expected):
        validate(out)


def test_validate_catches_a_problem_shared_by_two_tasks(tmp_path):
    out = tmp_path / "out"
    run(records(10), out)
    algebra = pq.read_table(out / "few_shot_eval/algebra_test.parquet").to_pylist()
    path = out / "few_shot_eval/geometry_test.parquet"
    geometry = pq.read_table(path).to_pylist()
    geometry[-1] = {**geometry[-1], **{k: algebra[0][k] for k in ("prompt", "response", "answer")}}
    rewrite(path, geometry)
    with pytest.raises(DataError, match=r"geometry_test\.parquet.*same problem"):
        validate(out)


def test_validate_catches_removed_rows_and_changed_bytes(tmp_path):
    out = tmp_path / "out"
    run(records(10), out)
    path = out / "meta_train/precalculus_support.parquet"
    rows = pq.read_table(path).to_pylist()
    rewrite(path, rows[:-1])
    with pytest.raises(DataError, match=r"precalculus_support\.parquet: 2 rows, the manifest says 3"):
        validate(out)
    rewrite(path, [{**rows[0], "level": "Level 5"}, *rows[1:]])
    with pytest.raises(DataError, match=r"precalculus_support\.parquet: content differs"):
        validate(out)


def test_validate_catches_a_wrong_answer_and_a_stray_file(tmp_path):
    out = tmp_path / "out"
    run(records(10), out)
    path = out / "few_shot_eval/prealgebra_test.parquet"
    rows = pq.read_table(path).to_pylist()
    rewrite(path, [{**rows[0], "answer": "12345"}, *rows[1:]])
    with pytest.raises(DataError, match=r"prealgebra_test\.parquet: row 1 .*not the last boxed answer"):
        validate(out)
    run(records(10), out, overwrite=True)
    rewrite(out / "meta_train/extra.parquet", rows)
    with pytest.raises(DataError, match="files not in the manifest: meta_train/extra.parquet"):
        validate(out)


def test_readers_explain_an_unprepared_directory(tmp_path):
    readers = (lambda: list_tasks(tmp_path), lambda: load_split(tmp_path, "algebra", "support"), lambda: validate(tmp_path))
    for call in readers:
        with pytest.raises(DataError, match="manifest.json: not found; .* is not a prepared data directory"):
            call()
    run(records(10), tmp_path / "out")
    with pytest.raises(ValueError, match="part must be one of"):
        load_split(tmp_path / "out", "algebra", "train")
    with pytest.raises(DataError, match="no support split for task 'calculus'"):
        load_split(tmp_path / "out", "calculus", "support")


def test_a_prepared_file_missing_a_column_names_it(tmp_path):
    run(records(10), tmp_path / "out")
    path = tmp_path / "out" / "meta_train" / "algebra_support.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["answer"]), path)
    with pytest.raises(DataError, match=rf"{path}: missing column\(s\) \['answer'\]; expected id, prompt"):
        load_split(tmp_path / "out", "algebra", "support")


# --- command line ------------------------------------------------------------------------------
def cli(tmp_path, source, *extra):
    return main(["--source", str(source), "--output-dir", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"MATH/train/algebra/77.json": "{broken"}, r"MATH/train/algebra/77\.json: malformed JSON"),
        ({"MATH/train/geometry/77.json": {"problem": "p", "level": "Level 1", "type": "Geometry"}},
         r"MATH/train/geometry/77\.json: record is missing field 'solution'"),
        ({"MATH/train/topology/1.json": raw("Topology", 1)},
         r"MATH/train/topology/1\.json: unknown subject 'topology'"),
    ],
)
def test_cli_reports_bad_sources_and_writes_nothing(tmp_path, capsys, extra, message):
    sources = tmp_path / "src"
    sources.mkdir()
    tar = full_tar(sources / "m.tar.gz", extra=extra)
    assert cli(tmp_path, tar, "--validate") == 1
    error = capsys.readouterr().err
    assert "m.tar.gz" in error
    assert any(line.startswith("error: ") for line in error.splitlines())
    assert re.search(message, error), error
    assert leftovers(tmp_path) == ["src"]


def test_cli_missing_source_and_empty_subject(tmp_path, capsys):
    assert cli(tmp_path, tmp_path / "nowhere.tar.gz") == 1
    assert "nowhere.tar.gz: no such file or directory" in capsys.readouterr().err
    tar = full_tar(tmp_path / "m.tar.gz", skip_subject="geometry")
    assert cli(tmp_path, tar) == 1
    assert "task 'geometry' has no records" in capsys.readouterr().err
    assert leftovers(tmp_path) == ["m.tar.gz"]


def test_cli_skips_and_reports_unboxed_solutions(tmp_path, capsys):
    bad = {"MATH/train/algebra/50.json": raw("Algebra", 50, solution="It has five sides.")}
    tar = full_tar(tmp_path / "m.tar.gz", extra=bad)
    assert cli(tmp_path, tar, "--validate", "--holdout-tasks", "Geometry, number_theory", "--max-samples", "8") == 0
    printed = capsys.readouterr().out
    assert "Skipped 1 record(s): no boxed answer (e.g. train/algebra/50)" in printed
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["skipped"] == {"no_boxed_answer": {"count": 1, "examples": ["train/algebra/50"]}}
    assert manifest["holdout_tasks"] == ["geometry", "number_theory"]
    assert manifest["counts"]["algebra"] == {"support": 2, "query": 3, "test": 3, "total": 8}


def test_cli_existing_output_and_bad_holdout(tmp_path, capsys):
    assert cli(tmp_path, "synthetic", "--synthetic-per-task", "10") == 0
    assert cli(tmp_path, "synthetic", "--synthetic-per-task", "10") == 1
    assert "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert cli(tmp_path, "synthetic", "--synthetic-per-task", "10", "--overwrite", "--holdout-tasks", "calculus") == 1
    assert "--holdout-tasks: unknown subject 'calculus'" in capsys.readouterr().err
    assert cli(tmp_path, "synthetic", "--synthetic-per-task", "10", "--overwrite", "--validate") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"] == {"source": "synthetic", "n_per_task": 10, "seed": 42}


def test_recipe_script_exits_non_zero_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "prepare_math_data.py"),
         "--source", str(tmp_path / "missing.tar.gz"), "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "missing.tar.gz: no such file or directory" in result.stderr
    assert not (tmp_path / "out").exists()
