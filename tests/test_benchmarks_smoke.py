"""The benchmark scripts run end to end on CPU in seconds (timings are never asserted: only that the
tables print, the numbers are finite and the invariants between them hold)."""

from __future__ import annotations

import importlib.util
import json
import math
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
