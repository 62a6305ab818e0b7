"""What every training recipe shares: set-up, periodic evaluation, checkpoints, resume, shutdown.

A recipe (``recipes/fomaml_math.py``: meta-training; ``recipes/sft_math.py``: the SFT baseline)
subclasses :class:`Trainer`, sets its class attributes and writes its own ``setup`` and
``train_step`` from the pieces here; the trainer knows nothing of its subclasses beyond those hooks.
Whether a checkpoint can be resumed by a config is decided by ``lora_maml.checkpoint``.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

from lora_maml import checkpoint as ckpt
from lora_maml import inputs
from lora_maml.atomic import DirectoryLock, check_writable_dir
from lora_maml.config import Config, ConfigError, config_to_dict, with_absolute_paths
from lora_maml.data import prepare
from lora_maml.data.math import DataError
from lora_maml.data.tokenize import collate, encode_records
from lora_maml.distributed import (
    Dist,
    all_gather_objects,
    barrier,
    broadcast_object,
    consolidated_optimizer_state,
    destroy_distributed,
    full_tensor,
    init_distributed,
    is_multiprocess,
    local_share,
    shard_like,
    shard_model,
    shard_optimizer_state,
)
from lora_maml.errors import LoraMamlError
from lora_maml.errors import describe as describe_error
from lora_maml.meta.algorithms import inner_loop, per_tensor
from lora_maml.meta.fast_weights import FunctionalLoss
from lora_maml.meta.sharded import ShardedLoss
from lora_maml.models import add_lora, adapted_parameters, compile_decoder, load_base, torch_dtype
from lora_maml.tiny_model import build_tiny_model, texts_from_prepared
from lora_maml.train.memory import describe, free_device_memory, full_mode_estimate
from lora_maml.train.metrics import METRICS_FILE, MetricLogger, ProgressBar, flops_per_token, mfu, peak_flops

log = logging.getLogger("lora_maml")


class ResumableSampler(Protocol):
    """What the trainer needs of a recipe's sampler (``lora_maml.data.episodes``): the draws of step s
    are ``sample(s)``, a pure function of (seed, settings, s); the state to resume is the next step."""

    next_step: int

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


@dataclass
class TaskData:
    """One task's encoded examples (``encode_example`` dicts) for each prepared split."""

    support: list[dict]
    query: list[dict]
    test: list[dict]


class GracefulStop:
    """SIGTERM / SIGINT (cluster preemption, Ctrl-C) set a flag; the loop finishes its step, saves, exits.

    The decision is collective (:meth:`requested` takes the max over processes) so that every process
    stops after the same step.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device  # NCCL reduces CUDA tensors only
        self._flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True
        log.warning("received %s: finishing the current step, then saving a checkpoint", signal.Signals(signum).name)

    def requested(self) -> bool:
        flag = torch.tensor([float(self._flag)], device=self._device)
        if is_multiprocess():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Shared state and steps of a training recipe.

    A subclass sets the class attributes below, and defines ``setup`` (which sets ``self.sampler``,
    ``self.optimizer``, ``self.scheduler``, resumes and starts the logging) and ``train_step``.
    """

    # Saved as ``trainer_state["kind"]`` in every checkpoint (the values checkpoints already hold).
    kind: str
    # The namespace of the step's metrics: ``{metric_prefix}/loss``, ``/skipped_step``, ``/nonfinite_total``.
    metric_prefix: str
    # What the progress bar counts.
    step_unit: str = "step"
    # With ``meta.adapter=full``: keep fp32 master weights whatever ``model.dtype`` (see :meth:`setup_model`).
    fp32_master_weights: bool = False
    sampler: ResumableSampler  # set by ``setup``; its state is saved with every checkpoint

    def __init__(self, cfg: Config):
        cfg = with_absolute_paths(cfg)  # what the checkpoints record works from any directory
        self.cfg = cfg
        self.dist: Dist = init_distributed()
        self.out_dir = Path(cfg.trainer.default_local_dir)
        check_writable_dir(self.out_dir, "trainer.default_local_dir")  # every process, before any slow loading
        self.step = 0
        self.total_steps = cfg.trainer.total_steps
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.label_tokens_seen = 0  # cumulative training label tokens: the x axis that matches FOMAML and SFT
        self.updates_applied = 0  # by this process since it started (not restored on resume)
        logging.basicConfig(
            level=logging.INFO if self.dist.is_main else logging.WARNING,
            format="%(asctime)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        self.lock = self.lock_out_dir()  # before anything in it is read, swept or written
        try:
            self.check_fresh_start()
            # The checkpoint to resume (trainer.resume_mode), read now (memory-mapped) so that a config it
            # cannot be resumed with fails before the model loads; its weights are copied in by resume().
            self.checkpoint = ckpt.checkpoint_to_resume(cfg)
        except BaseException:
            self.release_out_dir()
            raise

    def lock_out_dir(self) -> DirectoryLock | None:
        """Process 0, the one that writes ``trainer.default_local_dir``, locks it (``atomic.DirectoryLock``): a
        second run on it is refused, naming the process that holds it. Every process fails alike."""
        lock, refusal = None, None
        if self.dist.is_main:
            try:
                lock = DirectoryLock(self.out_dir, "trainer.default_local_dir")
            except LoraMamlError as err:
                refusal = str(err)
        refusal = broadcast_object(refusal)
        if refusal is not None:
            raise LoraMamlError(refusal)
        return lock

    def release_out_dir(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def check_fresh_start(self) -> None:
        """``trainer.resume_mode=disable`` over a directory that holds an earlier run is refused unless
        ``trainer.overwrite=true``: starting afresh there would cut its metrics.jsonl and point ``latest`` at
        the new run's steps among the old run's checkpoints."""
        trainer = self.cfg.trainer
        if trainer.resume_mode != "disable" or trainer.overwrite:
            return
        earlier = [p.name for p in ckpt.checkpoint_entries(self.out_dir)]
        metrics = self.out_dir / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size:
            earlier.append(METRICS_FILE)
        if earlier:
            shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
            raise ConfigError(
                f"trainer.resume_mode=disable: trainer.default_local_dir={self.out_dir} holds an earlier run "
                f"({shown}); set trainer.resume_mode=auto to continue it, trainer.overwrite=true to replace it, "
                "or choose another trainer.default_local_dir"
            )

    # -- set-up pieces -----------------------------------------------------------------------
    def check_even_share(self, count: int, what: str) -> None:
        """Under FSDP every forward and backward is a collective (it all-gathers the base's shards):
        a process with more tasks or micro-batches than another would wait forever in its extra forward."""
        world = self.dist.world_size
        if self.cfg.model.fsdp_config.enabled and count % world:
            raise ConfigError(
                f"model.fsdp_config.enabled=true: {what} = {count} must be a multiple of the number of "
                f"processes ({world}) so that every process runs the same forward passes"
            )

    def ensure_inputs(self) -> None:
        """Prepare ``data.data_dir`` from ``data.source`` if it is missing, and build the tiny model if
        ``model.build_tiny_if_missing`` asks for it (process 0 only; the others wait). Then fingerprint
        them (``self.inputs``, recorded by every checkpoint) and refuse to resume a checkpoint whose data
        or base changed since (``lora_maml.inputs.check_resume``), and read the meta-training tasks'
        splits: a bad data directory or ``data.tasks`` fails before the model loads."""
        cfg = self.cfg
        data_dir = Path(cfg.data.data_dir)
        if self.dist.is_main and not (data_dir / prepare.MANIFEST).exists():
            log.info("data: %s not prepared; preparing it from data.source=%s", data_dir, cfg.data.source)
            try:
                prepare.prepare_from_source(
                    cfg.data.source, data_dir, seed=cfg.trainer.seed, support_ratio=cfg.data.support_ratio,
                    query_ratio=cfg.data.query_ratio, validate=True,
                )
            except (ValueError, OSError) as err:
                raise DataError(f"preparing data.data_dir={data_dir} from data.source={cfg.data.source}: "
                                f"{describe_error(err)}") from err
        model_dir = Path(cfg.model.partial_pretrain)
        if self.dist.is_main and cfg.model.build_tiny_if_missing and not model_dir.exists():
            log.info("model: building a tiny random-init Qwen3 at %s", model_dir)
            build_tiny_model(model_dir, texts_from_prepared(data_dir), seed=cfg.trainer.seed)
        barrier()
        self.inputs = inputs.fingerprint(cfg)
        if self.checkpoint is not None:
            inputs.check_resume(self.checkpoint["path"], self.checkpoint["trainer_state"], cfg, self.inputs)
        self.read_data()

    def setup_model(self) -> None:
        """Frozen base (+ LoRA), the trained parameters, optional FSDP2, the fast weights (``self.fast``).

        With :attr:`fp32_master_weights` (meta-training), full mode keeps fp32 master weights whatever
        ``model.dtype``: the module's parameters (and so AdamW's moments, the meta-gradient and the inner
        loop's updates) are fp32, while forward and backward run in ``model.dtype`` (the fast weights are
        cast on the way in; under FSDP2 the all-gather casts). Updates of ~1e-5 on weights of ~1e-2 would
        round away in bf16.
        """
        cfg = self.cfg
        torch.manual_seed(cfg.trainer.seed)  # same LoRA init on every process, whatever the world size
        model, self.tokenizer = load_base(cfg.model)
        if cfg.meta.adapter == "lora":
            model = add_lora(model, cfg.model)
        model.to(self.dist.device)
        compute = torch_dtype(cfg.model.dtype)
        master = self.fp32_master_weights and cfg.meta.adapter == "full"
        if master:  # upcast on the device: the host holds one model.dtype copy per process, not an fp32 one
            model.to(torch.promote_types(compute, torch.float32))
        if cfg.model.compile:
            compile_decoder(model)  # training only: load_base (evaluation, export, generation) never compiles
        self.params = adapted_parameters(model, cfg.meta.adapter)
        self.sharded = cfg.model.fsdp_config.enabled and cfg.meta.adapter == "full"
        if cfg.model.fsdp_config.enabled:
            shard_model(
                model,
                replicated=[] if self.sharded else list(self.params.values()),
                compute_dtype=compute if master else None,
                cpu_offload=cfg.model.fsdp_config.cpu_offload,
                reshard_after_forward=cfg.model.fsdp_config.reshard_after_forward,
            )
            self.params = adapted_parameters(model, cfg.meta.adapter)  # fully_shard replaced them by shards
        model.train()  # activation checkpointing is active in train mode only; dropout is the config's
        self.model = model
        if self.sharded:
            self.fast = ShardedLoss(model, self.params)
        else:
            self.fast = FunctionalLoss(model, list(self.params), compute_dtype=compute if master else None)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        n_trainable = sum(p.numel() for p in self.params.values())
        self.param_counts = (n_frozen, n_trainable)
        log.info("model: %s frozen + %s trained parameters", f"{n_frozen:,}", f"{n_trainable:,}")
        if master:
            log.info(describe(full_mode_estimate(model, cfg, self.dist.world_size), self.dist.world_size,
                              cfg.model.fsdp_config.enabled))
            free = free_device_memory(self.dist.device)
            if free:
                log.info(free)

    def read_data(self) -> None:
        """The records of the support / query / test splits of the meta-training tasks (``data.tasks``)."""
        cfg = self.cfg
        data_dir = Path(cfg.data.data_dir)
        tasks = prepare.list_tasks(data_dir)
        meta_tasks = tasks["meta_train"]
        if cfg.data.tasks is not None:
            missing = sorted(set(cfg.data.tasks) - set(meta_tasks))
            if missing:
                raise ConfigError(f"data.tasks: {missing} are not meta-training tasks of {data_dir} ({meta_tasks})")
            meta_tasks = [t for t in meta_tasks if t in cfg.data.tasks]
        self.task_names = list(meta_tasks)
        self.records = {
            task: {part: prepare.load_split(data_dir, task, part) if part != "test" or task in tasks["few_shot_eval"]
                   else [] for part in ("support", "query", "test")}
            for task in self.task_names
        }

    def setup_data(self) -> None:
        """Encode the records :meth:`read_data` read."""
        cfg = self.cfg
        data_dir = Path(cfg.data.data_dir)
        self.tasks: dict[str, TaskData] = {}
        truncated = 0
        for task in self.task_names:
            parts = {}
            for part, records in self.records.pop(task).items():
                parts[part], n_cut = encode_records(
                    records, self.tokenizer, max_length=cfg.data.max_length, truncation=cfg.data.truncation
                )
                truncated += n_cut
            self.tasks[task] = TaskData(**parts)
        self.n_truncated = truncated
        log.info(
            "data: %d tasks from %s (%s truncated to data.max_length=%d, data.truncation=%s)",
            len(self.task_names), data_dir, truncated, cfg.data.max_length, cfg.data.truncation,
        )

    def batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_id, packed=self.cfg.data.packing)
        return {k: v.to(self.dist.device) for k, v in batch.items()}

    def setup_eval_set(self) -> None:
        """A fixed support sample and a fixed test sample per task for the periodic evaluation."""
        cfg = self.cfg.trainer
        self.eval_set = {}
        # At most trainer.eval_max_tasks tasks (a fixed draw): a family of hundreds of tasks would
        # otherwise run hundreds of adaptations per evaluation.
        picked = set(np.random.default_rng([cfg.seed, 7907]).permutation(len(self.task_names))[: cfg.eval_max_tasks])
        for i, task in enumerate(self.task_names):
            data = self.tasks[task]
            if i not in picked:
                continue
            if not data.test or not data.support:
                continue
            rng = np.random.default_rng([cfg.seed, 7919, i])
            support = rng.permutation(len(data.support))[: cfg.eval_num_support].tolist()
            test = rng.permutation(len(data.test))[: cfg.eval_num_test].tolist()
            self.eval_set[task] = (support, test)

    def setup_logging(self, resume_step: int | None, total_steps: int) -> None:
        if resume_step is None and self.cfg.trainer.overwrite and self.dist.is_main:
            earlier = ckpt.checkpoint_entries(self.out_dir)
            if earlier:
                log.warning("trainer.overwrite=true: deleting the earlier run's checkpoints in %s (%d files and "
                            "directories) before this run starts afresh", self.out_dir, len(earlier))
                ckpt.remove_checkpoints(self.out_dir)
        self.logger = MetricLogger(
            self.cfg.trainer, config_to_dict(self.cfg), self.out_dir, is_main=self.dist.is_main,
            resume_step=resume_step, total_steps=total_steps,
        )
        self.progress = ProgressBar(total_steps, initial=self.step, is_main=self.dist.is_main,
                                    unit=self.step_unit, loss_name=f"{self.metric_prefix}/loss")
        self.peak = peak_flops(self.dist.device) if self.dist.device.type == "cuda" else None
        self.stop = GracefulStop(self.dist.device)

    # -- performance ---------------------------------------------------------------------------
    def perf_metrics(self, tokens: int, seconds: float, seq_len: float) -> dict[str, float]:
        """tokens/s of this process and, on a known GPU, model FLOPs utilisation (see metrics.flops_per_token)."""
        config = getattr(self.model, "config", None)
        rate = tokens / max(seconds, 1e-9)
        out = {"perf/tokens_per_s": rate * self.dist.world_size}
        if self.peak and config is not None:
            n_frozen, n_trainable = self.param_counts
            attn_dim = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
            per_token = flops_per_token(n_frozen, n_trainable, config.num_hidden_layers, attn_dim, int(seq_len))
            out["perf/mfu"] = mfu(rate, per_token, self.peak)
        return out

    # -- periodic evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def _test_loss(self, fn: FunctionalLoss | ShardedLoss, weights: list[torch.Tensor], examples: list[dict]) -> float:
        """Token-weighted mean NLL over ``examples`` at ``weights`` (a list of micro-batches is one batch)."""
        size = self.cfg.meta.query_batch_size
        return float(fn.loss(weights, [self.batch(examples[i : i + size]) for i in range(0, len(examples), size)])[0])

    def evaluate(self) -> dict[str, float]:
        """Adapt from the current initialisation on each task's fixed support sample with the training
        inner loop; log the fixed test sample's loss before (``loss_pre``) and after (``loss_post``)."""
        meta = self.cfg.meta
        fn = self.fast
        lrs = per_tensor(self.inner_lrs(), fn.names)
        # Under FSDP every forward all-gathers the base's shards, so every process must run the same
        # forwards; the tasks' sample sizes may differ, so each process then evaluates every task.
        fsdp = self.cfg.model.fsdp_config.enabled
        tasks = sorted(self.eval_set)
        local = {}
        for task in tasks if fsdp else local_share(tasks, self.dist.rank, self.dist.world_size):
            support_idx, test_idx = self.eval_set[task]
            data = self.tasks[task]
            support = [data.support[i] for i in support_idx]
            size = meta.inner_batch_size
            support_batches = [self.batch(support[i : i + size]) for i in range(0, len(support), size)]
            test = [data.test[i] for i in test_idx]
            local[f"eval/{task}/loss_pre"] = self._test_loss(fn, fn.weights(), test)
            with fn.fast_weights(fn.weights()) as (_, phi):
                adapted = inner_loop(fn, phi, support_batches, lrs, meta.num_inner_steps, optimizer=meta.inner_optimizer)
                local[f"eval/{task}/loss_post"] = self._test_loss(fn, adapted.weights, test)
        metrics: dict[str, float] = {}
        for part in [local] if fsdp else all_gather_objects(local):
            metrics.update(part)
        for which in ("loss_pre", "loss_post"):
            values = [v for k, v in metrics.items() if k.endswith(which)]
            if values:
                metrics[f"eval/{which}"] = sum(values) / len(values)
        if "eval/loss_pre" in metrics:
            metrics["eval/adaptation_benefit"] = metrics["eval/loss_pre"] - metrics["eval/loss_post"]
        return metrics

    # -- non-finite steps ------------------------------------------------------------------------
    def count_nonfinite(self, finite: bool) -> None:
        """Count skipped non-finite updates (the update itself was skipped by ``apply_gradients``)."""
        if finite:
            self.nonfinite_in_a_row = 0
            self.updates_applied += 1
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        log.warning("step %d: non-finite loss, gradient or updated weight, update skipped (%d in a row, %d in total)",
                    self.step, self.nonfinite_in_a_row, self.nonfinite_total)

    def stop_if_diverged(self) -> None:
        """Stop with a clear message after ``trainer.max_consecutive_nonfinite`` skipped steps in a row."""
        limit = self.cfg.trainer.max_consecutive_nonfinite
        if self.nonfinite_in_a_row >= limit:
            # A skipped step leaves the weights as they were and a save refuses non-finite ones, so the
            # newest checkpoint holds the last finite state (a resume refuses a checkpoint that does not).
            saved = ckpt.complete_steps(self.out_dir)
            last_good = (f"the last good state is the newest checkpoint, {ckpt.pt_path(self.out_dir, saved[-1])}"
                         if saved else f"no checkpoint was saved in {self.out_dir}")
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient (limit "
                f"trainer.max_consecutive_nonfinite={limit}); {last_good}. Lower the learning rates "
                "(meta.inner_lr, meta.outer_lr) or check the data."
            )

    # -- the loop ----------------------------------------------------------------------------------
    def is_logging_step(self, step: int) -> bool:
        """Whether step ``step`` (numbered from 1) writes a metrics line."""
        return step % self.cfg.trainer.log_freq == 0

    def train_step(self, step: int) -> tuple[dict[str, float], list[dict]]:
        """One optimizer step on the draw of ``step`` (numbered from 0); returns its metrics and batches."""
        raise NotImplementedError

    def counted_label_tokens(self, metrics: dict[str, float]) -> int:
        """The training label tokens of the step whose ``metrics`` these are (``train/label_tokens``)."""
        raise NotImplementedError

    def train(self) -> None:
        """Steps until ``total_steps`` or a stop request; the draw of step s is a pure function of (seed, s)."""
        while self.step < self.total_steps:
            started = time.perf_counter()
            metrics, batches = self.train_step(self.step)
            self.step += 1
            if self.finish_step(metrics, batches, started):
                return

    def finish_step(self, metrics: dict[str, float], batches: list[dict], started: float) -> bool:
        """After step ``self.step``: skip accounting, throughput, progress, periodic evaluation, logging,
        checkpointing. Returns True when a stop was requested (the checkpoint is then written)."""
        cfg = self.cfg.trainer
        logging_step = self.is_logging_step(self.step)
        prefix = self.metric_prefix
        self.count_nonfinite(not metrics[f"{prefix}/skipped_step"])
        tokens = input_tokens(batches)
        metrics |= self.perf_metrics(tokens, time.perf_counter() - started, mean_seq_len(batches))
        metrics[f"{prefix}/nonfinite_total"] = self.nonfinite_total
        self.label_tokens_seen += self.counted_label_tokens(metrics)
        metrics["train/label_tokens"] = self.label_tokens_seen
        self.progress.update(1, tokens * self.dist.world_size, metrics[f"{prefix}/loss"])
        periodic_eval = self.step % cfg.test_freq == 0 or self.step == self.total_steps
        if periodic_eval:
            metrics |= self.evaluate()
        if logging_step or periodic_eval or self.nonfinite_in_a_row:
            self.logger.log(self.step, metrics)
        self.stop_if_diverged()  # after logging, so the failing step is in metrics.jsonl
        stopping = self.stop.requested()
        if (self.step == self.total_steps or stopping) and not self.updates_applied:
            raise FloatingPointError(
                f"every step of this run was skipped for a non-finite loss, gradient or "
                f"updated weight: nothing trained, no final checkpoint written to {self.out_dir}. Lower the learning "
                "rates (meta.inner_lr, meta.outer_lr, sft.lr) or check the data."
            )
        if self.step % cfg.save_freq == 0 or self.step == self.total_steps or stopping:
            self.save_checkpoint()
        if stopping:
            log.warning("stopped at step %d on request; resume with the same command", self.step)
        return stopping

    # -- checkpoints ---------------------------------------------------------------------------
    def inner_lrs(self) -> float | dict[str, float]:
        """The inner learning rate(s) the periodic evaluation adapts with (Meta-SGD: the learned ones)."""
        return self.cfg.meta.inner_lr

    def log_inner_lrs(self) -> dict[str, float] | None:
        """Learned log inner learning rates by parameter name, saved with each checkpoint; None: none learned."""
        return None

    def restore_log_inner_lrs(self, log_rates: dict[str, float] | None) -> None:
        """Resume the learned log inner learning rates (:meth:`log_inner_lrs`) saved by the checkpoint."""

    def save_pretrained(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The checkpoint's loadable directory: the PEFT adapter, or the whole model with ``meta.adapter=full``
        (``state_dict``: the whole weights when the module holds FSDP shards)."""
        extra = {} if state_dict is None else {"state_dict": state_dict}
        self.model.save_pretrained(directory, safe_serialization=True, **extra)

    def save_checkpoint(self) -> None:
        """Gather every process's RNG state (and, with sharded weights, the whole weights and optimizer
        state, a tensor at a time), then rank 0 writes the checkpoint atomically. The files are those
        of a 1-process run either way (consolidated), so a run resumes on any number of processes."""
        rng_states = ckpt.gather_rng_states()
        weights = {n: full_tensor(p) for n, p in self.params.items()} if self.sharded else None
        optimizer_state = consolidated_optimizer_state(self.optimizer) if self.sharded else None
        if self.dist.is_main:
            full = self.cfg.meta.adapter == "full"
            # The loop draws sampler.sample(step) itself: the sampler resumes at the next step to draw.
            self.sampler.next_step = self.step
            state = {
                "scheduler": self.scheduler.state_dict(),
                "total_steps": self.total_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "nonfinite_total": self.nonfinite_total,
                "label_tokens_seen": self.label_tokens_seen,
                "world_size": self.dist.world_size,
                "kind": self.kind,
                "sampler": self.sampler.state_dict(),
                inputs.INPUTS_KEY: self.inputs,
            }
            ckpt.save_checkpoint(
                self.out_dir,
                self.step,
                model_state_dict=weights or {n: p.detach() for n, p in self.params.items()},
                optimizer_state_dict=optimizer_state or self.optimizer.state_dict(),
                config=config_to_dict(self.cfg),
                trainer_state=state,
                rng_states=rng_states,
                save_pretrained=lambda d: self.save_pretrained(Path(d), weights),
                pretrained_kind="model" if full else "adapter",
                max_to_keep=self.cfg.trainer.max_ckpt_to_keep,
                log_inner_lrs=self.log_inner_lrs(),
            )
            log.info("step %d: checkpoint saved to %s", self.step, self.out_dir)
        barrier()

    def resume(self) -> int | None:
        """Load the checkpoint chosen by ``trainer.resume_mode``; return its step (None: fresh start).

        What fixes the shape or meaning of the saved weights must match (``checkpoint.check_resumable``);
        a changed schedule or optimizer setting is continued from the new config (:meth:`continue_schedule`).
        """
        state = self.checkpoint
        if state is None:
            return None
        path = state["path"]
        self.checkpoint = None  # the weights are copied below; the mapping need not outlive this
        ckpt.check_resumable(path, state["config"], self.cfg, state["model_state_dict"], self.params)
        saved = state["model_state_dict"]
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(shard_like(saved[name], p))
        trainer_state = state["trainer_state"]
        # First: the sampler names a changed data or sampling setting, which the optimizer would not.
        self.sampler.load_state_dict(trainer_state["sampler"])
        self.restore_log_inner_lrs(ckpt.load_log_inner_lrs(state, list(self.params)))
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        optimizer_state = state["optimizer_state_dict"]
        self.optimizer.load_state_dict(shard_optimizer_state(optimizer_state, self.optimizer) if self.sharded else optimizer_state)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.nonfinite_in_a_row = trainer_state["nonfinite_in_a_row"]
        self.nonfinite_total = trainer_state["nonfinite_total"]
        self.label_tokens_seen = trainer_state.get("label_tokens_seen", 0)  # absent in older checkpoints
        rng_states = state["rng_states"]
        if len(rng_states) == self.dist.world_size:
            ckpt.restore_rng_state(rng_states[self.dist.rank])
        else:
            log.warning("%s was saved by %d processes, now %d: RNG states not restored",
                        path, len(rng_states), self.dist.world_size)
        self.step = int(state["step"])
        saved_total = trainer_state.get("total_steps", state["config"]["trainer"]["total_steps"])
        self.continue_schedule(path, state["config"], saved_total, configured)
        log.info("resumed from %s at step %d", path, self.step)
        return self.step

    def continue_schedule(self, path: Path, saved_cfg: dict, saved_total: int, configured: list[dict]) -> None:
        """After loading the optimizer and scheduler state: the optimizer settings are this config's
        and the learning rate is the NEW schedule's at the resumed step, with a warning naming what
        changed. (The optimizer state alone would keep the checkpoint's settings and its last lr, e.g.
        0 at the end of a cosine, until the next scheduler step jumps to the new schedule.)"""
        changed = [f"trainer.total_steps {saved_total} -> {self.total_steps}"] if saved_total != self.total_steps else []
        changed += [f"{key} {old} -> {new}"
                    for key, old, new in ckpt.config_differences(saved_cfg, self.cfg, ckpt.SCHEDULE_KEYS)]
        sched = self.scheduler
        old_lrs = [g["lr"] for g in self.optimizer.param_groups]
        for group, settings in zip(self.optimizer.param_groups, configured):
            group.update({k: v for k, v in settings.items() if k != "lr"})
        sched.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if changed:
            log.warning(
                "%s: the schedule / optimizer settings differ from the checkpoint's (%s): continuing with the new "
                "ones from step %d (lr %.3g, the checkpoint's schedule had %.3g)",
                path, "; ".join(changed), self.step, sched._last_lr[0], old_lrs[0],
            )
        if self.step >= self.total_steps:
            log.warning("%s: resumed at step %d >= %d total steps: nothing left to train (raise trainer.total_steps "
                        "to continue)", path, self.step, self.total_steps)

    def cleanup(self) -> None:
        for name in ("progress", "logger"):
            if hasattr(self, name):
                getattr(self, name).close()
        if hasattr(self, "stop"):
            self.stop.restore()
        self.release_out_dir()
        destroy_distributed()

    def run(self) -> None:
        """setup → train (which saves the checkpoints) → cleanup, on an error too."""
        try:
            self.setup()
            # Log records (warnings during training) print above the progress bar, not through it.
            with logging_redirect_tqdm():
                self.train()
        finally:
            self.cleanup()


def mean_seq_len(batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean sequence length of a list of batches (for the attention term of the FLOPs count)."""
    lengths = []
    for b in batches:
        if "attention_mask" in b:
            lengths.extend(b["attention_mask"].sum(1).tolist())
        else:
            starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist() + [b["position_ids"].shape[1]]
            lengths.extend(e - s for s, e in zip(starts, starts[1:]))
    return sum(lengths) / max(len(lengths), 1) if lengths else math.nan


def input_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Real (non-padding) input tokens of a list of batches: the tokens the model computes on."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)

