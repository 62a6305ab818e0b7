"""MATH readers. Every record here is made up by the test (never copied from the real dataset)."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_maml.boxed import last_boxed
from lora_maml.data import SUBJECTS
from lora_maml.data.math import DataError, load_math_records, make_prompt, normalise_subject

DISPLAY = {
    "algebra": "Algebra",
    "counting_and_probability": "Counting & Probability",
    "geometry": "Geometry",
    "intermediate_algebra": "Intermediate Algebra",
    "number_theory": "Number Theory",
    "prealgebra": "Prealgebra",
    "precalculus": "Precalculus",
}


def fake(subject: str, i: int, **overrides) -> dict:
    record = {
        "problem": f"What is {i} plus {i} in {subject}?",
        "level": f"Level {i % 5 + 1}",
        "type": DISPLAY[subject],
        "solution": f"Add: ${i} + {i} = \\boxed{{{2 * i}}}$.",
    }
    record.update(overrides)
    return record


def math_files(per_subject=3, splits=("train", "test")) -> dict[str, bytes]:
    """``{"MATH/<split>/<subject>/<n>.json": bytes}`` in the original layout."""
    files = {}
    for split in splits:
        for subject in SUBJECTS:
            for i in range(1, per_subject + 1):
                number = i if split == "train" else 100 + i
                files[f"MATH/{split}/{subject}/{number}.json"] = json.dumps(fake(subject, number)).encode()
    return files


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes], order=None) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as archive:
        for name in order or files:
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            archive.addfile(info, io.BytesIO(files[name]))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- subjects and prompt -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Counting & Probability", "counting_and_probability"),
        ("counting_and_probability", "counting_and_probability"),
        ("Intermediate Algebra", "intermediate_algebra"),
        ("  Number Theory ", "number_theory"),
        ("precalculus", "precalculus"),
    ],
)
def test_normalise_subject(name, expected):
    assert normalise_subject(name) == expected


def test_every_display_name_and_directory_maps_to_its_subject():
    for subject, display in DISPLAY.items():
        assert normalise_subject(display) == normalise_subject(subject) == subject


def test_unknown_subject_names_where():
    with pytest.raises(DataError, match=r"some/file\.json.*'Calculus'"):
        normalise_subject("Calculus", where="some/file.json")


def test_make_prompt_asks_for_a_boxed_answer_then_gives_the_problem():
    prompt = make_prompt("  What is 1 + 1?\n")
    assert "step by step" in prompt and r"\boxed{}" in prompt
    assert prompt.endswith("What is 1 + 1?")


# --- directory and archive layouts -------------------------------------------------------------
def test_directory_records_have_the_expected_shape(tmp_path):
    records, report = load_math_records(write_dir(tmp_path, math_files()), split="train")
    assert len(records) == 3 * len(SUBJECTS)
    assert report["read"] == report["kept"] == len(records) and report["skipped"] == {}
    by_id = {record["id"]: record for record in records}
    record = by_id["train/counting_and_probability/2"]
    raw = fake("counting_and_probability", 2)
    assert record == {
        "id": "train/counting_and_probability/2",
        "prompt": make_prompt(raw["problem"]),
        "response": raw["solution"],
        "answer": "4",
        "subject": "counting_and_probability",
        "level": raw["level"],
    }
    assert all(record["answer"] == last_boxed(record["response"]) for record in records)


@pytest.mark.parametrize(("split", "prefixes"), [("train", {"train"}), ("test", {"test"}), ("all", {"train", "test"})])
def test_split_selects_records(tmp_path, split, prefixes):
    records, _ = load_math_records(write_dir(tmp_path, math_files()), split=split)
    assert {record["id"].split("/")[0] for record in records} == prefixes
    assert len(records) == 3 * len(SUBJECTS) * len(prefixes)


def test_tar_gz_tar_and_directory_give_identical_records(tmp_path):
    files = math_files()
    from_dir, _ = load_math_records(write_dir(tmp_path / "tree", files), split="all")
    from_tgz, _ = load_math_records(write_tar(tmp_path / "m.tar.gz", files), split="all")
    # Archive member order must not matter.
    reversed_tar = write_tar(tmp_path / "m.tar", files, order=list(reversed(list(files))))
    from_tar, _ = load_math_records(reversed_tar, split="all")
    assert from_dir == from_tgz == from_tar


def test_directory_root_may_be_the_math_folder_itself(tmp_path):
    write_dir(tmp_path, math_files())
    inner, _ = load_math_records(tmp_path / "MATH")
    outer, _ = load_math_records(tmp_path)
    assert inner == outer


def test_level_question_mark_is_kept(tmp_path):
    files = {"MATH/train/geometry/5.json": json.dumps(fake("geometry", 5, level="Level ?")).encode()}
    records, _ = load_math_records(write_tar(tmp_path / "m.tar.gz", files))
    assert records[0]["level"] == "Level ?"


# --- jsonl and parquet -------------------------------------------------------------------------
def test_jsonl_ids_use_the_id_field_or_the_line_number(tmp_path):
    rows = [fake("algebra", 1), {**fake("geometry", 2), "id": "geo-2"}, fake("prealgebra", 3)]
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    records, _ = load_math_records(path)
    assert {record["id"]: record["subject"] for record in records} == {
        "mine/1": "algebra",
        "geo-2": "geometry",
        "mine/4": "prealgebra",
    }


def test_parquet_matches_jsonl(tmp_path):
    rows = [fake(subject, i) for i, subject in enumerate(SUBJECTS, start=1)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mine.parquet")
    from_parquet, _ = load_math_records(tmp_path / "mine.parquet")
    from_jsonl, _ = load_math_records(write_jsonl(tmp_path / "mine.jsonl", rows))
    assert from_parquet == from_jsonl
    assert {record["subject"] for record in from_parquet} == set(SUBJECTS)


def test_integer_level_becomes_level_text(tmp_path):
    records, _ = load_math_records(write_jsonl(tmp_path / "a.jsonl", [fake("algebra", 1, level=3)]))
    assert records[0]["level"] == "Level 3"


# --- hub ---------------------------------------------------------------------------------------
def test_hub_source_loads_one_config_per_subject(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [fake(config, i) for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, report = load_math_records("EleutherAI/hendrycks_math", split="all")
    assert sorted(calls) == sorted(("EleutherAI/hendrycks_math", s, sp) for s in SUBJECTS for sp in ("train", "test"))
    assert len(records) == report["kept"] == 2 * 2 * len(SUBJECTS)
    assert "test/number_theory/1" in {record["id"] for record in records}


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"owner/name.*algebra.*no network.*local MATH"):
        load_math_records("owner/name")


@pytest.mark.parametrize("source", ["missing/MATH.tar.gz", "data/math.jsonl", "./owner/name", "nothing"])
def test_missing_paths_are_not_sent_to_the_hub(monkeypatch, tmp_path, source):
    import datasets

    def must_not_call(*args, **kwargs):
        raise AssertionError("hub must not be contacted for a path")

    monkeypatch.setattr(datasets, "load_dataset", must_not_call)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no such file or directory") as error:
        load_math_records(source)
    assert source in str(error.value)


# --- errors ------------------------------------------------------------------------------------
def test_malformed_json_in_a_tar_names_the_member_and_the_json_error(tmp_path):
    files = math_files(per_subject=1, splits=("train",))
    files["MATH/train/algebra/9.json"] = b'{"problem": "x", '
    with pytest.raises(DataError, match=r"m\.tar\.gz:MATH/train/algebra/9\.json: malformed JSON: Expecting"):
        load_math_records(write_tar(tmp_path / "m.tar.gz", files))


def test_malformed_json_in_a_directory_names_the_file(tmp_path):
    files = math_files(per_subject=1, splits=("train",))
    files["MATH/train/geometry/9.json"] = b"not json"
    with pytest.raises(DataError, match=r"MATH/train/geometry/9\.json: malformed JSON"):
        load_math_records(write_dir(tmp_path, files))


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(fake("algebra", 1)) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_math_records(path)


@pytest.mark.parametrize("field", ["problem", "solution", "type", "level"])
def test_missing_field_names_the_file_and_field(tmp_path, field):
    raw = fake("algebra", 9)
    del raw[field]
    files = {"MATH/train/algebra/9.json": json.dumps(raw).encode()}
    with pytest.raises(DataError, match=rf"MATH/train/algebra/9\.json: record is missing field '{field}'"):
        load_math_records(write_tar(tmp_path / "m.tar.gz", files))


def test_missing_parquet_column_names_the_file(tmp_path):
    rows = [{key: value for key, value in fake("algebra", 1).items() if key != "type"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: missing column\(s\) type"):
        load_math_records(tmp_path / "t.parquet")


def test_non_string_field_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"a\.jsonl:1: field 'problem' must be a string"):
        load_math_records(write_jsonl(tmp_path / "a.jsonl", [fake("algebra", 1, problem=["x"])]))


def test_unknown_subject_directory_names_the_file(tmp_path):
    files = {"MATH/train/calculus/1.json": json.dumps(fake("algebra", 1)).encode()}
    with pytest.raises(DataError, match=r"MATH/train/calculus/1\.json: unknown subject 'calculus'"):
        load_math_records(write_dir(tmp_path, files))


def test_unknown_subject_type_names_the_line(tmp_path):
    rows = [fake("algebra", 1), fake("algebra", 2, type="Calculus")]
    with pytest.raises(DataError, match=r"a\.jsonl:2: unknown subject 'Calculus'"):
        load_math_records(write_jsonl(tmp_path / "a.jsonl", rows))


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(DataError, match=r"a\.jsonl:1: expected a JSON object, got list"):
        load_math_records(write_jsonl(tmp_path / "a.jsonl", [[1, 2]]))


def test_duplicate_ids_are_an_error(tmp_path):
    rows = [{**fake("algebra", 1), "id": "x"}, {**fake("algebra", 2), "id": "x"}]
    with pytest.raises(DataError, match=r"a\.jsonl:2: duplicate record id 'x' \(also at .*a\.jsonl:1\)"):
        load_math_records(write_jsonl(tmp_path / "a.jsonl", rows))


def test_source_without_records_is_an_error(tmp_path):
    write_dir(tmp_path, {"MATH/README.md": b"hello"})
    with pytest.raises(DataError, match="no MATH records found for split 'train'"):
        load_math_records(tmp_path)


def test_bad_split_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="split must be one of"):
        load_math_records(tmp_path, split="validation")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match=r"a\.csv: unsupported file type"):
        load_math_records(tmp_path / "a.csv")


def test_corrupt_archive_is_a_clear_error(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match=r"broken\.tar\.gz: (cannot open|corrupt)"):
        load_math_records(tmp_path / "broken.tar.gz")


# --- skipped records ---------------------------------------------------------------------------
def test_unusable_records_are_skipped_and_reported(tmp_path):
    files = math_files(per_subject=2, splits=("train",))
    bad = {
        "MATH/train/algebra/50.json": fake("algebra", 50, solution="The answer is 5."),
        "MATH/train/algebra/51.json": fake("algebra", 51, solution=r"so it is $\boxed{}$."),
        "MATH/train/geometry/52.json": fake("geometry", 52, solution=r"$\boxed{3$"),
        "MATH/train/prealgebra/53.json": fake("prealgebra", 53, problem="   "),
        "MATH/train/prealgebra/54.json": fake("prealgebra", 54, level=""),
    }
    files.update({name: json.dumps(raw).encode() for name, raw in bad.items()})
    records, report = load_math_records(write_tar(tmp_path / "m.tar.gz", files))
    assert len(records) == 2 * len(SUBJECTS)
    assert report["read"] == len(records) + len(bad) and report["kept"] == len(records)
    assert report["skipped"] == {
        "empty_boxed_answer": {"count": 1, "examples": ["train/algebra/51"]},
        "empty_level": {"count": 1, "examples": ["train/prealgebra/54"]},
        "empty_problem": {"count": 1, "examples": ["train/prealgebra/53"]},
        "no_boxed_answer": {"count": 2, "examples": ["train/algebra/50", "train/geometry/52"]},
    }


def test_real_archive_reads_every_train_problem(math_archive):
    records, report = load_math_records(math_archive, split="train")
    assert report["read"] == 7500
    assert report["kept"] + sum(entry["count"] for entry in report["skipped"].values()) == 7500
    assert {record["subject"] for record in records} == set(SUBJECTS)
    assert all(record["answer"] and record["answer"] == last_boxed(record["response"]).strip() for record in records)
    assert len({record["id"] for record in records}) == len(records)
