import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_maml.config import TrainerConfig
from lora_maml import checkpoint as ck

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write_fake_adapter(d: Path) -> None:
    from safetensors.torch import save_file

    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(2)}, str(d / "adapter_model.safetensors"))


def _save(out_dir, step, max_to_keep=None, **overrides):
    kwargs = dict(
        model_state_dict={"w": torch.full((4,), float(step))},
        optimizer_state_dict={"state": {}, "param_groups": []},
        config={"trainer": {"seed": 1}},
        trainer_state={"consecutive_nonfinite": 0, "step_seen": step},
        rng_states=[ck.capture_rng_state()],
        save_pretrained=_write_fake_adapter,
        max_to_keep=max_to_keep,
    )
    kwargs.update(overrides)
    return ck.save_checkpoint(out_dir, step, **kwargs)


def _auto(out_dir) -> TrainerConfig:
    return TrainerConfig(default_local_dir=str(out_dir), resume_mode="auto")


def _leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if ".tmp-" in p.name)


# ---------------------------------------------------------------------------------------------
# Round trip with a real PEFT adapter


def _tiny_base():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)  # same seed -> same base weights every call
    return Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
        )
    )


def _tiny_lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(_tiny_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def _train_step(model, optimizer, scheduler, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (2, 12), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _make_opt(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def test_round_trip_peft_adapter_optimizer_and_trainer_state(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    model = _tiny_lora_model()
    opt, sched = _make_opt(model)
    _train_step(model, opt, sched, seed=1)
    adapter_sd = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    sampler_gen = torch.Generator().manual_seed(7)
    trainer_state = {
        "scheduler": sched.state_dict(),
        "sampler": {"epoch": 3, "generator": sampler_gen.get_state()},
        "metrics_history": [{"step": 1, "meta/loss": 1.5}, {"step": 2, "meta/loss": float("nan")}],
        "consecutive_nonfinite": 1,
    }
    pt = ck.save_checkpoint(
        tmp_path, 1,
        model_state_dict=get_peft_model_state_dict(model),
        optimizer_state_dict=opt.state_dict(),
        config={"meta": {"inner_lr": 1e-4}, "optim": {"betas": [0.9, 0.95]}},
        trainer_state=trainer_state,
        rng_states=[ck.capture_rng_state(), ck.capture_rng_state()],
        save_pretrained=lambda d: model.save_pretrained(d, safe_serialization=True),
        max_to_keep=3,
    )
    assert pt == tmp_path / "maml_checkpoint_step_1.pt"
    assert (tmp_path / "latest").read_text().strip() == "step_1"

    # The .pt is the guide's format and loads with the safe unpickler on its own.
    raw = torch.load(pt, weights_only=True)
    assert set(raw) == {"step", "model_state_dict", "optimizer_state_dict", "config"}
    assert raw["step"] == 1 and raw["config"]["meta"]["inner_lr"] == 1e-4
    assert set(raw["model_state_dict"]) == set(adapter_sd)
    for k, v in adapter_sd.items():
        assert raw["model_state_dict"][k].device.type == "cpu"
        torch.testing.assert_close(raw["model_state_dict"][k], v, rtol=0, atol=0)

    # The PEFT export loads with PeftModel.from_pretrained onto an identical base.
    reloaded = PeftModel.from_pretrained(_tiny_base(), tmp_path / "step_1" / "adapter")
    for k, v in get_peft_model_state_dict(reloaded).items():
        torch.testing.assert_close(v, adapter_sd[k], rtol=0, atol=0)

    ckpt = ck.load_checkpoint(tmp_path / "step_1")
    assert ckpt["path"] == pt and ckpt["pretrained_dir"] == tmp_path / "step_1" / "adapter"
    ts = ckpt["trainer_state"]
    assert ts["sampler"]["epoch"] == 3 and ts["consecutive_nonfinite"] == 1
    assert torch.equal(ts["sampler"]["generator"], sampler_gen.get_state())
    assert ts["metrics_history"][0] == {"step": 1, "meta/loss": 1.5}
    assert np.isnan(ts["metrics_history"][1]["meta/loss"])
    assert len(ckpt["rng_states"]) == 2

    # Resuming gives the same next step as continuing: weights, AdamW moments and LR schedule.
    _train_step(model, opt, sched, seed=2)
    expected = get_peft_model_state_dict(model)

    resumed = _tiny_lora_model()
    set_peft_model_state_dict(resumed, ckpt["model_state_dict"])
    opt2, sched2 = _make_opt(resumed)
    opt2.load_state_dict(ckpt["optimizer_state_dict"])
    sched2.load_state_dict(ts["scheduler"])
    _train_step(resumed, opt2, sched2, seed=2)
    for k, v in get_peft_model_state_dict(resumed).items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_full_parameter_export_goes_to_model_dir(tmp_path):
    from safetensors.torch import save_file

    def export(d: Path) -> None:
        d.mkdir()
        (d / "config.json").write_text("{}")
        save_file({"w": torch.ones(2)}, str(d / "model.safetensors"))

    _save(tmp_path, 3, save_pretrained=export, pretrained_kind="model")
    ckpt = ck.load_checkpoint(tmp_path / "maml_checkpoint_step_3.pt")
    assert ckpt["pretrained_dir"] == tmp_path / "step_3" / "model"
    assert (ckpt["pretrained_dir"] / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# RNG


def _draws():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_round_trip_gives_identical_draws_even_through_json_and_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    # Leave a cached Gaussian in python's and numpy's generators: it is part of the state.
    random.gauss(0, 1)
    np.random.standard_normal()
    state = ck.capture_rng_state()
    expected = _draws()
    ck.restore_rng_state(json.loads(json.dumps(state)))
    assert _draws() == expected

    _save(tmp_path, 1, rng_states=[state])
    torch.manual_seed(999)
    random.seed(999)
    np.random.seed(999)
    ck.restore_rng_state(ck.load_checkpoint(tmp_path / "step_1")["rng_states"][0])
    assert _draws() == expected


def test_gather_rng_states_without_distributed_is_one_entry():
    states = ck.gather_rng_states()
    assert len(states) == 1 and set(states[0]) >= {"python", "numpy", "torch_cpu"}


# ---------------------------------------------------------------------------------------------
# latest, pruning, fallback


def test_pruning_keeps_newest_complete_and_never_later_steps(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step * 10, max_to_keep=2)
    assert ck.complete_steps(tmp_path) == [40, 50]
    assert not (tmp_path / "step_10").exists() and not (tmp_path / "maml_checkpoint_step_30.pt").exists()

    # A run resumed from an older checkpoint saves step 20 again: later steps (another timeline)
    # stay, pruning counts only steps <= 20, and latest follows the new save.
    _save(tmp_path, 20, max_to_keep=1)
    assert ck.complete_steps(tmp_path) == [20, 40, 50]
    assert ck.read_latest(tmp_path) == 20
    assert ck.find_resume_checkpoint(_auto(tmp_path)) == tmp_path / "maml_checkpoint_step_20.pt"


def test_max_to_keep_none_keeps_all_and_incomplete_older_steps_are_pruned(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert ck.complete_steps(tmp_path) == [1, 2, 3]
    (tmp_path / "maml_checkpoint_step_2.pt").unlink()  # step 2 now incomplete
    _save(tmp_path, 4, max_to_keep=2)
    assert ck.complete_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest", "maml_checkpoint_step_3.pt", "maml_checkpoint_step_4.pt", "step_3", "step_4",
    ]


def test_latest_rules(tmp_path):
    assert ck.find_resume_checkpoint(_auto(tmp_path / "missing")) is None
    for step in (1, 2, 3):
        _save(tmp_path, step)
    # Step 3 complete but never committed (latest not yet updated) -> latest wins.
    (tmp_path / "latest").write_text("step_2\n")
    assert ck.find_resume_checkpoint(_auto(tmp_path)) == tmp_path / "maml_checkpoint_step_2.pt"
    # No readable latest -> the newest complete checkpoint.
    (tmp_path / "latest").write_text("garbage")
    assert ck.find_resume_checkpoint(_auto(tmp_path)) == tmp_path / "maml_checkpoint_step_3.pt"
    (tmp_path / "latest").unlink()
    assert ck.find_resume_checkpoint(_auto(tmp_path)) == tmp_path / "maml_checkpoint_step_3.pt"
    assert ck.find_resume_checkpoint(TrainerConfig(default_local_dir=str(tmp_path), resume_mode="disable")) is None


def test_a_bad_latest_never_hides_complete_checkpoints(tmp_path, caplog):
    """latest naming a missing or incomplete step is not trusted: the newest complete checkpoint is
    resumed, with a warning naming the pointer, so a run never restarts from scratch over them."""
    _save(tmp_path, 2)
    _save(tmp_path, 4)
    (tmp_path / "latest").write_text("step_1\n")  # no such checkpoint
    assert ck.find_resume_checkpoint(_auto(tmp_path)) == tmp_path / "maml_checkpoint_step_4.pt"
    assert f"{tmp_path}/latest names step_1, which is not a complete checkpoint" in caplog.text
    caplog.clear()
    (tmp_path / "latest").write_text("step_3\n")
    (tmp_path / "step_3").mkdir()  # an incomplete step between two complete ones
    assert ck.find_resume_checkpoint(_auto(tmp_path)) == tmp_path / "maml_checkpoint_step_4.pt"
    assert "latest names step_3" in caplog.text and "resuming from the newest complete checkpoint, step 4" in caplog.text


def test_non_finite_weights_are_never_saved(tmp_path):
    _save(tmp_path, 1)
    before = sorted(p.name for p in tmp_path.iterdir())
    weights = torch.tensor([1.0, float("nan"), 0.0, float("inf")])
    with pytest.raises(ck.CheckpointError, match=r"maml_checkpoint_step_2\.pt: refusing to save non-finite weights.*'w'"):
        _save(tmp_path, 2, model_state_dict={"w": weights})
    assert sorted(p.name for p in tmp_path.iterdir()) == before and ck.read_latest(tmp_path) == 1


@pytest.mark.parametrize("damage", ["truncate_pt", "drop_adapter", "garble_state", "drop_manifest", "drop_pt"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    pt2, dir2 = tmp_path / "maml_checkpoint_step_2.pt", tmp_path / "step_2"
    if damage == "truncate_pt":
        pt2.write_bytes(pt2.read_bytes()[:100])
    elif damage == "drop_adapter":
        (dir2 / "adapter" / "adapter_model.safetensors").unlink()
    elif damage == "garble_state":
        text = (dir2 / "trainer_state.json").read_text()
        (dir2 / "trainer_state.json").write_text("#" * len(text))
    elif damage == "drop_manifest":
        (dir2 / "checkpoint_manifest.json").unlink()
    else:
        pt2.unlink()
    found = ck.find_resume_checkpoint(_auto(tmp_path))
    assert found == tmp_path / "maml_checkpoint_step_1.pt"
    assert ck.load_checkpoint(found)["model_state_dict"]["w"].tolist() == [1.0] * 4
    with pytest.raises(ck.CheckpointError, match="step 2"):
        ck.load_checkpoint(dir2)


def test_damaged_bytes_of_same_size_fail_loading_with_the_file_named(tmp_path):
    _save(tmp_path, 1)
    pt = tmp_path / "maml_checkpoint_step_1.pt"
    data = bytearray(pt.read_bytes())
    data[:64] = b"\0" * 64
    pt.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match=str(pt)):
        ck.load_checkpoint(pt)


def test_no_complete_checkpoint_starts_fresh(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "maml_checkpoint_step_1.pt").unlink()
    assert ck.find_resume_checkpoint(_auto(tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# Failed saves leave nothing behind and never touch the previous checkpoint


def test_payload_that_would_not_load_safely_is_rejected_before_publishing(tmp_path):
    _save(tmp_path, 1)

    class Local:  # cannot even be pickled
        pass

    with pytest.raises(ck.CheckpointError, match="weights_only"):
        _save(tmp_path, 2, config={"x": Fraction(1, 3)})  # picklable, but not weights_only-safe
    with pytest.raises(ck.CheckpointError, match="weights_only"):
        _save(tmp_path, 2, config={"x": Local()})
    with pytest.raises(ck.CheckpointError, match=r"trainer_state\.sampler: key 3"):
        _save(tmp_path, 2, trainer_state={"sampler": {3: "x"}})
    with pytest.raises(ck.CheckpointError, match="adapter_model.safetensors"):
        _save(tmp_path, 2, save_pretrained=lambda d: d.mkdir())
    assert ck.complete_steps(tmp_path) == [1] and ck.read_latest(tmp_path) == 1
    assert _leftovers(tmp_path) == [] and not (tmp_path / "step_2").exists()


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 1, model_state_dict={"w": torch.zeros(4)})
    assert ck.load_checkpoint(tmp_path / "step_1")["model_state_dict"]["w"].tolist() == [0.0] * 4
    assert _leftovers(tmp_path) == []


def test_the_sweep_removes_only_temporaries_of_dead_processes(tmp_path):
    """A save sweeps what killed saves left (their pid no longer runs); a live process's temporaries are its
    save under way and stay."""
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / f"step_3.tmp-{live.pid}").mkdir()
        (tmp_path / f"maml_checkpoint_step_3.pt.tmp-{live.pid}").write_bytes(b"x")
        (tmp_path / f"step_2.tmp-{gone}").mkdir()
        (tmp_path / f"step_1.tmp-{gone}-old").mkdir()
        (tmp_path / f"maml_checkpoint_step_2.pt.tmp-{gone}").write_bytes(b"x")
        _save(tmp_path, 1)
        assert _leftovers(tmp_path) == sorted([f"maml_checkpoint_step_3.pt.tmp-{live.pid}", f"step_3.tmp-{live.pid}"])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_a_checkpoint_is_published_with_the_umasks_modes(tmp_path, umask):
    """Every file of a checkpoint, the PEFT adapter's safetensors (which safetensors writes 0600) and the
    trainer's tensors included, gets the mode a plain create gets under the umask; directories too."""
    model = _tiny_lora_model()
    previous = os.umask(umask)
    try:
        _save(tmp_path, 1, save_pretrained=lambda d: model.save_pretrained(d, safe_serialization=True),
              trainer_state={"tensor": torch.zeros(2)})
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert {"step_1/adapter/adapter_model.safetensors", "step_1/trainer_state.safetensors"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask}
    assert not wrong, f"umask {umask:03o}: {wrong}"


def test_remove_checkpoints_deletes_every_checkpoint_and_nothing_else(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "maml_checkpoint_step_3.pt").write_bytes(b"incomplete")
    (tmp_path / "metrics.jsonl").write_text("")
    assert [p.name for p in ck.checkpoint_entries(tmp_path)] == [
        "latest", "maml_checkpoint_step_1.pt", "step_1", "maml_checkpoint_step_2.pt", "step_2", "maml_checkpoint_step_3.pt"]
    ck.remove_checkpoints(tmp_path)
    assert ck.checkpoint_entries(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------------------------------------
# resume_mode=path


def test_resume_mode_path(tmp_path):
    _save(tmp_path, 5)
    cfg = lambda p: TrainerConfig(resume_mode="path", resume_from_path=str(p))  # noqa: E731
    pt = tmp_path / "maml_checkpoint_step_5.pt"
    assert ck.find_resume_checkpoint(cfg(pt)) == pt
    assert ck.find_resume_checkpoint(cfg(tmp_path / "step_5")) == pt

    with pytest.raises(ck.CheckpointError, match=r"resume_from_path=.*no such file"):
        ck.find_resume_checkpoint(cfg(tmp_path / "maml_checkpoint_step_6.pt"))
    (tmp_path / "other.pt").write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="expected a maml_checkpoint_step_N.pt"):
        ck.find_resume_checkpoint(cfg(tmp_path / "other.pt"))
    (tmp_path / "step_5" / "trainer_state.json").unlink()
    with pytest.raises(ck.CheckpointError, match="incomplete.*trainer_state.json is missing"):
        ck.find_resume_checkpoint(cfg(pt))


# ---------------------------------------------------------------------------------------------
# SIGKILL in the middle of a save

_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from lora_maml import checkpoint as ck
    from safetensors.torch import save_file

    out, point, ready = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def export(d):
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        save_file({"x": torch.zeros(2)}, str(d / "adapter_model.safetensors"))

    def hang():
        ready.write_text("ready")
        time.sleep(600)

    def save(step, exporter):
        ck.save_checkpoint(
            out, step, model_state_dict={"w": torch.full((4,), float(step))},
            optimizer_state_dict={"state": {}, "param_groups": []}, config={},
            trainer_state={}, rng_states=[ck.capture_rng_state()], save_pretrained=exporter,
            max_to_keep=2,
        )

    save(1, export)
    if point == "during_export":
        save(2, lambda d: (export(d), hang()))
    else:
        publish = ck._publish
        def publish_then_hang(tmp, final):
            publish(tmp, final)
            if (point, final.name) in {("after_pt", "maml_checkpoint_step_2.pt"), ("after_dir", "step_2")}:
                hang()
        ck._publish = publish_then_hang
        save(2, export)
    """
)


@pytest.mark.parametrize("point", ["during_export", "after_pt", "after_dir"])
def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path, point):
    out, ready = tmp_path / "run", tmp_path / "ready"
    script = tmp_path / "kill_me.py"
    script.write_text(_KILL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), point, str(ready)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"save subprocess exited early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("save subprocess never reached the kill point")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    assert ck.read_latest(out) == 1
    found = ck.find_resume_checkpoint(_auto(out))
    assert found == out / "maml_checkpoint_step_1.pt"
    assert ck.load_checkpoint(found)["model_state_dict"]["w"].tolist() == [1.0] * 4
    if point != "after_dir":
        assert ck.checkpoint_problems(out, 2)  # step 2 is visibly incomplete

    # The next save cleans the killed save's leftovers and commits normally.
    _save(out, 2, max_to_keep=2)
    assert _leftovers(out) == []
    assert ck.find_resume_checkpoint(_auto(out)) == out / "maml_checkpoint_step_2.pt"
    assert ck.complete_steps(out) == [1, 2]
