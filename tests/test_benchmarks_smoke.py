"""The benchmark scripts run end to end on CPU in seconds (timings are never asserted: only that the
tables print, the numbers are finite and the invariants between them hold). Every script in
benchmarks/ is run here (bench_generation.py, which needs vLLM, in tests/test_vllm_backend.py):
:func:`test_every_benchmark_script_is_run` fails when a new one is not."""

from __future__ import annotations

import importlib.util
import json
import math
import queue
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def qwen_bench():
    return _load("bench_qwen3_4b")


@pytest.fixture(scope="module")
def padding_bench():
    return _load("bench_padding")


def test_every_benchmark_script_is_run():
    # bench_generation needs vLLM: tests/test_vllm_backend.py runs it, in the environment CI builds for vLLM.
    here = "".join((REPO_ROOT / "tests" / name).read_text(encoding="utf-8")
                   for name in ("test_benchmarks_smoke.py", "test_vllm_backend.py"))
    scripts = sorted(p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py"))
    assert scripts, "no benchmark scripts found"
    unrun = [s for s in scripts if f'"{s}")' not in here and f"{s}.py" not in here]
    assert not unrun, f"benchmarks/{unrun} are run by no test: add a tiny-settings run here"


TINY = ["--tiny", "--tasks", "2", "--inner-steps", "1", "--warmup", "1", "--repeats", "1"]


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_qwen3_4b_tiny_prints_table_and_finite_numbers(qwen_bench, tmp_path, capsys):
    out = tmp_path / "results.json"
    # The chunked cross-entropy here; the OOM test below runs the full-logits loss.
    assert qwen_bench.main([*TINY, "--full", "--loss-chunk-size", "100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "meta/SFT" in text and "steps/h 4GPU" in text and "chunked cross-entropy, 100" in text
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"lora-fomaml", "lora-sft", "full-fomaml"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["loss_chunk_size"] == 100
        assert row["seq"] == 64
        # 2 tasks x (1 support + 1 query batch) x 4 sequences x 64 tokens, nothing padded
        assert row["tokens"] == 2 * 2 * 4 * 64
        assert _finite_positive(row["step_s"]) and _finite_positive(row["tokens_per_s"])
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_s"])
        assert row["mfu"] is None  # no peak FLOP/s on a CPU
    lora, full = rows["lora-fomaml"], rows["full-fomaml"]
    assert _finite_positive(lora["meta_over_sft"])
    assert lora["n_trainable"] > 0 and lora["n_frozen"] > lora["n_trainable"]
    assert full["n_frozen"] == 0 and full["n_trainable"] == lora["n_frozen"]
    # LoRA on a frozen base: 4 FLOPs per frozen, 6 per trained parameter; full: 6 per parameter.
    attention = full["flops_per_token"] - 6 * full["n_trainable"]
    assert lora["flops_per_token"] == pytest.approx(4 * lora["n_frozen"] + 6 * lora["n_trainable"] + attention)
    for row in (lora, full):
        assert row["meta_gradient_s"] + row["outer_step_s"] == pytest.approx(row["step_s"], rel=0.5)
        # 2 tasks on 4 GPUs: each GPU runs at most one task, so the projection beats one GPU running both
        assert row["projected_step_s"] < row["step_s"]
        assert row["meta_steps_per_hour_projected"] == pytest.approx(3600 / row["projected_step_s"])


def test_qwen3_4b_oom_in_one_measurement_spares_the_rest(qwen_bench, tmp_path, capsys, monkeypatch):
    def out_of_memory(self, tasks, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")

    build = qwen_bench.build_model

    def build_or_oom(args, adapter, attn):
        if adapter == "full":  # the full-parameter model does not even fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.50 GiB (simulated)")
        return build(args, adapter, attn)

    monkeypatch.setattr(qwen_bench.MetaLearner, "meta_gradient", out_of_memory)
    monkeypatch.setattr(qwen_bench, "build_model", build_or_oom)
    out = tmp_path / "results.json"
    assert qwen_bench.main([*TINY, "--full", "--seqs", "32,64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["seq"]) for r in rows] == [
        ("lora-fomaml", 32), ("lora-sft", 32), ("lora-fomaml", 64), ("lora-sft", 64),
        ("full-fomaml", 32), ("full-fomaml", 64),
    ]
    for row in rows:
        if row["config"] == "lora-sft":
            assert row["status"] == "ok" and _finite_positive(row["tokens_per_s"])
        else:
            assert row["status"] == "OOM" and "step_s" not in row
    assert text.count("OOM") >= 4


def test_guarded_classifies_failures(qwen_bench, capsys):
    assert qwen_bench.guarded(lambda: 7, "cpu") == ("ok", 7)

    def oom():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")

    assert qwen_bench.guarded(oom, "cpu") == ("OOM", None)

    def bug():
        raise KeyError("input_ids")

    status, value = qwen_bench.guarded(bug, "cpu")
    assert value is None and status.startswith("error: KeyError")
    assert "Traceback" in capsys.readouterr().err


def test_padding_on_synthetic_data(padding_bench, tmp_path, capsys):
    out = tmp_path / "padding.json"
    steps = 5
    argv = ["--source", "synthetic", "--synthetic-per-task", "20", "--steps", str(steps), "--out", str(out)]
    assert padding_bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "overall" in text and "packed token efficiency" in text
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    overall = rows[-1]
    assert overall["task"] == "overall"
    # every meta-step draws 4 tasks x (5 support + 1 query) batches
    assert overall["batches"] == steps * 4 * 6 == sum(r["batches"] for r in rows[:-1])
    for row in rows:
        assert row["packed_eff"] == 1.0  # a packed batch has no padding slot
        for key in ("padded_eff", "attn_padded_eff", "attn_packed_dense_eff", "mean_len"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["task"], key)
        assert row["padded_eff"] <= 1.0 and row["attn_padded_eff"] <= 1.0 and row["attn_packed_dense_eff"] <= 1.0
    # synthetic examples differ in length, so padding costs something somewhere
    assert overall["padded_eff"] < 1.0


def test_padding_skips_a_missing_source(padding_bench, tmp_path, capsys):
    assert padding_bench.main(["--source", str(tmp_path / "absent.tar.gz")]) == 0
    assert "skipped" in capsys.readouterr().out


TINY_META_STEP = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
                  "--vocab", "128", "--seq", "16", "--batch", "2", "--tasks", "2", "--inner-steps", "1",
                  "--lora-r", "2", "--warmup", "0", "--repeats", "1"]


def test_meta_step_tiny(tmp_path, capsys):
    bench = _load("bench_meta_step")
    out = tmp_path / "meta_step.json"
    assert bench.main([*TINY_META_STEP, "--skip-memory", "--out", str(out)]) == 0
    assert "functional inner step" in capsys.readouterr().out
    by_name = {r["name"]: r for r in json.loads(out.read_text())["timings"]}
    assert len(by_name) == 4
    for row in by_name.values():
        assert _finite_positive(row["seconds"]), row
    # one round: each ratio is its time over (forward+backward count) plain passes
    plain = by_name["plain peft forward+backward"]["seconds"]
    inner, meta = by_name["functional inner step"], by_name["meta-step, no query_loss_pre (/4 f+b)"]
    assert inner["ratio"] == pytest.approx(inner["seconds"] / plain)
    assert meta["ratio"] == pytest.approx(meta["seconds"] / (4 * plain))


def test_meta_step_memory_rows():
    """The memory workers, run here rather than in spawned processes (seconds of imports each)."""
    bench = _load("bench_meta_step")
    args = bench.parse_args(TINY_META_STEP)
    assert bench.MEMORY_ROWS == ("lora", "full", "full-fsdp")
    for adapter in bench.MEMORY_ROWS:
        results = queue.Queue()
        bench._memory_worker(args, adapter, results)
        before, peak, method, took = results.get_nowait()
        # in-process, ru_maxrss is the test process's peak: only the shape of the row is checked
        assert before > 0 and isinstance(peak, int) and "RSS" in method and _finite_positive(took), adapter


@pytest.fixture(scope="module")
def cpu_throughput_workdir(tmp_path_factory):
    """bench_cpu_throughput.py part (1) on the tiny config; its --workdir keeps the data and tiny model."""
    work = tmp_path_factory.mktemp("bench_cpu")
    out = work / "throughput.json"
    argv = ["--skip-multiprocess", "--warmup", "0", "--repeats", "1", "--workdir", str(work), "--out", str(out)]
    assert _load("bench_cpu_throughput").main(argv) == 0
    return work, json.loads(out.read_text())


def test_cpu_throughput_part_one(cpu_throughput_workdir, capsys):
    _, results = cpu_throughput_workdir
    t = results["throughput"]
    assert t["rounds"] == 1 and t["batches_per_step"] > 0
    for key in ("meta_tokens_per_s", "sft_tokens_per_s", "meta_pre_tokens_per_s", "ratio", "ratio_pre"):
        assert _finite_positive(float(t[key])), key
    # one round, the same tokens: the ratio of rates is the ratio of the two measured rates
    assert t["ratio"] == pytest.approx(t["meta_tokens_per_s"] / t["sft_tokens_per_s"])
    assert "multiprocess" not in results  # part (2), the torchrun runs, is left to the benchmark itself


def test_calibrate_inner_lr_on_the_tiny_model(cpu_throughput_workdir, tmp_path, capsys):
    """Synthetic problems written as a MATH jsonl (problem, solution, type, level), the tiny Qwen3."""
    from lora_maml.data.math import PROMPT_INSTRUCTION
    from lora_maml.data.synthetic import synthetic_records

    work, _ = cpu_throughput_workdir
    source = tmp_path / "math.jsonl"
    lines = [json.dumps({"problem": r["prompt"].removeprefix(PROMPT_INSTRUCTION).strip(), "solution": r["response"],
                         "type": r["subject"], "level": r["level"]}) for r in synthetic_records(12, seed=0)]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "calibration.json"
    argv = ["--model", str(work / "tiny_qwen3"), "--math", str(source), "--subjects", "algebra", "geometry",
            "--grid", "lora:adam:1e-3", "full:sgd:0,1e-1", "--shots", "2", "--test", "2", "--steps", "1",
            "--draws", "2", "--max-length", "160", "--output", str(out)]
    calibrate = _load("calibrate_inner_lr")
    assert calibrate.main(argv) == 0
    assert "| adapter |" in capsys.readouterr().out
    rows = {(r["adapter"], r["optimizer"], r["lr"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("lora", "adam", 1e-3), ("full", "sgd", 0.0), ("full", "sgd", 0.1)}
    # a zero rate leaves the weights, hence both losses, unchanged
    assert rows[("full", "sgd", 0.0)]["inner_progress"] == 0.0 and rows[("full", "sgd", 0.0)]["test_delta_nll"] == 0.0
    for row in rows.values():
        assert len(row["per_draw"]) == 4 and all(math.isfinite(v) for v in row["per_draw"])
    assert rows[("full", "sgd", 0.1)]["inner_progress"] > 0  # a real step on the shots lowers their loss


def test_qwen3_4b_memory_plan_tiny(qwen_bench, tmp_path, capsys):
    """The start-up memory estimate for the tiny architecture: every model-sized item is a quarter on
    4 FSDP processes, and the whole plan is smaller there."""
    out = tmp_path / "plan.json"
    config = REPO_ROOT / "recipes" / "configs" / "qwen3_4b_math_guide.yaml"
    assert qwen_bench.main(["--tiny", "--memory-plan", str(config), "--gpus", "4", "--out", str(out)]) == 0
    assert "memory estimate per process (4 processes, FSDP-sharded)" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    fsdp, one = plan["fsdp"], plan["one_process"]
    assert fsdp["world_size"] == 4 and one["world_size"] == 1
    for item in ("master weights", "AdamW moments (2)", "meta-gradient", "gradient of one step"):
        assert fsdp["items_gib"][item] == pytest.approx(one["items_gib"][item] / 4, rel=1e-3), item
    assert fsdp["items_gib"]["saved θ"] == fsdp["items_gib"]["master weights"]
    assert 0 < fsdp["total_gib"] < one["total_gib"]
    assert fsdp["total_gib"] == pytest.approx(sum(fsdp["items_gib"].values()))
