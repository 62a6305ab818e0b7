"""recipes/sft_math.py (the multi-task LoRA SFT baseline) end to end on a tiny Qwen3: the result does
not depend on the number of processes (plain or FSDP), ``sft.match_tokens_of`` matches the label
tokens the FOMAML run trained on, and ``lora-maml sft`` writes checkpoints that ``load_trained`` reads.
MetaICL (``sft.icl_max_shots``): k-shot examples in the tokenizer's format, only the final response
trained, the same label tokens as plain SFT, and a stopped run resumes exactly."""

from __future__ import annotations

import contextlib
import json
import os
import signal

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
from lora_maml.data.tokenize import IGNORE_INDEX, encode_example
from lora_maml.distributed import Dist
from recipes._config_args import config_from_args


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


# -- MetaICL (sft.icl_max_shots) -----------------------------------------------------------------------


@contextlib.contextmanager
def set_up(recipe_inputs, out, *extra):
    """An SFT recipe of :func:`run_args` + ``extra``, set up (data encoded, sampler built), then cleaned up."""
    recipe = sft.SFTRecipe(config_from_args(sft.build_parser().parse_args(run_args(recipe_inputs, out, *extra))))
    try:
        recipe.setup()
        yield recipe
    finally:
        recipe.cleanup()


def targets(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def test_plain_sft_batches_are_the_plain_examples(recipe_inputs, tmp_path):
    """sft.icl_max_shots=0 (the default) trains the plain examples, unchanged: each step's batches are the
    collated pre-encoded examples of the sampler's refs, and no MetaICL metric is logged."""
    with set_up(recipe_inputs, tmp_path / "plain", "sft.icl_max_shots=0") as recipe:
        for step in range(3):
            plain = [recipe.example(ref) for ref in recipe.sampler.sample(step)]
            metrics, batches = recipe.train_step(step)
            expected = [recipe.batch(plain[i : i + 2]) for i in range(0, len(plain), 2)]
            assert len(batches) == len(expected)
            for got, want in zip(batches, expected):
                assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
            assert metrics["sft/tokens"] == sum(sft.label_tokens(e) for e in plain)
            assert metrics["sft/context_tokens"] == sum(len(e["input_ids"]) for e in plain) - metrics["sft/tokens"]
            assert not any(key.startswith("sft/icl") for key in metrics)


def test_metaicl_examples_are_k_shot_prompts_of_the_task_with_only_the_final_response_trained(recipe_inputs, tmp_path):
    """sft.icl_max_shots=3: each example is encode_example(prompt, response, shots=...) of its sampler shots
    (solved problems of its own task, never itself) when they fit (j + 1) x data.max_length (j shots: the cap
    of an in-context example, as evaluation's); only the final response (+ EOS) is a target, exactly the plain
    example's targets; at a tight max_length the shots that do not fit are dropped (counted), never the
    example's own tokens."""
    for max_length, all_fit in ((600, True), (100, False)):
        with set_up(recipe_inputs, tmp_path / f"icl_{max_length}", "sft.icl_max_shots=3",
                    f"data.max_length={max_length}") as recipe:
            used_counts, dropped = [], 0
            for step in range(6):
                for ref, shots in zip(recipe.sampler.sample(step), recipe.sampler.shots(step)):
                    example, used = recipe.icl_example(ref, shots)
                    plain = recipe.example(ref)
                    assert ref not in shots and {task for task, _, _ in shots} <= {ref[0]}
                    assert targets(example) == targets(plain), "a shot is a target, or the response was cut"
                    assert example["input_ids"][-len(targets(plain)):] == targets(plain)
                    assert len(example["input_ids"]) <= (used + 1) * max_length
                    assert not example["truncated"] or example is plain  # cut only as plain SFT cuts it
                    if used == 0:
                        assert example is plain
                    else:
                        record = recipe.shot_records[ref[0]][ref[1]][ref[2]]
                        pairs = [(recipe.shot_records[t][p][i]["prompt"], recipe.shot_records[t][p][i]["response"])
                                 for t, p, i in shots[:used]]
                        assert example == encode_example(recipe.tokenizer, record["prompt"], record["response"],
                                                         shots=pairs, max_length=(used + 1) * max_length,
                                                         truncation="right")
                    if all_fit:
                        assert used == len(shots)
                    used_counts.append(used)
                    dropped += len(shots) - used
            assert max(used_counts) >= (3 if all_fit else 1) and min(used_counts) == 0
            assert (dropped == 0) == all_fit
            # A real step: its batches' only targets are the final responses, as many as plain SFT's.
            refs, shots = recipe.sampler.sample(0), recipe.sampler.shots(0)
            encoded = [recipe.icl_example(ref, s) for ref, s in zip(refs, shots)]
            metrics, batches = recipe.train_step(0)
            assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) == metrics["sft/tokens"]
            assert metrics["sft/tokens"] == sum(sft.label_tokens(recipe.example(ref)) for ref in refs)
            assert metrics["sft/context_tokens"] == sum(len(e["input_ids"]) for e, _ in encoded) - metrics["sft/tokens"]
            assert metrics["sft/icl_shots"] == pytest.approx(sum(used for _, used in encoded) / len(refs))
            assert metrics["sft/icl_shots_dropped"] == sum(map(len, shots)) - sum(used for _, used in encoded)


def test_metaicl_matches_the_label_tokens_of_fomaml_with_more_context(recipe_inputs, fomaml_reference, tmp_path):
    """sft.match_tokens_of with sft.icl_max_shots=3: the same steps and label tokens per step as plain SFT
    matched to the same FOMAML run (so it covers FOMAML's label tokens within its last batch), on more input
    tokens: the shots are context only."""
    fomaml_tokens = sum(r["meta/support_tokens"] + r["meta/query_tokens"] for r in read_metrics(fomaml_reference))
    fomaml_config = tmp_path / "fomaml.yaml"
    fomaml_config.write_text(yaml.safe_dump(
        torch.load(fomaml_reference / "maml_checkpoint_step_4.pt", weights_only=True)["config"]))
    runs = {}
    for shots in (0, 3):
        out = tmp_path / f"shots_{shots}"
        args = run_args(recipe_inputs, out, f"sft.match_tokens_of={fomaml_config}", f"sft.icl_max_shots={shots}")
        assert run_in_process(sft.main, args) == 0
        runs[shots] = read_metrics(out)
    plain, icl = runs[0], runs[3]
    tokens = [r["sft/tokens"] for r in icl]
    assert tokens == [r["sft/tokens"] for r in plain]
    assert sum(tokens) >= fomaml_tokens > sum(tokens[:-1])
    assert icl[-1]["train/label_tokens"] == sum(tokens)
    assert sum(r["sft/context_tokens"] for r in icl) > sum(r["sft/context_tokens"] for r in plain)
    assert max(r["sft/icl_shots"] for r in icl) > 0


def test_a_stopped_metaicl_run_resumes_like_an_uninterrupted_one(recipe_inputs, tmp_path, monkeypatch):
    """The shots are a pure function of (seed, step): stopped by SIGTERM during step 2 of 4 and resumed,
    the run ends with the weights (bitwise) and metrics of the uninterrupted run."""
    extra = ("sft.icl_max_shots=3", "model.lora.dropout=0.1", "trainer.save_freq=100")
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert run_in_process(sft.main, run_args(recipe_inputs, straight, *extra)) == 0
    train_step = sft.SFTRecipe.train_step

    def signalled_train_step(self, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, step)

    with monkeypatch.context() as patch:
        patch.setattr(sft.SFTRecipe, "train_step", signalled_train_step)
        assert run_in_process(sft.main, run_args(recipe_inputs, out, *extra)) == 0
    assert latest_step(out) == 2
    assert run_in_process(sft.main, run_args(recipe_inputs, out, *extra)) == 0
    assert latest_step(out) == latest_step(straight) == 4
    assert max_weight_diff(checkpoint_weights(out), checkpoint_weights(straight)) == 0.0
    assert_same_metrics(read_metrics(out), read_metrics(straight))
