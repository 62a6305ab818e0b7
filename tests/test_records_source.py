"""``records:`` sources (lora_maml/data/records.py): your own named tasks from jsonl, parquet or a hub dataset,
in prompt/response or chat form, with or without answers, through prepare, evaluation and the experiment runner.

Every example file is made here. Without answers, evaluation scores NLL only: the answer metrics are absent
(said so, never a crash), generation is refused, and the runner's verdicts must be on the NLL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_maml.cli import main as cli_main
from lora_maml.config import ConfigError, load_config, with_absolute_paths
from lora_maml.data.math import DataError
from lora_maml.data.prepare import has_answers, load_split, part_path, prepare_from_source, read_source
from lora_maml.data.records import parse_source, read_records
from lora_maml.errors import run_main
from lora_maml.tiny_model import build_tiny_model, texts_from_records
from recipes import meta_vs_sft

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = ("ann", "bob", "cyd", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kim", "lou", "max", "ned", "oli",
         "pam", "quin", "rex", "sam", "tom")
# Task names as users write them: a hyphen, a dot, capitals.
TASKS = {"greet": "Hello, {}!", "farewell": "Goodbye, {}.", "SST-2": "{} is positive.", "qa.v1": "Ask {} again.",
         "shout": "HEY {}!"}


def rows(answers: bool = False, per_task: int = 20) -> list[dict]:
    out = []
    for task, template in TASKS.items():
        for i, name in enumerate(NAMES[:per_task]):
            reply = template.format(name)
            row = {"task": task, "prompt": f"Task {task}: respond to {name}.", "response": reply}
            if answers:
                row["response"], row["answer"] = f"{reply} \\boxed{{{i}}}", str(i)
            out.append(row)
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def chat(row: dict) -> dict:
    return {"name": row["task"], "turns": [{"role": "user", "content": row["prompt"]},
                                           {"role": "assistant", "content": row["response"]}]}


# --- the parse ---------------------------------------------------------------------------------
def test_jsonl_with_answers_becomes_records(tmp_path):
    data = rows(answers=True)
    data[0]["id"] = "mine-0"
    path = write_jsonl(tmp_path / "tasks.jsonl", data)
    records, tasks, holdout, description = read_source(f"records:{path},holdout=shout+SST-2", seed=0)
    assert tasks == sorted(TASKS) and holdout == ["shout", "SST-2"]
    assert records[0] == {"id": "mine-0", "prompt": data[0]["prompt"], "response": data[0]["response"],
                          "answer": "0", "subject": "greet", "level": "n/a"}
    assert records[1]["id"] == "tasks/2"  # file stem / line number when there is no id
    assert description["answers"] is True and description["read"] == len(data)
    manifest = prepare_from_source(f"records:{path},holdout=shout+SST-2", tmp_path / "out", validate=True)
    assert manifest["answers"] is True and sorted(manifest["holdout_tasks"]) == ["SST-2", "shout"]
    assert [r["subject"] for r in load_split(tmp_path / "out", "SST-2", "test")] == ["SST-2"] * 20


def test_parquet_chat_messages_without_answers_renamed_columns(tmp_path):
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([chat(r) for r in rows()]), path)
    source = f"records:{path},task=name,messages=turns,holdout=qa.v1"
    records, tasks, holdout, description = read_records(source)
    assert (records[0]["prompt"], records[0]["response"], records[0]["answer"]) == (
        "Task greet: respond to ann.", "Hello, ann!", "")
    assert records[0]["id"] == "chats/1" and description["answers"] is False
    out = tmp_path / "out"
    prepare_from_source(source, out, validate=True)
    assert not has_answers(out) and {r["answer"] for r in load_split(out, "greet", "support")} == {""}
    assert (out / "few_shot_eval" / "qa.v1_test.parquet").is_file()


def test_spec_defaults_and_errors():
    spec = parse_source("records:org/data,prompt=q,response=a,split=validation")
    assert (spec.location, spec.task, spec.prompt, spec.response, spec.messages, spec.split) == (
        "org/data", "task", "q", "a", None, "validation")
    for bad, message in (("records:x.jsonl,colour=red", "key one of task, prompt"),
                         ("records:x.jsonl,task=a,task=b", "'task' given twice"),
                         ("records:x.jsonl,messages=m,prompt=p", "not both"), ("records:", "no file")):
        with pytest.raises(DataError, match=message):
            parse_source(bad)


def test_hub_dataset_is_loaded_with_its_split_from_the_offline_cache(tmp_path, monkeypatch):
    """A hub id goes through the real ``datasets.load_dataset``: offline (as every test runs), a dataset a user
    loaded once is read from the datasets cache (laid out here as ``load_dataset`` lays out a hub dataset,
    ``<owner>___<name>/<config>/<version>/<hash>/``), with the split asked for; one that is not cached ends in
    one error naming the id and the way out."""
    import shutil

    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: nothing reaches the network
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    files = {}
    for split, part in (("train", rows()[:10]), ("test", rows()[10:40])):
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(part), files[split])
    builder = Parquet(dataset_name="my-tasks", data_files=files, cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    shutil.move(builder.cache_dir, tmp_path / "cache" / "someone___my-tasks" / "default" / "0.0.0" / ("0" * 16))

    records, tasks, _, description = read_records("records:someone/my-tasks,split=test")
    assert len(records) == 30 and records[0]["id"] == "test/1" and records[0]["prompt"] == rows()[10]["prompt"]
    assert tasks == ["farewell", "greet"] and description["split"] == "test"
    with pytest.raises(DataError, match=r"someone/other-tasks \(split 'train'\): cannot load from the Hugging Face "
                                        r"hub: .*Offline\? Save it as a .jsonl or .parquet file"):
        read_records("records:someone/other-tasks")


# --- bad input: one error naming the file, the line and the shape --------------------------------
GOOD = {"task": "greet", "prompt": "Hi?", "response": "Hello."}
CHAT = {"task": "greet", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize("record, spec, message", [
    ({"task": "greet", "response": "Hello."}, "", r":2: no 'prompt'; expected an object with 'task'"),
    ({**GOOD, "task": " "}, "", r":2: 'task' is empty"),
    ({**GOOD, "prompt": 7}, "", r":2: 'prompt' must be a string, got int"),
    ([1, 2], "", r":2: expected an object with 'task'.*got a list"),
    ({**GOOD, "answer": "4"}, "", r":2: 'answer' '4' is not the response's last \\boxed\{\} answer \(none\)"),
    ({**GOOD, "response": "\\boxed{4}", "answer": "4"}, "", r":1: no 'answer', but .*:2 has one"),
    ({**GOOD, "id": "tasks/1"}, "", r":2: duplicate record id 'tasks/1' \(also at .*:1\)"),
    ({**CHAT, "messages": [{"role": "bot", "content": "x"}]}, ",messages=messages", r":2: 'messages' turn 1: unknown role 'bot'"),
    ({**CHAT, "messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}, ",messages=messages",
     r":2: 'messages' has a system turn, which a record .* cannot hold"),
    ({**CHAT, "messages": CHAT["messages"] * 2}, ",messages=messages",
     r":2: 'messages' has the turns user/assistant/user/assistant"),
    ({**CHAT, "messages": "Hi?"}, ",messages=messages", r":2: 'messages' must be a non-empty list of turns"),
])
def test_bad_records_are_one_error_naming_file_and_line(tmp_path, record, spec, message):
    first = CHAT if "messages" in spec else GOOD
    path = write_jsonl(tmp_path / "tasks.jsonl", [first, record])
    with pytest.raises(DataError, match=message) as caught:
        read_records(f"records:{path}{spec}")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_file_column_and_file_type(tmp_path, capsys):
    assert cli_main(["prepare", "--source", f"records:{tmp_path}/nope.jsonl", "--output-dir", str(tmp_path / "o")]) == 1
    assert f"error: {tmp_path}/nope.jsonl: no such file (expected a .jsonl or .parquet file" in capsys.readouterr().err
    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"task": "greet", "question": "Hi?", "response": "Hello."}]), path)
    with pytest.raises(DataError, match=rf"{path}: missing column\(s\) prompt; expected task, prompt, response"):
        read_records(f"records:{path}")
    (tmp_path / "t.csv").write_text("task,prompt\n")
    with pytest.raises(DataError, match="unsupported file type"):
        read_records(f"records:{tmp_path / 't.csv'}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("task", ["../escape", "a/b", ".hidden", "..", "x" * 101, "tab\tname", "/abs"])
def test_unsafe_task_names_are_refused_naming_the_record(tmp_path, task):
    path = write_jsonl(tmp_path / "tasks.jsonl", [GOOD, {**GOOD, "task": task}])
    with pytest.raises(DataError, match=rf"{path}:2: task .* is not a safe file name"):
        prepare_from_source(f"records:{path}", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.jsonl"]  # nothing written, inside or out
    with pytest.raises(ValueError, match="is not a task name"):
        part_path(task, "test")


def test_task_names_differing_only_in_case_collide(tmp_path):
    data = [{**r, "task": r["task"].lower()} for r in rows() if r["task"] == "SST-2"] + rows()
    path = write_jsonl(tmp_path / "tasks.jsonl", data)
    with pytest.raises(ValueError, match="tasks 'SST-2' and 'sst-2' differ only in case"):
        prepare_from_source(f"records:{path}", tmp_path / "out")


def test_config_takes_user_task_names_and_an_absolute_records_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.source=records:./tasks.jsonl,holdout=shout", "data.tasks=[SST-2,qa.v1]"])
    assert with_absolute_paths(cfg).data.source == f"records:{tmp_path}/tasks.jsonl,holdout=shout"
    with pytest.raises(ConfigError, match=r"tasks: unknown \[.\.\./up.\]; expected task names"):
        load_config(None, ["data.source=records:./tasks.jsonl", "data.tasks=[../up]"])


# --- evaluation without answers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def nll_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("nll_only")
    path = write_jsonl(root / "tasks.jsonl", rows())
    prepare_from_source(f"records:{path},holdout=shout", root / "data", support_ratio=0.3, query_ratio=0.4)
    records = read_records(f"records:{path}")[0]
    model = build_tiny_model(root / "model", texts_from_records(records), vocab_size=300, hidden_size=32,
                             intermediate_size=64, head_dim=8)
    return root, model


def test_evaluation_scores_nll_only_and_refuses_to_grade(nll_only, capsys):
    root, model = nll_only
    common = ["eval", "--model-path", str(model), "--data-dir", str(root / "data"), "--n-shots", "0",
              "--max-test-per-task", "2", "--max-new-tokens", "4", "--n-boot", "50"]
    assert cli_main([*common, "--output-dir", str(root / "graded")]) == 1
    err = capsys.readouterr().err
    assert "no answer to grade a generation against; score without generating (--no-generate)" in err
    assert not (root / "graded" / "rows").exists()
    assert cli_main([*common, "--no-generate", "--output-dir", str(root / "eval")]) == 0
    result = json.loads((root / "eval" / "results.json").read_text())
    rows_ = json.loads((root / "eval" / "rows" / "model.json").read_text())["rows"]
    assert rows_ and all(r["nll"] > 0 and r["answer_nll"] is None and r["answer_accuracy"] is None for r in rows_)
    assert "**Answer metrics absent**" in (root / "eval" / "results.md").read_text()
    assert all(r["answer_nll"] is None for r in result["summary"])


# --- the experiment runner on your own held-out tasks, NLL only ----------------------------------------
OVERRIDES = ["data.max_length=96", "trainer.total_steps=2", "meta.meta_batch_size=2", "meta.num_inner_steps=1",
             "meta.inner_batch_size=2", "meta.query_batch_size=2", "sft.micro_batch_size=2", "sft.batch_size=4",
             "trainer.save_freq=2", "trainer.test_freq=2", "trainer.eval_num_support=2", "trainer.eval_num_test=2",
             "trainer.logger=[jsonl]"]


def runner_argv(out: Path, source: str, *extra: str) -> list[str]:
    return ["--tiny", "--tiny-dims", "64,2", "--out", str(out), "--source", source, "--methods", "fomaml",
            "sft_tokens", "--seeds", "0", "--eval-on", "holdout", "--validation-tasks", "1", "--adapt-grid", "1e-2:1",
            "--n-shots", "0", "2", "--episodes", "1", "--test-per-episode", "2", "--n-boot", "50", "--in-process",
            *extra, "--", *OVERRIDES]


def test_runner_holds_out_user_tasks_and_scores_nll_only(tmp_path, capsys, one_thread):
    path = write_jsonl(tmp_path / "tasks.jsonl", rows())
    source = f"records:{path},holdout=SST-2+qa.v1+shout"
    out = tmp_path / "bad"
    assert run_main(meta_vs_sft.main, runner_argv(out, source, "--verdict-metric", "answer_nll")) == 1
    assert "error: --verdict-metric answer_nll: the records of --source have no answers" in capsys.readouterr().err
    assert not (out / "runs").exists()  # refused before anything trained

    out = tmp_path / "mvs"
    assert run_main(meta_vs_sft.main, runner_argv(out, source, "--methods", "fomaml", "sft_tokens", "metaicl",
                                                  "--icl")) == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["validation_tasks"]) == 1
    assert set(result["validation_tasks"]) | set(result["test_tasks"]) == {"SST-2", "qa.v1", "shout"}
    # Every init adapted by gradient and in context (the user's records as shots in the prompt), MetaICL too.
    for init in [f"{name}{icl}" for name in ("base", "fomaml_0", "sft_tokens_0", "metaicl_0") for icl in ("", "_icl")]:
        scored = json.loads((out / "eval" / "rows" / f"{init}.json").read_text())["rows"]
        assert {r["task"] for r in scored} == set(result["test_tasks"])
        assert all(math.isfinite(r["nll"]) and r["answer_nll"] is None for r in scored)
        if not init.endswith("_icl"):
            assert result["adaptation"][init]["criterion"] == "nll"
    assert all(r["answer_accuracy"] is None and r["nll"] is not None for r in result["summary"])
    assert {row["verdict"] for row in result["comparisons"]} and (out / "few_shot_curve.png").is_file()
    assert "**Answer metrics absent**" in (out / "results.md").read_text()


def test_sft_rate_criterion_falls_back_to_nll_without_answers():
    # In memory (not yet read back from JSON) a row without answer tokens holds NaN, not None.
    scored = [{"answer_nll": math.nan, "nll": 1.0}, {"answer_nll": math.nan, "nll": 3.0}]
    assert meta_vs_sft.answer_nll(scored) == 2.0
    assert meta_vs_sft.answer_nll([{"answer_nll": 0.5, "nll": 1.0}, {"answer_nll": math.nan, "nll": 3.0}]) == 0.5
