"""Helpers of the recipe-level tests: run arguments, reading a run's outputs, launching subprocesses.

Every run starts from ``recipes/configs/tiny_cpu.yaml`` shrunk by :func:`run_args` to a few seconds.
Single-process runs call ``recipes.*.main(argv)`` in the test process; multi-process runs and
signals use subprocesses (``torchrun`` / ``accelerate launch``, gloo on CPU).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO_ROOT / "recipes" / "configs" / "tiny_cpu.yaml"
FOMAML_SCRIPT = REPO_ROOT / "recipes" / "fomaml_math.py"
SFT_SCRIPT = REPO_ROOT / "recipes" / "sft_math.py"
ACCELERATE_2CPU = REPO_ROOT / "recipes" / "accelerate" / "2cpu.yaml"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SUBPROCESS_TIMEOUT_S = 180


@dataclass(frozen=True)
class RecipeInputs:
    data_dir: Path
    model_dir: Path


def run_args(inputs: RecipeInputs, out_dir: Path, *extra: str) -> list[str]:
    """``--config tiny_cpu.yaml`` + overrides for a run of seconds; ``extra`` overrides come last and win."""
    return [
        "--config", str(TINY_CONFIG),
        f"model.partial_pretrain={inputs.model_dir}",
        f"data.data_dir={inputs.data_dir}",
        "model.build_tiny_if_missing=false",
        f"trainer.default_local_dir={out_dir}",
        "trainer.logger=[jsonl]",
        "meta.meta_batch_size=3",  # 3 tasks over 2 processes: unequal shares (2 + 1)
        "meta.num_inner_steps=1",
        "meta.inner_batch_size=2",
        "meta.query_batch_size=2",
        "data.max_length=160",
        "trainer.total_steps=4",
        "trainer.save_freq=2",
        "trainer.test_freq=2",
        "trainer.eval_num_support=2",
        "trainer.eval_num_test=2",
        "sft.batch_size=5",  # micro-batches of 2, 2, 1 examples: 2 + 1 over 2 processes
        "sft.micro_batch_size=2",
        *extra,
    ]


def run_in_process(main, argv: list[str]) -> int:
    """``main(argv)`` of a recipe in this process, as one process on one intra-op thread like the
    subprocesses (OMP_NUM_THREADS=1), so that in-process and subprocess runs do the same float work."""
    saved_env = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
        os.environ.update(saved_env)


# -- reading a run ---------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def latest_step(run_dir: Path) -> int:
    text = (Path(run_dir) / "latest").read_text(encoding="utf-8").strip()
    assert text.startswith("step_"), f"{run_dir}/latest holds {text!r}"
    return int(text.removeprefix("step_"))


def checkpoint_weights(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """``model_state_dict`` of checkpoint ``step`` (default: the one ``latest`` names), loaded safely."""
    step = latest_step(run_dir) if step is None else step
    payload = torch.load(Path(run_dir) / f"maml_checkpoint_step_{step}.pt", map_location="cpu", weights_only=True)
    assert payload["step"] == step
    return payload["model_state_dict"]


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), f"different parameter names: {sorted(set(a) ^ set(b))[:4]}"
    assert a, "no weights saved"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def compared_keys(row: dict) -> set[str]:
    """Every logged key but timing (perf/*), which legitimately differs between runs."""
    return {k for k in row if not k.startswith("perf/")}


def assert_same_metrics(rows_a: list[dict], rows_b: list[dict], *, rel: float = 0.0, abs_: float = 0.0) -> None:
    """Same steps, same keys (bar perf/*) and values equal to within rel/abs (NaN equals NaN)."""
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], "different logged steps"
    for a, b in zip(rows_a, rows_b):
        assert compared_keys(a) == compared_keys(b), f"step {a['step']}: keys differ: {compared_keys(a) ^ compared_keys(b)}"
        for key in sorted(compared_keys(a)):
            x, y = a[key], b[key]
            same = (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=rel, abs_tol=abs_)
            assert same, f"step {a['step']}: {key} = {x!r} vs {y!r} (rel {rel}, abs {abs_})"


# -- subprocesses ----------------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO_ROOT))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], nproc: int = 2) -> list[str]:
    # --standalone: a private rendezvous on a free port (other test runs may share the machine).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script), *args]


def accelerate_2cpu(script: Path, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_2CPU),
        "--main_process_port", str(free_port()), str(script), *args,
    ]


def run_subprocess(cmd: list[str], log_path: Path, *, expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root, stdout+stderr to ``log_path``; assert the exit code."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=SUBPROCESS_TIMEOUT_S)
    if expect_rc is not None:
        assert proc.returncode == expect_rc, (
            f"exit code {proc.returncode}, expected {expect_rc}: {' '.join(cmd)}\n--- output tail ---\n"
            + log_path.read_text(encoding="utf-8", errors="replace")[-6000:]
        )
    return proc


def start_subprocess(cmd: list[str], log_path: Path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def wait_for(predicate, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = SUBPROCESS_TIMEOUT_S) -> None:
    """Poll ``predicate`` until true; fail with the log if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n"
                        + log_path.read_text(encoding="utf-8", errors="replace")[-6000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (complete lines only; the file is written while we read)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the launcher's worker process with RANK=``rank`` (Linux /proc), None if not started yet."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children")
    try:
        pids = [int(p) for p in children.read_text().split()]
    except OSError:
        return None
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None
