import json
import logging
import time

import numpy as np
import pytest
import torch

from lora_maml.config import TrainerConfig
from lora_maml.train import metrics as m


def _cfg(*loggers, total_steps=5000):
    return TrainerConfig(logger=list(loggers), total_steps=total_steps, project_name="p", experiment_name="e")


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metrics(step):
    return {"algebra/support_loss": 1.0 / step, "meta/loss": 2.0 / step, "meta/grad_norm": 0.5 * step}


# ---------------------------------------------------------------------------------------------
# jsonl


def test_jsonl_is_always_written_one_object_per_step(tmp_path):
    with m.MetricLogger(_cfg("console"), {}, tmp_path, is_main=True) as log:
        for step in (1, 2, 3):
            log.log(step, {**_metrics(step), "tokens": np.int64(100 * step), "lr": torch.tensor(3e-5)})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert list(rows[1]) == ["step", "meta/loss", "meta/grad_norm", "algebra/support_loss", "lr", "tokens"]
    assert rows[2]["tokens"] == 300 and rows[0]["lr"] == pytest.approx(3e-5)


def test_rejects_non_numbers(tmp_path):
    with m.MetricLogger(_cfg(), {}, tmp_path, is_main=True) as log:
        with pytest.raises(TypeError, match="'meta/loss'"):
            log.log(1, {"meta/loss": "high"})
        with pytest.raises(TypeError, match="'v'"):
            log.log(1, {"v": torch.ones(2)})


def test_resumed_file_equals_uninterrupted_one(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    with m.MetricLogger(_cfg(), {}, straight, is_main=True) as log:
        for step in range(1, 7):
            log.log(step, _metrics(step))

    log = m.MetricLogger(_cfg(), {}, resumed, is_main=True)
    for step in range(1, 5):
        log.log(step, _metrics(step))
    log.close()
    with open(resumed / "metrics.jsonl", "a") as f:  # killed in the middle of a write
        f.write('{"step": 5, "meta/lo')
    # The checkpoint was at step 2: steps 3-4 and the torn line are redone.
    with m.MetricLogger(_cfg(), {}, resumed, is_main=True, resume_step=2) as log:
        assert [r["step"] for r in _lines(resumed / "metrics.jsonl")] == [1, 2]
        for step in range(3, 7):
            log.log(step, _metrics(step))
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()

    # A fresh (non-resumed) run in the same directory starts an empty file.
    with m.MetricLogger(_cfg(), {}, resumed, is_main=True) as log:
        assert (resumed / "metrics.jsonl").read_text() == ""
        log.truncate_after(0)  # also callable directly


def test_non_main_process_logs_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with m.MetricLogger(_cfg("console", "wandb", "tensorboard"), {}, out, is_main=False) as log:
        log.log(1, _metrics(1))
        log.truncate_after(0)
    assert not out.exists()
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# console


CONSOLE_VALUES = {
    "geometry/query_loss": 1.1,
    "meta/loss": 0.81234,
    "algebra/support_loss": 0.9,
    "meta/avg_adaptation_gap": 0.05,
    "meta/grad_norm": 1.23456,
    "meta/inner_progress": 0.0123,
    "meta/lr": 3e-5,
    "meta/skipped_step": 0.0,
    "perf/tokens_per_s": 1234.56,
    "tokens": 12345,
    "meta/nonfinite": float("nan"),
}


def test_console_line_shows_the_headline_metrics_only(tmp_path, capsys):
    expected = (
        "Step 100/5000: meta/loss=0.8123 meta/avg_adaptation_gap=0.0500 meta/grad_norm=1.2346 "
        "meta/inner_progress=0.0123 tokens/s=1235"
    )
    assert m.format_console_line(100, 5000, CONSOLE_VALUES) == expected
    with m.MetricLogger(_cfg("console"), {}, tmp_path, is_main=True) as log:
        log.log(100, CONSOLE_VALUES)
    assert capsys.readouterr().out == expected + "\n"
    # The per-task metrics are in metrics.jsonl all the same.
    assert set(_lines(tmp_path / "metrics.jsonl")[0]) == {"step", *CONSOLE_VALUES}


def test_console_line_of_sft_eval_and_skipped_steps():
    sft = {"sft/loss": 0.5, "sft/grad_norm": 2.0, "sft/lr": 1e-4, "sft/tokens": 99, "sft/skipped_step": 1.0,
           "eval/loss_pre": 1.5, "eval/loss_post": 1.25, "eval/algebra/loss_pre": 1.5, "perf/tokens_per_s": 10.0}
    assert m.format_console_line(7, 8, sft) == (
        "Step 7/8: sft/loss=0.5000 sft/grad_norm=2.0000 eval/loss_pre=1.5000 eval/loss_post=1.2500 "
        "tokens/s=10 sft/skipped_step=1.0000"
    )


def test_console_metrics_all_prints_every_metric(tmp_path, capsys):
    expected = (
        "Step 100/5000: meta/loss=0.8123 meta/avg_adaptation_gap=0.0500 meta/grad_norm=1.2346 "
        "meta/inner_progress=0.0123 meta/lr=3.000e-05 meta/skipped_step=0.0000 meta/nonfinite=nan "
        "algebra/support_loss=0.9000 geometry/query_loss=1.1000 tokens/s=1235 tokens=12345"
    )
    assert m.format_console_line(100, 5000, CONSOLE_VALUES, "all") == expected
    cfg = _cfg("console")
    cfg.console_metrics = "all"
    with m.MetricLogger(cfg, {}, tmp_path, is_main=True) as log:
        log.log(100, CONSOLE_VALUES)
    assert capsys.readouterr().out == expected + "\n"


def test_console_not_listed_prints_nothing(tmp_path, capsys):
    with m.MetricLogger(_cfg("jsonl"), {}, tmp_path, is_main=True) as log:
        log.log(1, _metrics(1))
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# wandb


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert not m.wandb_credentials_available()


def _offline_run_dirs(out_dir, run_id):
    return sorted((out_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def test_wandb_without_credentials_logs_offline_and_resumes_the_same_run(
    tmp_path, no_wandb_credentials, caplog
):
    out = tmp_path / "run"
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="lora_maml.train.metrics"):
        log = m.MetricLogger(_cfg("wandb"), {"meta": {"inner_lr": 1e-4}}, out, is_main=True)
    init_s = time.perf_counter() - start
    assert init_s < 10, f"offline wandb.init took {init_s:.1f}s"
    assert "no credentials" in caplog.text
    assert log._wandb_run is not None and log._wandb_run.offline
    log.log(1, _metrics(1))
    log.close()
    run_id = (out / "wandb_run_id").read_text().strip()
    assert len(_offline_run_dirs(out, run_id)) == 1

    with m.MetricLogger(_cfg("wandb"), {}, out, is_main=True, resume_step=1) as log:
        assert log._wandb_run.id == run_id
        log.log(2, _metrics(2))
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert len(_offline_run_dirs(out, run_id)) == 2  # wandb sync uploads both into one run

    with m.MetricLogger(_cfg("wandb"), {}, out, is_main=True) as log:  # fresh run -> new id
        assert log._wandb_run.id != run_id


def test_wandb_init_failure_falls_back_and_never_raises(tmp_path, no_wandb_credentials, monkeypatch, caplog):
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # credentials "present": an online attempt is made
    real_init, modes = wandb.init, []

    def flaky_init(*args, mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("server unreachable")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", flaky_init)
    with caplog.at_level(logging.WARNING, logger="lora_maml.train.metrics"):
        with m.MetricLogger(_cfg("wandb"), {}, tmp_path / "a", is_main=True) as log:
            assert log._wandb_run.offline
            log.log(1, _metrics(1))
    assert modes == ["online", "offline"] and "wandb.init failed" in caplog.text

    def broken_init(*args, **kwargs):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", broken_init)
    with m.MetricLogger(_cfg("wandb", "jsonl"), {}, tmp_path / "b", is_main=True) as log:
        assert log._wandb_run is None
        log.log(1, _metrics(1))
    assert [r["step"] for r in _lines(tmp_path / "b" / "metrics.jsonl")] == [1]


# ---------------------------------------------------------------------------------------------
# tensorboard


def test_tensorboard_resume_purges_events_after_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with m.MetricLogger(_cfg("tensorboard"), {}, tmp_path, is_main=True) as log:
        for step in range(1, 5):
            log.log(step, {"meta/loss": float(step)})
    time.sleep(1.1)  # event file names carry a timestamp in seconds
    with m.MetricLogger(_cfg("tensorboard"), {}, tmp_path, is_main=True, resume_step=2) as log:
        for step in range(3, 5):
            log.log(step, {"meta/loss": 10.0 * step})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("meta/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


# ---------------------------------------------------------------------------------------------
# progress bar


def test_progress_bar_shows_rate_tokens_and_loss(capsys):
    bar = m.ProgressBar(10, initial=3)
    bar.update(1, tokens=1000, loss=0.5)
    bar.update(2, tokens=1000, loss=0.25)
    assert bar.tokens_per_s > 0
    bar.close()
    err = capsys.readouterr().err
    assert "6/10" in err and "meta-step/s" in err and "tok/s=" in err and "meta/loss=0.2500" in err

    hidden = m.ProgressBar(10, is_main=False)
    hidden.update(1, tokens=5, loss=1.0)
    hidden.close()
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# FLOPs and MFU


def test_flops_per_token_formulas():
    n, layers, width, seq = 4_000_000_000, 36, 4096, 2048
    attn = 12 * layers * width * seq
    assert m.flops_per_token(n, 0, layers, width, seq) == 4 * n + attn  # LoRA, adapters negligible
    assert m.flops_per_token(0, n, layers, width, seq) == 6 * n + attn  # full fine-tuning
    assert m.flops_per_token(n, 1000, layers, width, seq) == 4 * n + 6 * 1000 + attn
    assert m.flops_per_token(n, 1000, layers, width, seq, mode="forward") == 2 * (n + 1000) + attn / 3
    # nanoGPT's GPT-2 (124M) number: 6N + 12 L H Q T.
    assert m.flops_per_token(0, 124_000_000, 12, 768, 1024) == 6 * 124e6 + 12 * 12 * 768 * 1024
    with pytest.raises(ValueError, match="mode"):
        m.flops_per_token(n, 0, layers, width, seq, mode="lora")


def test_mfu_and_peak_flops(monkeypatch):
    fpt = m.flops_per_token(4e9, 3e7, 36, 4096, 2048)
    assert m.mfu(989e12 * 0.4 / fpt, fpt, 989e12) == pytest.approx(0.4)
    assert m.mfu(1000.0, fpt, None) is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert m.peak_flops() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert m.peak_flops("cpu") is None
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA A10G", None),
        ("Tesla V100-SXM2-16GB", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        assert m.peak_flops() == peak, name
