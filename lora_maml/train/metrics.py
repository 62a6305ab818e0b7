"""Training metrics: sinks (console, metrics.jsonl, wandb, tensorboard), a progress bar, and MFU.

:class:`MetricLogger` sends ``{name: number}`` at a step to the sinks listed in ``trainer.logger``;
``metrics.jsonl`` in the run directory is always written because resumption and the reports read
it. The console gets one short line per logging step with the headline metrics
(:data:`HEADLINE_METRICS`; every metric with ``trainer.console_metrics=all``), printed above the
progress bar. On resume the file and the tensorboard events are cut back to the checkpoint step, so a resumed
run's ``metrics.jsonl`` equals that of an uninterrupted run, and wandb continues the same run (its id
is kept in ``<out_dir>/wandb_run_id``). wandb never blocks or stops training: without credentials or
when ``wandb.init`` fails it logs offline (``wandb sync <out_dir>/wandb/offline-run-*`` uploads later),
and if that fails too it is dropped with a warning. Only the main process logs.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import re
import time
import uuid
from collections.abc import Mapping
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from lora_maml.atomic import write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
TENSORBOARD_DIR = "tensorboard"
# wandb's default is 90 s; a run should not sit that long on an unreachable server before
# falling back to offline logging.
WANDB_INIT_TIMEOUT_S = 30.0


def format_value(value: float | int) -> str:
    """Compact text for the console: ints as is, 4 decimals in [1e-3, 1e5), else 3-digit scientific."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


def order_keys(keys: list[str]) -> list[str]:
    """``meta/*`` keys first in the order given, then every other key sorted (tasks group by prefix)."""
    meta = [k for k in keys if k.startswith("meta/")]
    return meta + sorted(k for k in keys if not k.startswith("meta/"))


# The guide's headline numbers, in this order, on the console line of a logging step (those the
# step has): FOMAML's, SFT's, the periodic evaluation's means, then throughput. Everything else
# (per-task losses, token counts, learning rates, Meta-SGD rates) goes to metrics.jsonl / wandb /
# tensorboard, or to the console as well with ``trainer.console_metrics=all``.
HEADLINE_METRICS = (
    "meta/loss",
    "meta/avg_adaptation_gap",
    "meta/grad_norm",
    "meta/inner_progress",
    "sft/loss",
    "sft/grad_norm",
    "eval/loss_pre",
    "eval/loss_post",
    "perf/tokens_per_s",
)
# Console labels shorter than the key where the key is long and the meaning plain.
_CONSOLE_LABELS = {"perf/tokens_per_s": "tokens/s"}


def format_console_line(
    step: int, total_steps: int, metrics: Mapping[str, float | int], which: Literal["headline", "all"] = "headline"
) -> str:
    """``Step 100/5000: meta/loss=0.8123 meta/avg_adaptation_gap=0.0500 ... tokens/s=1234``.

    ``which="headline"``: the :data:`HEADLINE_METRICS` present in ``metrics``, plus a step's skipped
    update (``meta/skipped_step=1``) when there was one; ``"all"``: every key, ``meta/*`` first.
    """
    if which == "all":
        keys = order_keys(list(metrics))
    else:
        keys = [k for k in HEADLINE_METRICS if k in metrics]
        keys += [k for k in ("meta/skipped_step", "sft/skipped_step") if metrics.get(k)]
    fields = " ".join(f"{_CONSOLE_LABELS.get(k, k)}={_console_value(k, metrics[k])}" for k in keys)
    return f"Step {step}/{total_steps}: {fields}"


def _console_value(key: str, value: float | int) -> str:
    if key == "perf/tokens_per_s" and math.isfinite(value):
        return f"{value:.0f}"
    return format_value(value)


def _as_number(key: str, value: Any) -> float | int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real):
        return float(value)
    item = getattr(value, "item", None)  # one-element torch tensors and numpy arrays
    if callable(item):
        try:
            return _as_number(key, item())
        except (ValueError, RuntimeError):
            pass
    raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}")


def wandb_credentials_available() -> bool:
    """True when wandb could authenticate: WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE or a netrc entry."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class MetricLogger:
    """Send metrics to the sinks in ``trainer_cfg.logger`` (+ ``metrics.jsonl``, always).

    ``resume_step=None`` starts fresh: an existing ``metrics.jsonl`` is emptied, tensorboard events
    are superseded from step 0 and a new wandb run id is drawn. ``resume_step=N`` (the step of the
    checkpoint being resumed) keeps lines with step <= N, purges tensorboard events after N and
    resumes the wandb run whose id is in ``<out_dir>/wandb_run_id``. On non-main processes every
    method does nothing. Create it after ``find_resume_checkpoint`` and before the first ``log``.
    """

    def __init__(
        self,
        trainer_cfg: Any,
        config_dict: Mapping[str, Any],
        out_dir: str | Path,
        *,
        is_main: bool,
        resume_step: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        self.is_main = is_main
        self.out_dir = Path(out_dir)
        # The SFT baseline may run a derived number of steps (sft.match_tokens_of).
        self.total_steps = trainer_cfg.total_steps if total_steps is None else total_steps
        self.jsonl_path = self.out_dir / METRICS_FILE
        self._sinks = set(trainer_cfg.logger)
        self._console_metrics = trainer_cfg.console_metrics
        self._jsonl = None
        self._wandb_run = None
        self._tb_writer = None
        if not is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.truncate_after(-1 if resume_step is None else resume_step)
        if "wandb" in self._sinks:
            self._wandb_run = self._init_wandb(trainer_cfg, dict(config_dict), resume_step is not None)
        if "tensorboard" in self._sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(f"trainer.logger lists tensorboard: pip install tensorboard ({err})") from None

            # purge_step makes tensorboard drop events at >= that step written before a crash.
            purge = 0 if resume_step is None else resume_step + 1
            self._tb_writer = SummaryWriter(
                log_dir=str(self.out_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=30
            )

    # -- jsonl -----------------------------------------------------------------------------
    def truncate_after(self, step: int) -> None:
        """Keep only ``metrics.jsonl`` lines with ``step <= step`` (and drop unparseable ones)."""
        if not self.is_main:
            return
        if self._jsonl is not None:
            self._jsonl.close()
        kept = []
        if self.jsonl_path.exists():
            for lineno, line in enumerate(self.jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    logger.warning("%s:%d: dropping an unreadable line (interrupted write?)", self.jsonl_path, lineno)
                    continue
                if record_step <= step:
                    kept.append(line + "\n")
        write_text_atomic(self.jsonl_path, "".join(kept))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")

    # -- wandb -----------------------------------------------------------------------------
    def _init_wandb(self, trainer_cfg: Any, config_dict: dict, resuming: bool):
        try:
            import wandb
        except ImportError:
            logger.warning("trainer.logger lists wandb but it is not installed (pip install wandb): skipped")
            return None
        id_path = self.out_dir / WANDB_ID_FILE
        run_id = id_path.read_text(encoding="utf-8").strip() if resuming and id_path.exists() else ""
        if not re.fullmatch(r"[A-Za-z0-9_-]+", run_id):
            run_id = uuid.uuid4().hex[:12]
            write_text_atomic(id_path, run_id + "\n")

        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode not in ("offline", "disabled", "dryrun"):
            mode = "online"
            if not wandb_credentials_available():
                logger.warning(
                    "wandb: no credentials (WANDB_API_KEY or ~/.netrc): logging offline under %s/wandb",
                    self.out_dir,
                )
                mode = "offline"
        kwargs = dict(
            project=trainer_cfg.project_name,
            name=trainer_cfg.experiment_name,
            config=config_dict,
            dir=str(self.out_dir),
            id=run_id,
            resume="allow",
            settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S),
        )
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as err:
            if mode != "online":
                logger.warning("wandb.init(mode=%s) failed (%s): wandb logging disabled", mode, err)
                return None
            logger.warning("wandb.init failed (%s): logging offline under %s/wandb", err, self.out_dir)
        try:
            return wandb.init(mode="offline", **kwargs)
        except Exception as err:
            logger.warning("wandb.init(mode=offline) failed too (%s): wandb logging disabled", err)
            return None

    # -- all sinks -------------------------------------------------------------------------
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` at ``step`` (numbers, 0-d tensors or numpy scalars)."""
        if not self.is_main:
            return
        if self._jsonl is None:
            raise RuntimeError(f"MetricLogger for {self.out_dir} is closed")
        values = {k: _as_number(k, v) for k, v in metrics.items()}
        record = {"step": int(step), **{k: values[k] for k in order_keys(list(values))}}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if "console" in self._sinks:
            # tqdm.write clears the progress bar, prints the line and redraws the bar below it.
            tqdm.write(format_console_line(step, self.total_steps, values, self._console_metrics))
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(values, step=int(step))
            except Exception as err:
                logger.warning("wandb.log failed (%s): wandb logging disabled for this run", err)
                self._wandb_run = None
        if self._tb_writer is not None:
            for key, value in values.items():
                self._tb_writer.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception as err:
                logger.warning("wandb finish failed (%s); the local run files are in %s/wandb", err, self.out_dir)
            self._wandb_run = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ProgressBar:
    """tqdm bar over meta-steps: rate, ETA, and a postfix with tokens/s and the latest ``meta/loss``.

    ``initial`` is the resumed step; tokens/s averages over this process's own updates. Disabled
    (but still counting tokens) on non-main processes.
    """

    def __init__(
        self, total: int, initial: int = 0, *, is_main: bool = True, unit: str = "meta-step", loss_name: str = "meta/loss"
    ) -> None:
        self.loss_name = loss_name
        self._bar = tqdm(
            total=total, initial=initial, unit=unit, disable=not is_main, dynamic_ncols=True, smoothing=0.1
        )
        self._tokens = 0
        self._start = time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self._tokens / elapsed if elapsed > 0 else 0.0

    def update(self, n_steps: int = 1, tokens: int = 0, loss: float | None = None) -> None:
        self._tokens += tokens
        postfix = {"tok/s": f"{self.tokens_per_s:.0f}"}
        if loss is not None:
            postfix[self.loss_name] = format_value(float(loss))
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n_steps)

    def close(self) -> None:
        self._bar.close()


# ----------------------------------------------------------------------------------------------
# Model FLOPs utilisation


def flops_per_token(
    num_params_frozen: int,
    num_params_trainable: int,
    num_layers: int,
    attn_dim: int,
    seq_len: int,
    mode: Literal["train", "forward"] = "train",
) -> float:
    """Model FLOPs per processed token (PaLM / nanoGPT convention, no recomputation counted).

    A matmul with a weight of N parameters costs 2N FLOPs per token forward. Backward costs 2N for
    the gradient w.r.t. its input (needed for every layer below a trainable one, so frozen weights
    pay it too) plus 2N for the gradient w.r.t. the weight (trainable weights only)::

        train:   4 * N_frozen + 6 * N_trainable + 12 * L * A * T
        forward: 2 * (N_frozen + N_trainable) + 4 * L * A * T

    so LoRA over a frozen base costs ~4N and full fine-tuning ~6N. The attention score and value
    matmuls (2 * 2 * A * T per token and layer forward) have no weights: both operands are
    activations, so backward costs twice forward in every mode, hence 12 * L * A * T for training
    whether the base is frozen or not. ``attn_dim`` = num_attention_heads * head_dim (4096 for
    Qwen3-4B, whose hidden size is 2560); ``seq_len`` = the attended context length, counted in full
    as in PaLM (causal masking halves the true cost). N counts the weights used in matmuls, the
    LM head included and a lookup-only input embedding excluded. Gradient checkpointing's extra
    forward is hardware work, not model work, and is not counted.
    """
    attn = num_layers * attn_dim * seq_len
    if mode == "train":
        return 4.0 * num_params_frozen + 6.0 * num_params_trainable + 12.0 * attn
    if mode == "forward":
        return 2.0 * (num_params_frozen + num_params_trainable) + 4.0 * attn
    raise ValueError(f"mode must be 'train' or 'forward', got {mode!r}")


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Fraction of peak: ``tokens_per_s * flops_per_token / peak_flops`` (None without a known peak).

    Use matching scopes: one GPU's tokens/s with one GPU's peak, or all GPUs' with world_size * peak.
    """
    if peak_flops is None or peak_flops <= 0:
        return None
    return tokens_per_s * flops_per_token / peak_flops


# Dense (no sparsity) bf16 tensor-core peak per GPU from NVIDIA's datasheets, matched in order
# against torch.cuda.get_device_name (e.g. "NVIDIA H100 80GB HBM3" is the SXM part).
_PEAK_BF16_FLOPS: list[tuple[re.Pattern, float]] = [
    (re.compile(r"\bGH200\b"), 989e12),
    (re.compile(r"\bH200\b"), 989e12),
    (re.compile(r"\bH100\b.*\bPCIe\b"), 756e12),
    (re.compile(r"\bH100\b.*\bNVL\b"), 835e12),
    (re.compile(r"\bH[18]00\b"), 989e12),
    (re.compile(r"\bA[18]00\b"), 312e12),
    (re.compile(r"\bL40S\b"), 362e12),
    (re.compile(r"\bL4\b"), 121e12),
    (re.compile(r"\bA10\b"), 125e12),
]


def peak_flops(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device (default: current), None on CPU or an unknown GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    if device is not None:
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if device.type != "cuda":
            return None
    name = torch.cuda.get_device_name(device)
    for pattern, flops in _PEAK_BF16_FLOPS:
        if pattern.search(name):
            return flops
    return None
