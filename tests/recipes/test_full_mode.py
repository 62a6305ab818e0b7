"""Full-parameter FOMAML (meta.adapter=full): fp32 master weights whatever model.dtype, and FSDP2 with
every weight sharded (lora_maml/meta/sharded.py) giving the 1-process result on 2 processes:
meta-gradient, weights after a SIGTERM-stopped and resumed run, metrics and end-of-run outputs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from recipe_helpers import (
    FOMAML_SCRIPT,
    REPO_ROOT,
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
from safetensors.torch import load_file
from test_meta_gradients import INNER_LR, K, fp64_throughout, max_err, meta_cfg, random_tasks, reference, tiny_model

import recipes.fomaml_math as fomaml
from lora_maml.config import ConfigError
from lora_maml.export import merge_and_save
from lora_maml.load_trained import load_trained
from lora_maml.meta.algorithms import MetaLearner

FULL = ("meta.adapter=full",)
RUN_FP64 = Path(__file__).with_name("run_fp64.py")  # runs a recipe fp64 throughout
# The fp64 comparisons below run the tiny Qwen3 fp64 throughout (fp64_throughout, in every process; no
# fp32 op left: test_meta_gradients.Fp64Probe), so the two sides differ only in the order of fp64 sums
# (rows split over processes, per-process token weights, FSDP's reduce-scatter). Each such difference
# is a few units of fp64 roundoff (2^-53 ≈ 1.1e-16) of the values summed; through two layers, a few
# inner steps and three AdamW steps of these O(1) quantities a budget of 1e4 of them, 1e-12, is ample
# (measured: < 1e-15), while one fp32 rounding anywhere (2^-24 ≈ 6e-8, as transformers' fp32 RMSNorm
# gave on some CPUs: 2e-7) or a stale weight (0.3) is far above it.
EXACT = 1e-12


def checkpoint(run_dir: Path) -> dict:
    step = latest_step(run_dir)
    return torch.load(run_dir / f"maml_checkpoint_step_{step}.pt", map_location="cpu", weights_only=True)


# -- fp32 master weights ------------------------------------------------------------------------------


def test_bf16_full_run_keeps_its_small_updates(recipe_inputs, tmp_path):
    """One outer AdamW step of 1e-5 on a bf16 model changes every weight whose gradient is not ~0 (in
    bf16 storage, steps of 1e-5 on weights of ~1e-2 would round away); weights and Adam's moments are
    fp32; the inner loop moves the support loss as in an fp32 run, up to bf16 rounding."""
    step = ("meta.outer_lr=1e-5", "optim.lr_scheduler=constant", "optim.lr_warmup_steps_ratio=0",
            "trainer.total_steps=1", "trainer.save_freq=1", "trainer.test_freq=100", "meta.inner_lr=0.1")
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    assert run_in_process(fomaml.main, run_args(recipe_inputs, bf16, *FULL, *step, "model.dtype=bf16")) == 0
    assert run_in_process(fomaml.main, run_args(recipe_inputs, fp32, *FULL, *step, "model.dtype=fp32")) == 0

    saved = checkpoint(bf16)
    weights, state = saved["model_state_dict"], saved["optimizer_state_dict"]["state"]
    base = load_file(str(recipe_inputs.model_dir / "model.safetensors"))
    moved = with_gradient = 0
    for i, (name, w) in enumerate(weights.items()):
        assert w.dtype == torch.float32 and state[i]["exp_avg"].dtype == torch.float32, name
        start = base[name].to(torch.bfloat16).float()  # the model was loaded in bf16
        m = state[i]["exp_avg"]  # 0.1 g after one step
        assert torch.equal(w[m == 0], start[m == 0]), f"{name}: a weight without gradient moved"
        clear = m.abs() > 1e-6  # |g| > 1e-5: Adam's first step is lr · g / (|g| + eps) ≈ ±lr
        assert torch.all(w[clear] != start[clear]), f"{name}: {int((w[clear] == start[clear]).sum())} updates lost"
        moved += int(clear.sum())
        with_gradient += int((m != 0).sum())
    assert moved > 0.9 * with_gradient > 0

    (low,), (high,) = read_metrics(bf16), read_metrics(fp32)
    assert high["meta/inner_progress"] > 0.01  # the inner loop does something to compare
    assert low["meta/inner_progress"] == pytest.approx(high["meta/inner_progress"], rel=0.05)
    assert low["meta/loss"] == pytest.approx(high["meta/loss"], rel=1e-2)


# -- FSDP2: the meta-gradient -------------------------------------------------------------------------

_GRADIENT_WORKER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_meta_gradients import Fp64Probe, fp64_throughout, meta_cfg, random_tasks, tiny_model
from lora_maml.meta.algorithms import MetaLearner, TaskBatch
from lora_maml.meta.fast_weights import gradient_for
from lora_maml.meta.sharded import ShardedLoss
from lora_maml.distributed import full_tensor, shard_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# fp64 throughout, seeded: the same model on every process; activation checkpointing as in the guide
# config (each layer's recomputation re-gathers its shards inside the backward)
with fp64_throughout():
    model, _ = tiny_model("full", tie=True, checkpointing=True, attn="sdpa")
    shard_model(model, cpu_offload=False, reshard_after_forward=True)
    params = dict(model.named_parameters())
    share = lambda batch: {k: v[rank::world] for k, v in batch.items()}  # this process's rows of a batch
    tasks = [TaskBatch(t.name, [share(s) for s in t.support], share(t.query)) for t in random_tasks()]
    learner = MetaLearner(model, params, meta_cfg(), fn=ShardedLoss(model, params))
    with Fp64Probe() as probe:
        result = learner.meta_gradient(tasks)
grads = {n: full_tensor(gradient_for(p, g)) for (n, p), g in zip(params.items(), result.grads.values())}
after = {n: full_tensor(p) for n, p in params.items()}
if rank == 0:
    torch.save({"grads": grads, "metrics": result.metrics, "weights_after": after,
                "not_fp64": dict(probe.other)}, sys.argv[1])
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_meta_gradient_equals_one_process_and_inplace_sgd(tmp_path):
    """2 processes, every weight an FSDP2 shard, activation checkpointing on, each process holding one
    row of every batch (the padded row on one of them): the meta-gradient equals the 1-process functional
    one and the in-place SGD reference (tied embeddings included) at fp64 precision, nothing on the
    sharded path computes in another dtype, and θ's shards are restored after each task."""
    tests_dir = str(REPO_ROOT / "tests")
    script, out = tmp_path / "worker.py", tmp_path / "sharded.pt"
    script.write_text(_GRADIENT_WORKER, encoding="utf-8")
    run_subprocess(torchrun(script, [str(out), tests_dir]), tmp_path / "worker.log")
    sharded = torch.load(out, weights_only=True)
    assert not sharded["not_fp64"], f"the sharded path computed in another dtype than fp64: {sharded['not_fp64']}"

    with fp64_throughout():
        model, params = tiny_model("full", tie=True, attn="sdpa")
        tasks = random_tasks()
        single = MetaLearner(model, params, meta_cfg()).meta_gradient(tasks)
        ref = reference(model, list(params), tasks, K, INNER_LR)
        unadapted = reference(model, list(params), tasks, 0, INNER_LR)
    assert list(sharded["grads"]) == list(params)
    ours = list(sharded["grads"].values())
    assert max_err(ours, list(single.grads.values())) <= EXACT
    assert max_err(ours, ref) <= EXACT
    assert max_err(ours, unadapted) > 1e-3  # adaptation matters
    for key, value in single.metrics.items():
        assert sharded["metrics"][key] == pytest.approx(value, rel=EXACT, abs=EXACT), key
    assert all(torch.equal(sharded["weights_after"][n], p.detach()) for n, p in params.items())


# -- FSDP2: the recipe ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker processes through Linux /proc")
def test_fsdp_full_run_stops_resumes_and_matches_one_process(recipe_inputs, tmp_path):
    """torchrun, 2 processes, every weight sharded (fp64 throughout): SIGTERM to one process after meta-step 1
    saves and exits 0; the resumed run (sharded optimizer state restored from the consolidated
    checkpoint) ends with the weights and metrics of an uninterrupted 1-process run; its .pt
    (weights_only) and Hugging Face directory load, and merge, like the 1-process run's."""
    extra = (*FULL, "model.dtype=fp64", "trainer.total_steps=3", "trainer.save_freq=100")
    one, two = tmp_path / "one", tmp_path / "fsdp"
    with fp64_throughout():
        assert run_in_process(fomaml.main, run_args(recipe_inputs, one, *extra)) == 0

    args = [str(FOMAML_SCRIPT), *run_args(recipe_inputs, two, *extra, "model.fsdp_config.enabled=true")]
    log_path = tmp_path / "fsdp.log"
    proc, log = start_subprocess(torchrun(RUN_FP64, args), log_path)
    try:
        wait_for(lambda: 1 in logged_steps(two), proc, log_path, "meta-step 1 to be logged")
        os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert rc == 0, log_path.read_text(errors="replace")[-4000:]
    assert 1 <= latest_step(two) < 3
    run_subprocess(torchrun(RUN_FP64, args), tmp_path / "fsdp_resumed.log")
    assert "resumed from" in (tmp_path / "fsdp_resumed.log").read_text(errors="replace")

    assert latest_step(one) == latest_step(two) == 3
    assert max_weight_diff(checkpoint_weights(one), checkpoint_weights(two)) <= EXACT
    assert_same_metrics(read_metrics(one), read_metrics(two), rel=EXACT, abs_=EXACT)
    saved_one, saved_two = checkpoint(one)["optimizer_state_dict"], checkpoint(two)["optimizer_state_dict"]
    for i, s in saved_one["state"].items():  # consolidated: the 1-process layout
        assert (s["exp_avg_sq"] - saved_two["state"][i]["exp_avg_sq"]).abs().max() <= EXACT

    for source in (two / "maml_checkpoint_step_3.pt", two / "step_3" / "model"):
        loaded = load_trained(source)
        reference = load_trained(one / source.relative_to(two))
        assert max_weight_diff({n: p.detach() for n, p in loaded.params.items()},
                               {n: p.detach() for n, p in reference.params.items()}) <= EXACT
    report = merge_and_save(two / "maml_checkpoint_step_3.pt", tmp_path / "merged")
    assert report["adapter"] == "full" and report["max_abs_diff"] <= report["tolerance"]


# Diagnostics (no-grad losses at θ and φ_K) on every step and periodic evaluation after every step: the
# forwards without a backward after which FSDP2 leaves a unit gathered unless it reshards after forward.
DIAGNOSED = (*FULL, "model.dtype=fp64", "trainer.total_steps=2", "trainer.log_freq=1", "trainer.test_freq=1",
             "trainer.save_freq=100")


@pytest.fixture(scope="module")
def one_process_diagnosed(recipe_inputs, tmp_path_factory):
    """The functional reference of the reshard tests: 1 process, no FSDP, fp64 throughout."""
    out = tmp_path_factory.mktemp("one_process_diagnosed") / "run"
    with fp64_throughout():
        assert run_in_process(fomaml.main, run_args(recipe_inputs, out, *DIAGNOSED)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("reshard", ["true", "false", "null"])
def test_fsdp_full_reads_the_shards_whatever_reshard_after_forward(recipe_inputs, one_process_diagnosed, tmp_path,
                                                                   reshard):
    """torchrun, 1 process, every weight an FSDP2 shard, with model.fsdp_config.reshard_after_forward
    true, false and null (FSDP2's default: the root stays gathered after its forward): weights and
    metrics (diagnostics, periodic evaluation) equal the functional run's. A unit left gathered by a
    no-grad forward would make the next forward read the weights of then (the previous task's φ_K
    after θ was restored into the shards): a gradient error of ~0.3, not fp64 rounding."""
    run = tmp_path / "fsdp"
    args = run_args(recipe_inputs, run, *DIAGNOSED, "model.fsdp_config.enabled=true",
                    f"model.fsdp_config.reshard_after_forward={reshard}")
    run_subprocess(torchrun(RUN_FP64, [str(FOMAML_SCRIPT), *args], nproc=1), tmp_path / "fsdp.log")
    rows = read_metrics(run)
    assert {"meta/query_loss_pre", "meta/inner_progress", "eval/loss_post"} <= set(rows[0])
    diff = max_weight_diff(checkpoint_weights(one_process_diagnosed), checkpoint_weights(run))
    assert diff <= EXACT, f"reshard_after_forward={reshard}: the weights differ by {diff:.3g}"
    assert_same_metrics(read_metrics(one_process_diagnosed), rows, rel=EXACT, abs_=EXACT)


def test_fsdp_full_refuses_meta_sgd_and_uneven_batches(recipe_inputs, tmp_path, monkeypatch):
    """Refused up front, naming the keys: Meta-SGD (and MAML, refused for full mode by the config), and
    batches that 2 processes cannot share evenly (a process without examples would hang)."""
    from test_fomaml_recipe import _init_as_rank_0_of_2

    monkeypatch.setattr(fomaml.Trainer, "__init__", _init_as_rank_0_of_2(fomaml.Trainer.__init__))
    base = (*FULL, "model.fsdp_config.enabled=true")
    with pytest.raises(ConfigError, match=r"meta\.learn_inner_lr=True are not supported"):
        fomaml.main(run_args(recipe_inputs, tmp_path / "a", *base, "meta.learn_inner_lr=true"))
    with pytest.raises(ConfigError, match=r"meta\.query_batch_size = 3 must be a multiple of the number of processes"):
        fomaml.main(run_args(recipe_inputs, tmp_path / "b", *base, "meta.query_batch_size=3"))
