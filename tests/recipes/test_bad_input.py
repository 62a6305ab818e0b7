"""Hostile or broken inputs end in ONE `error:` line naming the file, config key or flag and what was
expected (exit code 1, or 2 for a config / argument error), no traceback, and before the long work: a
truncated or corrupt model file, a pickled adapter, a chat template the jinja2 sandbox refuses, a corrupt
tokenizer, an empty split, a full disk under a figure, non-finite float options, a length cap that leaves
nothing to score, a NaN checkpoint to resume, an empty task list, a zero-width tiny model.

The commands run in this process (``lora_maml.cli.main``), on the session's tiny Qwen3, prepared data and
4-step FOMAML run (``conftest.py``); every input is a real file written wrong."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from recipe_helpers import latest_step, run_args, run_in_process

from lora_maml import cli

PICKLE_MARKER = "unpickled.marker"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``lora-maml ARGV`` in this process: (exit code, stderr). argparse's errors exit through SystemExit."""
    try:
        code = run_in_process(cli.main, list(argv))
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The one line that reports the error (``error: ...``, or argparse's ``PROG: error: ...``)."""
    lines = [line for line in err.splitlines() if "error: " in line]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def copy_model(recipe_inputs, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(recipe_inputs.model_dir, model)
    return model


def eval_args(model_path, data_dir, out: Path, *extra: str) -> list[str]:
    return ["eval", "--model-path", str(model_path), "--data-dir", str(data_dir), "--tasks", "algebra",
            "--n-shots", "0", "--max-test-per-task", "2", "--no-generate", "--output-dir", str(out), *extra]


# --- model files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "bad header"])
@pytest.mark.parametrize("command", ["train", "eval", "merge"])
def test_a_damaged_safetensors_file_is_named_before_anything_loads(recipe_inputs, fomaml_reference, tmp_path,
                                                                   capsys, damage, command):
    """Half a `model.safetensors` (an interrupted download) or a garbage header: train, eval (as the base of a
    run checkpoint) and merge name the file; nothing is written."""
    model = copy_model(recipe_inputs, tmp_path)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:64])
    out = tmp_path / "out"
    argv = {
        "train": ["train", *run_args(recipe_inputs, out, f"model.partial_pretrain={model}")],
        "eval": eval_args(fomaml_reference, recipe_inputs.data_dir, out, "--base", str(model)),
        "merge": ["merge", "--model-path", str(fomaml_reference), "--base", str(model), "--output", str(out)],
    }[command]
    code, err = run_cli(capsys, *argv)
    assert code == 1
    assert one_error_line(err).startswith(f"error: {weights}: not a valid safetensors file (")
    assert not out.exists() or not any(out.iterdir())


def test_a_pickled_adapter_is_refused_and_never_unpickled(fomaml_reference, recipe_inputs, tmp_path, capsys):
    """An `adapter_model.bin` (pickle) instead of `adapter_model.safetensors`: eval and merge refuse it,
    naming it; its payload (which would write a marker file when unpickled) never runs."""
    adapter = tmp_path / "adapter"
    shutil.copytree(fomaml_reference / f"step_{latest_step(fomaml_reference)}" / "adapter", adapter)
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / PICKLE_MARKER

    class WritesAMarker:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": WritesAMarker()}))
    for argv in (eval_args(adapter, recipe_inputs.data_dir, tmp_path / "eval"),
                 ["merge", "--model-path", str(adapter), "--output", str(tmp_path / "merged")]):
        code, err = run_cli(capsys, *argv)
        assert code == 1
        line = one_error_line(err)
        assert line.startswith(f"error: {adapter}/adapter_model.bin: a pickled adapter; only safetensors adapters")
    assert not marker.exists()


def test_a_chat_template_refused_by_the_sandbox_is_named(recipe_inputs, tmp_path, capsys):
    """A chat template that reaches for `__globals__` (to run a shell command): jinja2's sandbox refuses it,
    and train and eval name the template's file before any weight loads."""
    model = copy_model(recipe_inputs, tmp_path)
    marker = tmp_path / "template.marker"
    template = model / "chat_template.jinja"
    template.write_text("{{ raise_exception.__globals__['os'].system('touch " + str(marker) + "') }}"
                        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for argv in (["train", *run_args(recipe_inputs, tmp_path / "run", f"model.partial_pretrain={model}")],
                 eval_args(model, recipe_inputs.data_dir, tmp_path / "eval")):
        code, err = run_cli(capsys, *argv)
        assert code == 1
        line = one_error_line(err)
        assert line.startswith(f"error: {template}: the chat template failed on a user prompt (SecurityError: ")
        assert "__globals__" in line
    assert not marker.exists()


def test_a_corrupt_tokenizer_json_is_named(recipe_inputs, tmp_path, capsys):
    model = copy_model(recipe_inputs, tmp_path)
    tokenizer = model / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:300])
    code, err = run_cli(capsys, *eval_args(model, recipe_inputs.data_dir, tmp_path / "eval"))
    assert code == 1
    assert one_error_line(err).startswith(f"error: {tokenizer}: not readable (")
    assert not (tmp_path / "eval" / "plan.json").exists()


# --- data and outputs ------------------------------------------------------------------------------
def test_a_split_with_no_rows_is_named(recipe_inputs, tmp_path, capsys):
    """A test split (eval) or a support split (train) replaced by a file of 0 rows."""
    data = tmp_path / "data"
    shutil.copytree(recipe_inputs.data_dir, data)
    for split in (data / "few_shot_eval" / "algebra_test.parquet", data / "meta_train" / "algebra_support.parquet"):
        pq.write_table(pq.read_table(split).slice(0, 0), split)
    code, err = run_cli(capsys, *eval_args(recipe_inputs.model_dir, data, tmp_path / "eval"))
    assert code == 1
    assert one_error_line(err) == (f"error: {data}/few_shot_eval/algebra_test.parquet: 0 rows; every split needs "
                                   "records (prepare the directory again with lora-maml prepare)")
    code, err = run_cli(capsys, "train", *run_args(recipe_inputs, tmp_path / "run", f"data.data_dir={data}"))
    assert code == 1
    assert one_error_line(err).startswith(f"error: {data}/meta_train/algebra_support.parquet: 0 rows")


def test_a_full_disk_under_a_figure_names_the_file(recipe_inputs, tmp_path, capsys):
    """/dev/full answers every write with ENOSPC: put where this process writes few_shot_curve.png's
    temporary file, the report fails naming it (matplotlib's error names no file)."""
    out = tmp_path / "eval"
    out.mkdir()
    figure_tmp = out / f".few_shot_curve.png.tmp-{os.getpid()}"
    figure_tmp.symlink_to("/dev/full")
    code, err = run_cli(capsys, *eval_args(recipe_inputs.model_dir, recipe_inputs.data_dir, out))
    assert code == 1
    assert one_error_line(err) == (f"error: {figure_tmp}: No space left on device (disk full: free space or write "
                                   "elsewhere)")


# --- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, flag, value, code, expected", [
    # --adapt-lr [NAME=]V is parsed by the program (a value per method), with the same type.
    ("eval", "--adapt-lr", "inf", 1, "error: --adapt-lr 'inf': 'inf' is not a valid positive finite float"),
    ("eval", "--adapt-lr", "model=nan", 1, "error: --adapt-lr 'model=nan': 'nan' is not a valid positive finite float"),
    ("eval", "--vllm-gpu-memory-utilization", "nan", 2,
     "argument --vllm-gpu-memory-utilization: expected a number in (0, 1], got 'nan'"),
    ("merge", "--atol", "nan", 2, "argument --atol: expected a finite number >= 0, got 'nan'"),
    ("merge", "--atol", "inf", 2, "argument --atol: expected a finite number >= 0, got 'inf'"),
    ("experiment", "--pretrain-lr", "inf", 2, "argument --pretrain-lr: expected a finite number > 0, got 'inf'"),
    ("experiment", "--sft-lrs", "nan", 2, "argument --sft-lrs: expected a finite number > 0, got 'nan'"),
])
def test_non_finite_float_options_are_refused_before_anything_runs(fomaml_reference, recipe_inputs, tmp_path, capsys,
                                                                     command, flag, value, code, expected):
    """NaN and infinity parse as floats; every float option refuses them before anything is read or
    written (with the command line: exit code 2), not after the evaluation or the merge."""
    out = tmp_path / "out"
    argv = {
        "eval": eval_args(fomaml_reference, recipe_inputs.data_dir, out, "--n-shots", "2", "--seeds", "1"),
        "merge": ["merge", "--model-path", str(fomaml_reference), "--output", str(out)],
        "experiment": ["experiment", "--tiny", "--out", str(out)],
    }[command]
    exit_code, err = run_cli(capsys, *argv, flag, value)
    assert exit_code == code and one_error_line(err).endswith(expected)
    assert not out.exists()


def test_merge_in_fp32_does_not_advise_fp32(fomaml_reference, tmp_path, capsys):
    """A merge stored in fp32 that misses a tolerance below fp32's rounding: the advice is a larger --atol,
    not the --dtype fp32 it already has."""
    code, err = run_cli(capsys, "merge", "--model-path", str(fomaml_reference), "--dtype", "fp32", "--atol", "0",
                        "--output", str(tmp_path / "merged"))
    assert code == 1, "the fp32 merge matched base + adapter exactly: no rounding left to exceed --atol 0"
    line = one_error_line(err)
    assert "stored as fp32" in line and "a larger --atol accepts it" in line and "--dtype" not in line


def test_a_max_length_that_leaves_nothing_to_score_fails_before_the_model_loads(fomaml_reference, recipe_inputs,
                                                                                tmp_path, capsys):
    """--max-length 1 is refused with the command line (the floor: ChatML's 8 marker tokens); --max-length 8
    cuts every scored reference inside its prompt, which the tokenizer shows before any weight loads."""
    out = tmp_path / "eval"
    code, err = run_cli(capsys, *eval_args(fomaml_reference, recipe_inputs.data_dir, out, "--max-length", "1"))
    assert code == 2 and "argument --max-length: expected an integer >= 8" in one_error_line(err)
    code, err = run_cli(capsys, *eval_args(fomaml_reference, recipe_inputs.data_dir, out, "--max-length", "8"))
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("error: --max-length=8 (right truncation) leaves no scored problem a token of its solution")
    assert "expected --max-length > " in line
    assert not (out / "plan.json").exists()


# --- training --------------------------------------------------------------------------------------
def poison(run: Path, step: int) -> None:
    """A NaN in one weight of checkpoint ``step``, its manifest updated so the checkpoint stays complete
    (as a file damaged in place, or written by other code, would look)."""
    pt = run / f"maml_checkpoint_step_{step}.pt"
    payload = torch.load(pt, map_location="cpu", weights_only=True)
    name = next(iter(payload["model_state_dict"]))
    payload["model_state_dict"][name] = payload["model_state_dict"][name].clone().fill_(float("nan"))
    torch.save(payload, pt)
    manifest_path = run / f"step_{step}" / "checkpoint_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["pt_size"] = pt.stat().st_size
    manifest_path.write_text(json.dumps(manifest))


def test_resuming_non_finite_weights_names_the_newest_finite_checkpoint(fomaml_reference, recipe_inputs, tmp_path,
                                                                        capsys):
    """The newest checkpoint holds a NaN: resuming it is refused before the model loads, naming the
    previous one (finite) to resume instead; with every checkpoint poisoned, it says there is none. The
    checkpoints are left as they were."""
    run = tmp_path / "run"
    shutil.copytree(fomaml_reference, run)
    assert latest_step(run) == 4
    poison(run, 4)
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    argv = ["train", *run_args(recipe_inputs, run, "trainer.total_steps=6")]
    code, err = run_cli(capsys, *argv)
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"error: cannot resume {run}/maml_checkpoint_step_4.pt: its weights are not finite")
    assert line.endswith(f"the newest checkpoint with finite weights is {run}/maml_checkpoint_step_2.pt: resume it "
                         f"with trainer.resume_mode=path trainer.resume_from_path={run}/maml_checkpoint_step_2.pt")
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    poison(run, 2)
    code, err = run_cli(capsys, *argv)
    assert code == 1
    assert one_error_line(err).endswith(f"no other checkpoint in {run} has finite weights: start a new run in "
                                        "another trainer.default_local_dir")


@pytest.mark.parametrize("override, key", [("data.tasks=[]", "data.tasks"),
                                           ("model.lora.target_modules=[]", "model.lora.target_modules")])
def test_an_empty_list_that_needs_items_is_a_config_error(recipe_inputs, tmp_path, capsys, override, key):
    code, err = run_cli(capsys, "train", *run_args(recipe_inputs, tmp_path / "run", override))
    assert code == 2
    assert f"{key}: List should have at least 1 item" in one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--hidden-size", "0", "--hidden-size=0: every size of the model must be an integer >= 1"),
    ("--num-hidden-layers", "-1", "--num-hidden-layers=-1: every size of the model must be an integer >= 1"),
    ("--head-dim", "15", "--head-dim=15: must be even (rotary position embeddings turn pairs of dimensions)"),
])
def test_a_tiny_model_of_impossible_sizes_is_refused(tmp_path, capsys, flag, value, expected):
    out = tmp_path / "tiny"
    code, err = run_cli(capsys, "tiny-model", "--output-dir", str(out), "--synthetic-per-task", "2", flag, value)
    assert code == 1 and one_error_line(err) == f"error: {expected}"
    assert not out.exists()
