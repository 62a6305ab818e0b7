"""Meta-train a LoRA adapter (or every weight) on the MATH subjects as tasks: FOMAML, MAML, Reptile
(``meta.algorithm``), each with Meta-SGD's learned inner rates on request (``meta.learn_inner_lr``).

    accelerate launch recipes/fomaml_math.py --config recipes/configs/qwen3_4b_math.yaml [key=value ...]
    accelerate launch recipes/fomaml_math.py --config-name tiny_cpu
    lora-maml train --config-name tiny_cpu trainer.total_steps=10

setup → train → save_checkpoint → cleanup. Each process runs the inner loops of its share of the
meta-batch's tasks; the meta-gradient is summed across processes once per meta-step (one flat
all-reduce), so the result does not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lora_maml.config import ConfigError
from lora_maml.data.episodes import EpisodeSampler
from lora_maml.distributed import all_gather_objects, all_reduce_sum, local_share
from lora_maml.errors import run_main
from lora_maml.meta.algorithms import MetaLearner, TaskBatch
from lora_maml.meta.diagnostics import InertInnerLoopMonitor
from lora_maml.optim import build_optimizer, build_scheduler
from lora_maml.train.trainer import Trainer
from recipes._config_args import config_from_args, config_parser


class MetaTrainingRecipe(Trainer):
    """The meta-training recipe: ``Trainer`` with a meta-step (``lora_maml.meta.algorithms``) as its step."""

    kind = "fomaml"  # the trainer_state value of every meta-training checkpoint, whatever meta.algorithm
    metric_prefix = "meta"
    step_unit = "meta-step"
    fp32_master_weights = True

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.model.fsdp_config.enabled and cfg.meta.adapter == "full":
            # Every weight sharded: every process runs every task, on its share of each batch's examples.
            if cfg.meta.learn_inner_lr or cfg.meta.algorithm != "fomaml":
                raise ConfigError(
                    "model.fsdp_config.enabled=true with meta.adapter=full runs first-order FOMAML on the shards: "
                    f"meta.algorithm={cfg.meta.algorithm} and meta.learn_inner_lr={cfg.meta.learn_inner_lr} are not "
                    "supported there; use meta.algorithm=fomaml and meta.learn_inner_lr=false"
                )
            self.check_even_share(cfg.meta.inner_batch_size, "meta.inner_batch_size")
            self.check_even_share(cfg.meta.query_batch_size, "meta.query_batch_size")
        else:
            self.check_even_share(cfg.meta.meta_batch_size, "meta.meta_batch_size")
        self.ensure_inputs()
        self.setup_model()
        self.setup_data()
        self.setup_eval_set()
        self.sampler = EpisodeSampler(
            {t: (len(d.support), len(d.query)) for t, d in self.tasks.items()},
            meta_batch_size=cfg.meta.meta_batch_size,
            num_inner_steps=cfg.meta.num_inner_steps,
            inner_batch_size=cfg.meta.inner_batch_size,
            query_batch_size=cfg.meta.query_batch_size,
            seed=cfg.trainer.seed,
        )
        # Sharded: the reduce-scatter already sums every process's share of a task; nothing left to reduce.
        self.learner = MetaLearner(self.model, self.params, cfg.meta, all_reduce=None if self.sharded else all_reduce_sum,
                                   fn=self.fast)
        # Meta-SGD: the log inner learning rates get their own Adam rate and no weight decay.
        learned_rates = [] if self.learner.log_inner_lrs is None else [
            {"params": [self.learner.log_inner_lrs], "lr": cfg.meta.inner_lr_lr, "weight_decay": 0.0}
        ]
        self.optimizer = build_optimizer(self.params, cfg.meta.outer_lr, cfg.optim, extra_groups=learned_rates)
        self.inert = InertInnerLoopMonitor(cfg.meta.inner_lr, cfg.meta.num_inner_steps)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.total_steps)
        resumed = self.resume()
        self.setup_logging(resumed, cfg.trainer.total_steps)

    def inner_lrs(self) -> dict[str, float]:
        return self.learner.inner_lrs()

    def log_inner_lrs(self) -> dict[str, float] | None:
        if self.learner.log_inner_lrs is None:
            return None
        return dict(zip(self.learner.names, self.learner.log_inner_lrs.tolist()))

    def restore_log_inner_lrs(self, log_rates: dict[str, float] | None) -> None:
        if self.learner.log_inner_lrs is not None:  # checkpoint.check_resumable: saved too, for the same names
            with torch.no_grad():
                self.learner.log_inner_lrs.copy_(torch.tensor(list(log_rates.values()), dtype=torch.float64))

    def counted_label_tokens(self, metrics: dict[str, float]) -> int:
        """Every inner-step support batch and the query batch of every task of the meta-step."""
        return int(metrics["meta/support_tokens"]) + int(metrics["meta/query_tokens"])

    def episodes(self, step: int) -> list[TaskBatch]:
        """This process's share of the meta-batch drawn for ``step``, collated on the device: its share
        of the tasks or, with sharded weights, every task and its share of each batch's examples."""
        rank, world = self.dist.rank, self.dist.world_size
        draws = self.sampler.sample(step)
        if not self.sharded:
            draws = local_share(draws, rank, world)
        share = (lambda idx: local_share(idx, rank, world)) if self.sharded else list
        episodes = []
        for draw in draws:
            data = self.tasks[draw.task]
            support = [self.batch([data.support[i] for i in share(batch)]) for batch in draw.support_batches]
            query = self.batch([data.query[i] for i in share(draw.query_indices)])
            episodes.append(TaskBatch(draw.task, support, query))
        return episodes

    def train_step(self, step: int) -> tuple[dict[str, float], list[dict]]:
        """One meta-step on this process's share of the tasks drawn for ``step``."""
        episodes = self.episodes(step)
        logging_step = self.is_logging_step(step + 1)
        metrics, task_metrics = self.learner.step(
            episodes, self.optimizer, self.scheduler, self.cfg.optim.clip_grad, diagnostics=logging_step
        )
        if self.dist.is_main:  # the meta/* metrics are global: one warning, not one per process
            self.inert.update(metrics)
        if logging_step:
            for part in all_gather_objects(task_metrics):  # the per-task metrics of every process
                metrics |= part
        return metrics, [b for e in episodes for b in (*e.support, e.query)]


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__.split("\n\n")[0].replace("\n", " "))


def main(argv: list[str] | None = None) -> int:
    MetaTrainingRecipe(config_from_args(build_parser().parse_args(argv))).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
