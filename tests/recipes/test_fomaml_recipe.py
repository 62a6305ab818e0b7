"""recipes/fomaml_math.py end to end on a tiny Qwen3: the result does not depend on the number of
processes (plain or FSDP), a stopped-and-resumed run equals an uninterrupted one, SIGTERM / SIGINT
stop cleanly, SIGKILL mid-save leaves a resumable run, non-finite steps are skipped and counted,
and the console shows the guide's line format."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from recipe_helpers import (
    FOMAML_SCRIPT,
    accelerate_2cpu,
    assert_same_metrics,
    checkpoint_weights,
    latest_step,
    logged_steps,
    max_weight_diff,
    read_metrics,
    run_args,
    run_in_process,
    run_subprocess,
    start_subprocess,
    torchrun,
    wait_for,
    worker_pid,
)

import recipes.fomaml_math as fomaml
from lora_maml.config import ConfigError
from lora_maml.load_trained import load_trained
from lora_maml import checkpoint as ckpt
from lora_maml.distributed import Dist
from recipes.sft_math import load_run_config

# fp32 sums of the per-task gradients and losses happen in another order across processes.
CROSS_PROCESS_REL = 1e-6
CROSS_PROCESS_ABS = 1e-6


# The runs compared with straight_run: the same 6-step cosine schedule, and LoRA dropout so that the
# result depends on the RNG state that a resume must restore.
RESUME_ARGS = ("trainer.total_steps=6", "model.lora.dropout=0.1")


@pytest.fixture(scope="module")
def straight_run(recipe_inputs, tmp_path_factory):
    """6 meta-steps without interruption: the reference of the resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, out, *RESUME_ARGS)) == 0
    assert latest_step(out) == 6
    return out


@contextlib.contextmanager
def sigterm_during_step(monkeypatch, stop_step: int):
    """In-process runs inside get a SIGTERM while meta-step ``stop_step`` (0-based) runs."""
    train_step = fomaml.MetaTrainingRecipe.train_step

    def signalled_train_step(self, step):
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(fomaml.MetaTrainingRecipe, "train_step", signalled_train_step)
        yield


def saved_world_size(run_dir) -> int:
    state = json.loads((run_dir / f"step_{latest_step(run_dir)}" / "trainer_state.json").read_text())
    assert len(state["rng_states"]) == state["trainer_state"]["world_size"]
    return state["trainer_state"]["world_size"]


def assert_processes_agree(one, two) -> None:
    """Final LoRA weights and every logged number (meta/*, per-task, eval/*) of two runs agree."""
    assert latest_step(one) == latest_step(two) == 4
    diff = max_weight_diff(checkpoint_weights(one), checkpoint_weights(two))
    assert diff <= CROSS_PROCESS_ABS, f"final LoRA weights differ by {diff:.3e}"
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in rows_one] == [1, 2, 3, 4]
    assert_same_metrics(rows_one, rows_two, rel=CROSS_PROCESS_REL, abs_=CROSS_PROCESS_ABS)


# -- 1 process vs 2 processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_match_one(recipe_inputs, fomaml_reference, tmp_path):
    """accelerate launch (recipes/accelerate/2cpu.yaml) starts 2 gloo processes; 3 tasks per meta-step
    split 2 + 1 between them give the same meta-gradients, weights and logged metrics as 1 process."""
    out = tmp_path / "two"
    run_subprocess(accelerate_2cpu(FOMAML_SCRIPT, run_args(recipe_inputs, out)), tmp_path / "two.log")
    assert saved_world_size(out) == 2, "the launcher did not start 2 processes"
    assert saved_world_size(fomaml_reference) == 1
    assert_processes_agree(fomaml_reference, out)


@pytest.mark.slow
def test_fsdp_two_processes_match_one(recipe_inputs, tmp_path):
    """FSDP2 over the frozen base (LoRA replicated) gives the same result as one unsharded process,
    periodic evaluation included (every forward is a collective there), and exports the adapter."""
    # FSDP needs an even share (2 tasks per process); activation checkpointing as in the 4B config
    # re-runs each layer's forward, with its all-gather, inside the fast-weight backward.
    extra = ("meta.meta_batch_size=4", "model.enable_gradient_checkpointing=true")
    one, two = tmp_path / "one", tmp_path / "fsdp"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, one, *extra)) == 0
    args = run_args(recipe_inputs, two, *extra, "model.fsdp_config.enabled=true")
    run_subprocess(torchrun(FOMAML_SCRIPT, args), tmp_path / "fsdp.log")
    assert saved_world_size(two) == 2
    assert "eval/loss_post" in read_metrics(two)[1], "no periodic evaluation at step 2"
    assert_processes_agree(one, two)
    # Rank 0 exports the PEFT adapter of the FSDP-wrapped model: it holds the trained weights.
    exported = load_trained(two / "step_4" / "adapter", base=str(recipe_inputs.model_dir))
    weights = checkpoint_weights(two)
    assert set(exported.params) == set(weights)
    assert all(torch.equal(exported.params[k].detach(), v) for k, v in weights.items())


def test_fsdp_refuses_an_uneven_share_of_tasks(recipe_inputs, tmp_path, monkeypatch):
    """Under FSDP a process with one task more than another would hang in its extra forward's
    all-gather: the recipe refuses such a meta-batch up front, naming the key."""
    monkeypatch.setattr(fomaml.Trainer, "__init__", _init_as_rank_0_of_2(fomaml.Trainer.__init__))
    args = run_args(recipe_inputs, tmp_path / "run", "model.fsdp_config.enabled=true", "meta.meta_batch_size=3")
    with pytest.raises(ConfigError, match=r"meta\.meta_batch_size = 3 must be a multiple of the number of processes \(2\)"):
        fomaml.main(args)
    assert not (tmp_path / "run").exists()


def _init_as_rank_0_of_2(init):
    def patched(self, cfg):
        init(self, cfg)
        self.dist = Dist(rank=0, world_size=2, device=torch.device("cpu"))

    return patched


# -- exact resume ---------------------------------------------------------------------------------------


def test_stop_at_step_3_and_resume_equals_straight_run(recipe_inputs, straight_run, tmp_path, monkeypatch, caplog):
    """Stopped by SIGTERM during meta-step 3 of 6 (between checkpoints: save_freq=2) and resumed with
    the same command: the final weights are bitwise those of the uninterrupted run, and
    metrics.jsonl has the same rows (all keys but perf/*) for every step."""
    out = tmp_path / "run"
    args = run_args(recipe_inputs, out, *RESUME_ARGS)
    with sigterm_during_step(monkeypatch, 2):  # 0-based: the signal arrives while meta-step 3 runs
        assert run_in_process(fomaml.main, args) == 0
    assert latest_step(out) == 3
    assert not ckpt.checkpoint_problems(out, 3)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert "received SIGTERM" in caplog.text and "stopped at step 3 on request" in caplog.text

    assert run_in_process(fomaml.main, args) == 0  # trainer.resume_mode=auto
    assert latest_step(out) == 6
    assert max_weight_diff(checkpoint_weights(out), checkpoint_weights(straight_run)) == 0.0
    assert_same_metrics(read_metrics(out), read_metrics(straight_run))
    resumed_opt = torch.load(out / "maml_checkpoint_step_6.pt", weights_only=True)["optimizer_state_dict"]
    straight_opt = torch.load(straight_run / "maml_checkpoint_step_6.pt", weights_only=True)["optimizer_state_dict"]
    for index, state in straight_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed_opt["state"][index][key], value), f"optimizer state {index}.{key} differs"

    # The same command once more finds the run finished and changes nothing.
    rows, weights = read_metrics(out), checkpoint_weights(out)
    assert run_in_process(fomaml.main, args) == 0
    assert read_metrics(out) == rows and latest_step(out) == 6
    assert max_weight_diff(checkpoint_weights(out), weights) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_exits_0_and_resumes(recipe_inputs, straight_run, tmp_path, sig):
    """A real process signalled mid-run (after step 1 is logged) finishes its current step, saves a
    checkpoint at it although no save is due (save_freq=100), says so and exits 0; auto-resume then
    completes the run exactly like the uninterrupted one."""
    out, log_path = tmp_path / "run", tmp_path / "run.log"
    args = run_args(recipe_inputs, out, *RESUME_ARGS, "trainer.save_freq=100")
    proc, log = start_subprocess([sys.executable, str(FOMAML_SCRIPT), *args], log_path)
    try:
        wait_for(lambda: 1 in logged_steps(out), proc, log_path, "meta-step 1 to be logged")
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = log_path.read_text(encoding="utf-8", errors="replace")
    assert rc == 0, f"exit code {rc} after {sig.name}:\n{output[-4000:]}"
    stopped = latest_step(out)
    assert 1 <= stopped < 6, f"stopped at step {stopped}: the signal should have landed before the end"
    assert f"received {sig.name}: finishing the current step" in output
    assert f"stopped at step {stopped} on request; resume with the same command" in output
    assert not ckpt.checkpoint_problems(out, stopped)
    assert logged_steps(out)[-1] == stopped

    assert run_in_process(fomaml.main, args) == 0
    assert latest_step(out) == 6
    assert max_weight_diff(checkpoint_weights(out), checkpoint_weights(straight_run)) <= 1e-7
    assert_same_metrics(read_metrics(out), read_metrics(straight_run), rel=1e-7)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through Linux /proc")
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(recipe_inputs, fomaml_reference, tmp_path):
    """Preemption may signal any one process: the stop is agreed collectively, so both processes
    finish the same step, one checkpoint is saved and the launcher exits 0. The run then resumes on
    ONE process (another world size) and ends like the 1-process reference run."""
    out, log_path = tmp_path / "run", tmp_path / "run.log"
    args = run_args(recipe_inputs, out, "trainer.save_freq=100")
    proc, log = start_subprocess(torchrun(FOMAML_SCRIPT, args), log_path)
    try:
        wait_for(lambda: 1 in logged_steps(out), proc, log_path, "meta-step 1 to be logged")
        rank1 = worker_pid(proc.pid, rank=1)
        assert rank1 is not None, "worker with RANK=1 not found under the launcher"
        os.kill(rank1, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = log_path.read_text(encoding="utf-8", errors="replace")
    assert rc == 0, f"launcher exit code {rc}:\n{output[-4000:]}"
    stopped = latest_step(out)
    assert 1 <= stopped < 4, f"stopped at step {stopped}: the signal should have landed before the end"
    assert output.count(f"stopped at step {stopped} on request") == 2, "both processes should stop at that step"
    assert saved_world_size(out) == 2

    assert run_in_process(fomaml.main, args) == 0
    assert_processes_agree(fomaml_reference, out)


# The recipe killed by SIGKILL at the rename that would publish checkpoint step 4's directory: its .pt
# is already in place, its step_4/ directory is not, and `latest` still names step_2. (os.replace is
# the rename every atomic write uses, whatever helper wraps it.)
_SIGKILL_MID_SAVE = """
import os, signal, sys
import recipes.fomaml_math as fomaml
replace = os.replace
def replace_or_die(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(dst)) == "step_4":
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_or_die
sys.exit(fomaml.main(sys.argv[1:]))
"""

@pytest.mark.slow
def test_sigkill_mid_save_resumes_from_the_previous_checkpoint(recipe_inputs, straight_run, tmp_path):
    """SIGKILL in the middle of saving step 4 leaves step 2 committed; auto-resume takes step 2 (not the
    half-written step 4), cleans the leftovers, cuts metrics.jsonl back to step 2 and ends exactly
    like the uninterrupted run."""
    out = tmp_path / "run"
    args = run_args(recipe_inputs, out, *RESUME_ARGS)
    run_subprocess([sys.executable, "-c", _SIGKILL_MID_SAVE, *args], tmp_path / "run.log", expect_rc=-signal.SIGKILL)
    assert latest_step(out) == 2
    assert (out / "maml_checkpoint_step_4.pt").exists() and not (out / "step_4").exists()
    assert ckpt.checkpoint_problems(out, 4), "the half-saved step 4 should count as incomplete"

    assert run_in_process(fomaml.main, args) == 0  # auto-resume skips step 4 and takes step 2
    assert latest_step(out) == 6
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], "leftovers of the killed save remain"
    assert not ckpt.checkpoint_problems(out, 4)
    assert max_weight_diff(checkpoint_weights(out), checkpoint_weights(straight_run)) <= 1e-7
    assert_same_metrics(read_metrics(out), read_metrics(straight_run), rel=1e-7)


# -- non-finite steps ---------------------------------------------------------------------------------


def test_nonfinite_steps_are_skipped_counted_and_leave_the_weights(recipe_inputs, tmp_path, monkeypatch):
    """NaN logits in meta-steps 3 and 4 of 6: both updates are skipped (weights, Adam moments and the
    LR schedule untouched), counted in metrics.jsonl, and training continues (limit 3 in a row)."""
    poisoned = {"on": False}
    setup_model, train_step = fomaml.MetaTrainingRecipe.setup_model, fomaml.MetaTrainingRecipe.train_step

    def setup_model_with_nan_switch(self):
        setup_model(self)

        def nan_logits(module, args, output):
            if poisoned["on"]:
                output.logits = output.logits * float("nan")
            return output

        self.model.register_forward_hook(nan_logits)

    def poisoned_train_step(self, step):
        poisoned["on"] = step in (2, 3)  # 0-based: meta-steps 3 and 4
        try:
            return train_step(self, step)
        finally:
            poisoned["on"] = False

    monkeypatch.setattr(fomaml.MetaTrainingRecipe, "setup_model", setup_model_with_nan_switch)
    monkeypatch.setattr(fomaml.MetaTrainingRecipe, "train_step", poisoned_train_step)
    out = tmp_path / "run"
    args = run_args(recipe_inputs, out, "trainer.total_steps=6", "trainer.max_consecutive_nonfinite=3",
                    "trainer.max_ckpt_to_keep=null")
    assert run_in_process(fomaml.main, args) == 0

    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["meta/skipped_step"] for r in rows] == [0, 0, 1, 1, 0, 0]
    assert [r["meta/nonfinite_total"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(r["meta/loss"] != r["meta/loss"] for r in rows[2:4]), "meta/loss should be NaN when poisoned"
    assert rows[4]["meta/lr"] == rows[2]["meta/lr"], "the LR schedule advanced on a skipped step"
    assert max_weight_diff(checkpoint_weights(out, 4), checkpoint_weights(out, 2)) == 0.0
    opt2 = torch.load(out / "maml_checkpoint_step_2.pt", weights_only=True)["optimizer_state_dict"]
    opt4 = torch.load(out / "maml_checkpoint_step_4.pt", weights_only=True)["optimizer_state_dict"]
    for index, state in opt2["state"].items():
        for key, value in state.items():
            assert torch.equal(opt4["state"][index][key], value), f"Adam state {index}.{key} changed on a skipped step"
    assert max_weight_diff(checkpoint_weights(out, 6), checkpoint_weights(out, 4)) > 0, "training did not continue"
    assert all(torch.isfinite(w).all() for w in checkpoint_weights(out, 6).values())
    state = json.loads((out / "step_6" / "trainer_state.json").read_text())["trainer_state"]
    assert (state["nonfinite_total"], state["nonfinite_in_a_row"]) == (2, 0)


def test_too_many_nonfinite_steps_stop_with_a_clear_error(recipe_inputs, tmp_path, caplog):
    """meta.inner_lr=1e30 blows every adapted query loss up: each update is skipped, and the second
    in a row (the limit) stops the run with a FloatingPointError naming the limit and the run dir."""
    out = tmp_path / "run"
    args = run_args(recipe_inputs, out, "meta.inner_lr=1e30", "trainer.max_consecutive_nonfinite=2",
                    "trainer.save_freq=1")
    with pytest.raises(FloatingPointError) as err:
        run_in_process(fomaml.main, args)
    message = str(err.value)
    assert "2 consecutive steps had a non-finite loss or gradient" in message
    assert "trainer.max_consecutive_nonfinite=2" in message and str(out) in message
    assert "update skipped" in caplog.text
    rows = read_metrics(out)
    # The failing step is logged before the run stops, so metrics.jsonl shows why it stopped.
    assert [(r["step"], r["meta/skipped_step"], r["meta/nonfinite_total"]) for r in rows] == [(1, 1, 1), (2, 1, 2)]
    assert latest_step(out) == 1  # the failing step 2 saves nothing
    lora_b = {k: v for k, v in checkpoint_weights(out, 1).items() if "lora_B" in k}
    # LoRA B starts at 0 and any applied Adam step moves every coordinate by about the LR.
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b.values()), "a skipped update changed LoRA B"


# -- console ------------------------------------------------------------------------------------------


def test_console_shows_the_guide_line_format(recipe_inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, out, "trainer.logger=[console,jsonl]")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Step ")]
    rows = read_metrics(out)
    assert len(lines) == len(rows) == 4
    for line, row in zip(lines, rows):
        match = re.match(r"Step (\d+)/(\d+): meta/loss=(\S+) ", line)
        assert match, f"not the guide's format 'Step N/T: meta/loss=...': {line!r}"
        assert (int(match[1]), int(match[2])) == (row["step"], 4)
        assert float(match[3]) == pytest.approx(row["meta/loss"], abs=1e-4)
        # One short line: the headline metrics, no per-task ones (those are in metrics.jsonl).
        keys = re.findall(r" (\S+)=", line)
        assert keys == ["meta/loss", "meta/avg_adaptation_gap", "meta/grad_norm", "meta/inner_progress",
                        *(["eval/loss_pre", "eval/loss_post"] if "eval/loss_pre" in row else []), "tokens/s"]
        assert any(key.endswith("/support_loss") for key in row), "per-task metrics missing from metrics.jsonl"


# -- Meta-SGD ----------------------------------------------------------------------------------------------

META_SGD_ARGS = ("meta.learn_inner_lr=true", "meta.inner_lr_lr=0.05", "meta.num_inner_steps=2")


def saved_log_rates(run_dir: Path, step: int) -> dict[str, float]:
    return ckpt.load_checkpoint(ckpt.pt_path(run_dir, step))["trainer_state"]["log_inner_lrs"]


def test_meta_sgd_rates_are_learned_logged_resumed_and_loaded_for_evaluation(recipe_inputs, tmp_path, monkeypatch):
    """The learned inner rates move, are logged (mean/min/max), resume bitwise after a stop at step 2
    of 4, and come back through load_trained from the .pt and from the PEFT adapter directory."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, straight, *META_SGD_ARGS)) == 0
    with sigterm_during_step(monkeypatch, 1):
        assert run_in_process(fomaml.main, run_args(recipe_inputs, stopped, *META_SGD_ARGS)) == 0
    assert latest_step(stopped) == 2
    assert run_in_process(fomaml.main, run_args(recipe_inputs, stopped, *META_SGD_ARGS)) == 0
    assert max_weight_diff(checkpoint_weights(stopped), checkpoint_weights(straight)) == 0.0
    assert saved_log_rates(stopped, 4) == saved_log_rates(straight, 4)
    assert_same_metrics(read_metrics(stopped), read_metrics(straight))

    log_rates = saved_log_rates(straight, 4)
    initial = math.log(load_run_config(straight).meta.inner_lr)
    assert min(abs(v - initial) for v in log_rates.values()) > 1e-3  # every rate took Adam steps
    rows = read_metrics(straight)  # the rates each step's inner loops used (before its outer step)
    first, last = rows[0], rows[-1]
    assert first["meta/inner_lr_min"] == pytest.approx(first["meta/inner_lr_max"]) == pytest.approx(math.exp(initial))
    assert last["meta/inner_lr_min"] < last["meta/inner_lr_max"]
    rates = {name: math.exp(v) for name, v in log_rates.items()}

    from_pt = load_trained(straight)
    assert from_pt.inner_lrs == pytest.approx(rates, rel=1e-12)
    from_adapter = load_trained(straight / "step_4" / "adapter", base=str(recipe_inputs.model_dir))
    assert from_adapter.inner_lrs == pytest.approx(rates, rel=1e-12)
    assert load_trained(recipe_inputs.model_dir).inner_lrs is None


def test_resuming_a_plain_run_with_meta_sgd_is_refused(recipe_inputs, tmp_path):
    out = tmp_path / "run"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, out, "trainer.total_steps=2", "meta.num_inner_steps=2")) == 0
    with pytest.raises(ConfigError, match="meta.learn_inner_lr"):
        run_in_process(fomaml.main, run_args(recipe_inputs, out, "trainer.total_steps=4", *META_SGD_ARGS))
    sgd_run = tmp_path / "meta_sgd"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, sgd_run, "trainer.total_steps=2", *META_SGD_ARGS)) == 0
    with pytest.raises(ConfigError, match="meta.learn_inner_lr"):
        run_in_process(fomaml.main, run_args(recipe_inputs, sgd_run, "trainer.total_steps=4", "meta.num_inner_steps=2"))
