"""recipes/sft_math.py (the multi-task LoRA SFT baseline) end to end on a tiny Qwen3: the result does
not depend on the number of processes (plain or FSDP), ``sft.match_tokens_of`` matches the label
tokens the FOMAML run trained on, and ``lora-maml sft`` writes checkpoints that ``load_trained`` reads."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from recipe_helpers import (
    SFT_SCRIPT,
    assert_same_metrics,
    checkpoint_weights,
    latest_step,
    max_weight_diff,
    read_metrics,
    run_args,
    run_in_process,
    run_subprocess,
    torchrun,
)

import recipes.sft_math as sft
from lora_maml.cli import main as cli_main
from lora_maml.config import ConfigError
from lora_maml.load_trained import load_trained
from lora_maml.distributed import Dist


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ("sft.batch_size=5",),  # micro-batches of 2, 2, 1 examples: 2 + 1 per process
        # FSDP needs as many micro-batches on every process: 2, 2, 2, 1 examples: 2 + 2; with
        # activation checkpointing as in the 4B config
        ("sft.batch_size=7", "model.enable_gradient_checkpointing=true", "model.fsdp_config.enabled=true"),
    ],
    ids=["plain", "fsdp"],
)
def test_two_processes_match_one(recipe_inputs, tmp_path, extra):
    """The loss is normalised by the global label-token count, so summing the processes' gradients
    gives the 1-process gradient: same weights and same logged sft/* metrics."""
    one, two = tmp_path / "one", tmp_path / "two"
    one_process_extra = tuple(e for e in extra if not e.startswith("model.fsdp_config"))
    assert run_in_process(sft.main, run_args(recipe_inputs, one, *one_process_extra)) == 0
    run_subprocess(torchrun(SFT_SCRIPT, run_args(recipe_inputs, two, *extra)), tmp_path / "two.log")
    state = json.loads((two / "step_4" / "trainer_state.json").read_text())
    assert state["trainer_state"]["world_size"] == 2 and state["trainer_state"]["kind"] == "sft"
    assert latest_step(one) == latest_step(two) == 4
    diff = max_weight_diff(checkpoint_weights(one), checkpoint_weights(two))
    assert diff <= 1e-6, f"final LoRA weights differ by {diff:.3e}"
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in rows_one] == [1, 2, 3, 4]
    assert "eval/loss_post" in rows_two[1]
    assert_same_metrics(rows_one, rows_two, rel=1e-6, abs_=1e-6)


def test_match_tokens_of_trains_as_many_label_tokens_as_fomaml(recipe_inputs, fomaml_reference, tmp_path):
    """``sft.match_tokens_of=<FOMAML config>``: the SFT run's batches hold at least the label tokens
    the FOMAML run trained on (every inner-step support batch and query batch, as that run logged
    them) and fewer than that plus its last batch. ``lora-maml sft`` runs it, and every checkpoint
    loads with ``load_trained``."""
    fomaml_rows = read_metrics(fomaml_reference)
    assert [r["step"] for r in fomaml_rows] == [1, 2, 3, 4]
    fomaml_tokens = sum(r["meta/support_tokens"] + r["meta/query_tokens"] for r in fomaml_rows)
    fomaml_config = tmp_path / "fomaml.yaml"
    saved = torch.load(fomaml_reference / "maml_checkpoint_step_4.pt", weights_only=True)["config"]
    fomaml_config.write_text(yaml.safe_dump(saved))

    out = tmp_path / "sft"
    args = run_args(recipe_inputs, out, f"sft.match_tokens_of={fomaml_config}", "trainer.save_freq=3",
                    "trainer.max_ckpt_to_keep=null")
    assert run_in_process(cli_main, ["sft", *args]) == 0

    rows = read_metrics(out)
    steps = len(rows)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    tokens = [r["sft/tokens"] for r in rows]
    assert sum(tokens) >= fomaml_tokens > sum(tokens[:-1]), (
        f"SFT label tokens per step {tokens} do not just cover FOMAML's {fomaml_tokens}"
    )
    assert latest_step(out) == steps
    state = json.loads((out / f"step_{steps}" / "trainer_state.json").read_text())["trainer_state"]
    assert state["total_steps"] == steps

    saved_steps = sorted(int(p.name.removeprefix("step_")) for p in out.glob("step_*"))
    assert saved_steps == sorted({*range(3, steps + 1, 3), steps})
    for step in saved_steps:
        trained = load_trained(out / f"maml_checkpoint_step_{step}.pt")
        assert trained.kind == "checkpoint" and trained.step == step and trained.config.sft.match_tokens_of
        weights = checkpoint_weights(out, step)
        assert set(trained.params) == set(weights)
        for name, value in weights.items():
            assert torch.equal(trained.params[name].detach().cpu(), value), f"step {step}: {name} differs"
    assert load_trained(out).step == steps  # a run directory loads its newest checkpoint

    # The FOMAML run's checkpoint names the same run: the same matched schedule and result.
    again = tmp_path / "sft_from_pt"
    pt = fomaml_reference / "maml_checkpoint_step_4.pt"
    assert run_in_process(sft.main, run_args(recipe_inputs, again, f"sft.match_tokens_of={pt}")) == 0
    assert [r["sft/tokens"] for r in read_metrics(again)] == tokens
    assert max_weight_diff(checkpoint_weights(again), checkpoint_weights(out)) == 0.0


def test_match_tokens_of_refuses_a_run_on_other_data(recipe_inputs, fomaml_reference, tmp_path):
    """Tokens are counted on this run's data: a FOMAML run with another data section is refused."""
    saved = torch.load(fomaml_reference / "maml_checkpoint_step_4.pt", weights_only=True)["config"]
    saved["data"]["max_length"] = 128
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(saved))
    with pytest.raises(ValueError, match="its data section differs"):
        run_in_process(sft.main, run_args(recipe_inputs, tmp_path / "sft", f"sft.match_tokens_of={other}"))


def test_fsdp_refuses_an_uneven_share_of_micro_batches(recipe_inputs, tmp_path, monkeypatch):
    """Under FSDP every process must run as many forwards: 5 examples in micro-batches of 2 make 3
    micro-batches, which 2 processes cannot share evenly; refused up front, naming the keys."""
    init = sft.Trainer.__init__

    def init_as_rank_0_of_2(self, cfg):
        init(self, cfg)
        self.dist = Dist(rank=0, world_size=2, device=torch.device("cpu"))

    monkeypatch.setattr(sft.Trainer, "__init__", init_as_rank_0_of_2)
    args = run_args(recipe_inputs, tmp_path / "run", "model.fsdp_config.enabled=true", "sft.batch_size=5")
    with pytest.raises(ConfigError, match=r"sft\.batch_size=5 / sft\.micro_batch_size=2, rounded up\) = 3 must be a multiple"):
        sft.main(args)
