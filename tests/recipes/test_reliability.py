"""Faults a user or a cluster inflicts on the training commands end with the right result or one
`error:` line (exit code 1 or 2, no traceback), and nothing on disk is lost: a bad `latest` pointer, a
resume with another LoRA shape or schedule, runs whose every step is skipped, relative paths, output
directories that are not writable, a full disk, a prepared file missing a column, two runs on one run
directory, a fresh start over an earlier run."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_helpers import (
    FOMAML_SCRIPT,
    REPO_ROOT,
    SUBPROCESS_TIMEOUT_S,
    RecipeInputs,
    checkpoint_weights,
    latest_step,
    logged_steps,
    read_metrics,
    run_args,
    run_in_process,
    start_subprocess,
    subprocess_env,
    wait_for,
)

import recipes.fomaml_math as fomaml
from recipes.build_tiny_model import main as tiny_model_main
from recipes.prepare_math_data import main as prepare_main
from lora_maml import cli
from lora_maml.config import ConfigError, load_config
from lora_maml import checkpoint as ckpt
from lora_maml.checkpoint import check_resumable
from lora_maml.data.prepare import read_manifest
from lora_maml.load_trained import load_trained

OUTER_LR = 3e-3  # optim.outer_lr of tiny_cpu.yaml; its warm-up rounds to 0 steps for these runs


def copy_run(source: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of a finished run and the bytes of its checkpoint files (to prove they are untouched)."""
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out, {p.name: p.read_bytes() for p in out.glob("*.pt")}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def cosine_lr(step: int, total: int) -> float:
    return OUTER_LR * 0.5 * (1 + math.cos(math.pi * step / total))


def test_a_bad_latest_pointer_resumes_the_newest_checkpoint_and_a_longer_schedule_continues(
        recipe_inputs, fomaml_reference, tmp_path, caplog):
    """Complete step_2 and step_4, `latest` says step_1: the same run (resume_mode=auto) resumes from
    step 4 with a warning, never from scratch, and step_2 / step_4 stay byte-identical. It is resumed with
    trainer.total_steps 4 -> 6: the next steps follow the NEW cosine (not the old one's final lr 0)."""
    out, before = copy_run(fomaml_reference, tmp_path)
    (out / "latest").write_text("step_1\n")
    assert run_in_process(fomaml.main, run_args(recipe_inputs, out, "trainer.total_steps=6")) == 0
    assert f"{out}/latest names step_1, which is not a complete checkpoint" in caplog.text
    assert "resuming from the newest complete checkpoint, step 4" in caplog.text
    assert "trainer.total_steps 4 -> 6" in caplog.text and "continuing with the new ones from step 4" in caplog.text
    assert {p.name: p.read_bytes() for p in out.glob("*.pt") if p.name in before} == before
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[:4] == read_metrics(fomaml_reference)
    assert rows[3]["meta/lr"] == pytest.approx(cosine_lr(3, 4))  # the old schedule, as trained
    assert [r["meta/lr"] for r in rows[4:]] == pytest.approx([cosine_lr(4, 6), cosine_lr(5, 6)], rel=1e-9)
    assert latest_step(out) == 6


@pytest.mark.parametrize("override, key, saved", [
    ("model.lora.r=16", "model.lora.r", "8"),
    ("model.lora.alpha=32", "model.lora.alpha", "16.0"),
    ("model.lora.target_modules=[q_proj,v_proj]", "model.lora.target_modules", None),
    ("meta.adapter=full", "meta.adapter", '"lora"'),
])
def test_resuming_with_another_adapter_shape_is_refused_naming_the_key(
        recipe_inputs, fomaml_reference, tmp_path, override, key, saved):
    out, before = copy_run(fomaml_reference, tmp_path)
    with pytest.raises(ConfigError) as err:  # before the model loads: there is none at model.partial_pretrain
        run_in_process(fomaml.main, run_args(recipe_inputs, out, "trainer.total_steps=6", override,
                                             f"model.partial_pretrain={tmp_path / 'no_model'}"))
    message = str(err.value)
    assert message.startswith(f"cannot resume {out}/maml_checkpoint_step_4.pt: {key}=")
    if saved is not None:
        assert f"(set {key}={saved})" in message
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before and latest_step(out) == 4


def test_resume_compares_shapes_not_only_names(tmp_path):
    """Same names, other shapes (e.g. another base model of the same family): refused before any copy."""
    cfg = load_config(None, [])
    saved = {"a.lora_A.default.weight": torch.zeros(8, 32)}
    params = {"a.lora_A.default.weight": torch.zeros(8, 64)}
    from lora_maml.config import config_to_dict

    with pytest.raises(ConfigError, match=r"1 weights differ in shape .*a\.lora_A\.default\.weight: \(8, 32\) saved, "
                                          r"\(8, 64\) here"):
        check_resumable(tmp_path / "x.pt", config_to_dict(cfg), cfg, saved, params)
    with pytest.raises(ConfigError, match=r"1 saved weights vs 2 in this model"):
        check_resumable(tmp_path / "x.pt", config_to_dict(cfg), cfg, saved, {**params, "b": torch.zeros(1)})


def test_changed_data_or_base_is_refused_on_resume_and_named_by_evaluation(recipe_inputs, tmp_path, caplog, capsys):
    """The data dir re-prepared with the same split sizes but other contents (another seed), or the base at
    the recorded path replaced by another tiny model of the same shape (another init seed): resuming is
    refused before the model loads, naming what changed and the key that allows it; that key resumes with
    a warning; evaluation warns naming the data dir / the base."""
    data, model, out = tmp_path / "data", tmp_path / "tiny", tmp_path / "run"
    inputs = RecipeInputs(data, model)

    def prepare(seed: int) -> None:  # the recipe_inputs data dir's command, with another seed
        assert prepare_main(["--source", "synthetic", "--synthetic-per-task", "40", "--output-dir", str(data),
                             "--seed", str(seed), "--overwrite"]) == 0

    prepare(42)
    shutil.copytree(recipe_inputs.model_dir, model)
    assert run_in_process(fomaml.main, run_args(inputs, out, "trainer.total_steps=2")) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    counts = read_manifest(data)["counts"]

    prepare(43)
    assert read_manifest(data)["counts"] == counts  # the sampler's fingerprint (split sizes) sees no change
    with pytest.raises(ConfigError) as err:
        run_in_process(fomaml.main, run_args(inputs, out, "trainer.total_steps=4"))
    message = str(err.value)
    assert message.startswith(f"cannot resume {out}/maml_checkpoint_step_2.pt: the data in data.data_dir={data} "
                              "changed since it was written (")
    assert "files with other rows" in message and "Set trainer.allow_changed_inputs=true" in message
    caplog.clear()
    assert run_in_process(cli.main, ["eval", "--model-path", str(out), "--data-dir", str(data), "--tasks", "algebra",
                                     "--n-shots", "0", "--max-test-per-task", "1", "--no-generate", "--n-boot", "10",
                                     "--output-dir", str(tmp_path / "eval")]) == 0
    assert f"the data dir {data} is not the data it was trained on" in caplog.text

    prepare(42)  # the same rows again; now another base of the same shape at the recorded path
    assert tiny_model_main([
        "--output-dir", str(model), "--data-dir", str(data), "--vocab-size", "512", "--hidden-size", "32",
        "--num-hidden-layers", "2", "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "16",
        "--intermediate-size", "64", "--seed", "1", "--overwrite"]) == 0
    with pytest.raises(ConfigError, match=rf"^cannot resume {out}/maml_checkpoint_step_2\.pt: the base model at "
                                          rf"model\.partial_pretrain={model} is not the one it was trained on \(other "
                                          rf"weights in model\.safetensors\)\. Set trainer\.allow_changed_inputs=true"):
        run_in_process(fomaml.main, run_args(inputs, out, "trainer.total_steps=4"))
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before and latest_step(out) == 2
    caplog.clear()
    load_trained(out)
    assert f"the base model {model} is not the one it was trained on (other weights in model.safetensors)" in caplog.text

    caplog.clear()
    assert run_in_process(fomaml.main, run_args(inputs, out, "trainer.total_steps=4",
                                                "trainer.allow_changed_inputs=true")) == 0
    assert "resuming anyway (trainer.allow_changed_inputs=true)" in caplog.text and latest_step(out) == 4
    caplog.clear()
    load_trained(out)  # step 4 recorded the base it was resumed on
    assert "is not the one it was trained on" not in caplog.text


def test_a_run_whose_every_step_is_skipped_fails_and_saves_nothing(recipe_inputs, tmp_path):
    """meta.inner_lr=1e30 makes every query loss non-finite: both steps are skipped (fewer than
    trainer.max_consecutive_nonfinite), so the run trained nothing: exit non-zero, no checkpoint."""
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="every step of this run was skipped"):
        run_in_process(fomaml.main, run_args(recipe_inputs, out, "meta.inner_lr=1e30", "trainer.total_steps=2"))
    assert [r["meta/skipped_step"] for r in read_metrics(out)] == [1, 1]
    assert ckpt.complete_steps(out) == [] and not (out / "latest").exists()


def test_relative_paths_are_saved_absolute(recipe_inputs, tmp_path, monkeypatch):
    """A run started with relative paths records absolute ones (config, adapter's base), so loading or
    merging it works from any working directory."""
    import json

    from lora_maml.load_trained import load_trained

    work = tmp_path / "work"
    shutil.copytree(recipe_inputs.model_dir, work / "models" / "tiny")
    monkeypatch.chdir(work)
    inputs = type(recipe_inputs)(recipe_inputs.data_dir, Path("models/tiny"))
    assert run_in_process(fomaml.main, run_args(inputs, Path("./out"), "trainer.total_steps=2")) == 0
    saved = ckpt.load_checkpoint(work / "out" / "maml_checkpoint_step_2.pt")["config"]
    assert saved["model"]["partial_pretrain"] == str(work / "models" / "tiny")
    assert saved["trainer"]["default_local_dir"] == str(work / "out")
    adapter_cfg = json.loads((work / "out" / "step_2" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(work / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert load_trained(work / "out").step == 2


# -- one error line per user error, through the CLI entry point ----------------------------------------


def test_an_unwritable_output_dir_fails_before_anything_loads(recipe_inputs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for command in ("train", "sft"):
        # model.partial_pretrain names nothing: the output directory is refused before any loading.
        args = run_args(recipe_inputs, blocker / "run", f"model.partial_pretrain={tmp_path / 'no_model'}")
        assert run_in_process(cli.main, [command, *args]) == 1
        assert one_error_line(capsys.readouterr().err) == (
            f"error: trainer.default_local_dir={blocker / 'run'}: not a writable directory ({blocker} is a file)")


def test_config_data_and_checkpoint_errors_are_one_line(recipe_inputs, fomaml_reference, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_in_process(cli.main, ["train", *run_args(recipe_inputs, out, "meta.outer_lr=.inf")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: invalid config (recipes/configs/tiny_cpu.yaml + overrides): meta.outer_lr: Input should be a finite "
        "number (got inf)".replace("recipes/configs/tiny_cpu.yaml", str(REPO_ROOT / "recipes/configs/tiny_cpu.yaml")))

    resumed, _ = copy_run(fomaml_reference, tmp_path)
    assert run_in_process(cli.main, ["sft", *run_args(recipe_inputs, resumed, "model.lora.r=4")]) == 2
    assert "(set model.lora.r=8)" in one_error_line(capsys.readouterr().err)

    missing = tmp_path / "nothing.tar.gz"
    args = run_args(recipe_inputs, tmp_path / "run3", f"data.data_dir={tmp_path / 'unprepared'}", f"data.source={missing}")
    assert run_in_process(cli.main, ["train", *args]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(
        f"error: preparing data.data_dir={tmp_path / 'unprepared'} from data.source={missing}: {missing}: no such file")

    data = tmp_path / "data"
    shutil.copytree(recipe_inputs.data_dir, data)
    import pyarrow.parquet as pq

    broken = data / "meta_train" / "algebra_query.parquet"
    pq.write_table(pq.read_table(broken).drop_columns(["response"]), broken)
    args = run_args(recipe_inputs, tmp_path / "run2", f"data.data_dir={data}")
    assert run_in_process(cli.main, ["train", *args]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {broken}: missing column(s) ['response']")


def test_a_full_disk_is_one_line_and_keeps_the_complete_checkpoints(recipe_inputs, tmp_path, capsys):
    """/dev/full answers every write with ENOSPC: put where this process writes `latest`'s temporary
    file, it fails the step-2 save after its checkpoint files are complete."""
    out = tmp_path / "run"
    out.mkdir()
    (out / f".latest.tmp-{os.getpid()}").symlink_to("/dev/full")
    assert run_in_process(cli.main, ["train", *run_args(recipe_inputs, out)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: {out}/.latest.tmp-{os.getpid()}: No space left on device (disk full: free space or write elsewhere)"
    assert ckpt.complete_steps(out) == [2] and not (out / "latest").exists()
    assert all(torch.isfinite(w).all() for w in checkpoint_weights(out, 2).values())


def test_the_console_script_prints_one_line_and_a_traceback_on_request(recipe_inputs, tmp_path):
    args = [sys.executable, "-m", "lora_maml.cli", "train", *run_args(recipe_inputs, tmp_path / "run", "meta.outer_lr=.inf")]
    plain = subprocess.run(args, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                           timeout=SUBPROCESS_TIMEOUT_S)
    assert plain.returncode == 2 and "meta.outer_lr: Input should be a finite number" in one_error_line(plain.stderr)
    debug = subprocess.run([*args, "--debug"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                           timeout=SUBPROCESS_TIMEOUT_S)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "error: invalid config" in debug.stderr


# -- one run per run directory ---------------------------------------------------------------------------


def test_a_second_run_on_a_run_directory_is_refused_and_a_killed_runs_lock_is_taken_over(
        recipe_inputs, tmp_path, capsys, caplog):
    """Run A trains in a subprocess. Run B on the same trainer.default_local_dir (resume_mode auto, then
    disable) exits 1 with one error line naming A's pid and host, and A's files are untouched: its
    metrics.jsonl not cut, its checkpoint not replaced. A is then SIGKILLed, so its lock file stays: the next
    run takes the lock over with a warning naming A, resumes A's newest checkpoint and finishes."""
    out = tmp_path / "run"
    settings = ("trainer.save_freq=2", "trainer.test_freq=100000", "trainer.max_ckpt_to_keep=null")
    log_path = tmp_path / "a.log"
    proc, log = start_subprocess([sys.executable, str(FOMAML_SCRIPT), *run_args(
        recipe_inputs, out, "trainer.total_steps=100000", *settings)], log_path)
    try:
        wait_for(lambda: (out / "latest").exists() and len(logged_steps(out)) >= 3, proc, log_path, "run A's step 3")
        metrics = (out / "metrics.jsonl").read_text(encoding="utf-8")
        metrics = metrics[: metrics.rindex("\n") + 1]  # the complete lines
        step_2 = (out / "maml_checkpoint_step_2.pt").read_bytes()
        for mode in ("auto", "disable"):
            args = run_args(recipe_inputs, out, "trainer.total_steps=2", f"trainer.resume_mode={mode}")
            assert run_in_process(cli.main, ["train", *args]) == 1
            assert one_error_line(capsys.readouterr().err).startswith(
                f"error: trainer.default_local_dir={out}: in use by process {proc.pid} on host {socket.gethostname()}, "
                "started ")
        assert (out / "metrics.jsonl").read_text(encoding="utf-8").startswith(metrics)
        assert (out / "maml_checkpoint_step_2.pt").read_bytes() == step_2
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid
    killed_at = latest_step(out)
    args = run_args(recipe_inputs, out, f"trainer.total_steps={killed_at + 2}", *settings)
    with caplog.at_level(logging.INFO):
        assert run_in_process(fomaml.main, args) == 0
    assert f"taking over the lock of process {proc.pid} on host {socket.gethostname()}" in caplog.text
    assert f"resumed from {out / f'maml_checkpoint_step_{killed_at}.pt'}" in caplog.text
    assert latest_step(out) == killed_at + 2 and logged_steps(out) == list(range(1, killed_at + 3))
    assert not (out / ".lock").exists()


def test_a_fresh_start_over_an_earlier_run_is_refused_unless_overwrite(recipe_inputs, fomaml_reference, tmp_path, capsys):
    """trainer.resume_mode=disable over a finished run: one error line naming what is there and how to go on,
    nothing touched. With trainer.overwrite=true the earlier checkpoints go and the new run owns the directory."""
    out, before = copy_run(fomaml_reference, tmp_path)
    metrics, latest = (out / "metrics.jsonl").read_bytes(), (out / "latest").read_bytes()
    assert run_in_process(cli.main, ["train", *run_args(recipe_inputs, out, "trainer.resume_mode=disable")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: trainer.resume_mode=disable: trainer.default_local_dir={out} holds an earlier run (latest, "
        "maml_checkpoint_step_2.pt, step_2, maml_checkpoint_step_4.pt and 2 more); set trainer.resume_mode=auto to "
        "continue it, trainer.overwrite=true to replace it, or choose another trainer.default_local_dir")
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    assert (out / "metrics.jsonl").read_bytes() == metrics and (out / "latest").read_bytes() == latest

    args = run_args(recipe_inputs, out, "trainer.resume_mode=disable", "trainer.overwrite=true", "trainer.total_steps=2")
    assert run_in_process(cli.main, ["train", *args]) == 0
    assert ckpt.complete_steps(out) == [2] and latest_step(out) == 2 and not (out / "step_4").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
