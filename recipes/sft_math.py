"""The baseline: plain multi-task LoRA SFT on the same tasks' support+query data.

    accelerate launch recipes/sft_math.py --config recipes/configs/qwen3_4b_math.yaml \
        trainer.default_local_dir=./outputs/sft_qwen3_4b_math [sft.match_tokens_of=recipes/configs/qwen3_4b_math.yaml]
    lora-maml sft --config-name tiny_cpu trainer.default_local_dir=./outputs/tiny_sft

It shares the model, LoRA, tokenisation, loss, optimizer, logging, checkpoints and periodic
evaluation with meta-training (lora_maml/train/trainer.py); only the step differs: one AdamW step
(``sft.lr``) on a batch of ``sft.batch_size`` sequences drawn from all tasks pooled, in micro-batches
of ``sft.micro_batch_size``. With ``sft.match_tokens_of`` it trains for exactly as many label tokens
as the named meta-training run (matched compute); otherwise for ``trainer.total_steps`` steps
(matched steps).

With ``sft.icl_max_shots`` K > 0 it is MetaICL (Min et al., NAACL 2022): the same batches, but every
example is a k-shot prompt, k uniform in 0..K, its shots solved examples of the same task's support+query
pool (never the example itself; ``MixedBatchSampler.shots``) written as earlier chat turns
(``lora_maml.data.tokenize``); only the final response is a target. An example with j shots holds j + 1
records, so it may take (j + 1) x ``data.max_length`` tokens (and at most the model's positions), the cap
evaluation in context uses (``lora_maml.data.tokenize.in_context_cap``). Shots never cut the example: of
the k drawn, the longest prefix whose example fits its cap is kept (``sft/icl_shots_dropped`` counts the
others), so an example trains exactly the label tokens of its plain SFT encoding and ``sft.match_tokens_of``
matches label tokens (the shots add context tokens only, ``sft/context_tokens``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

from lora_maml.config import Config, ConfigError, load_config
from lora_maml.data.episodes import EpisodeSampler, MixedBatchSampler
from lora_maml.data.tokenize import encode_example, in_context_cap
from lora_maml.distributed import all_reduce_sum, flat_buffer, local_share
from lora_maml.errors import run_main
from lora_maml.load_trained import read_run_config, resolve_model_path
from lora_maml.loss import causal_lm_loss_tensors
from lora_maml.optim import apply_gradients, build_optimizer, build_scheduler
from lora_maml.train.trainer import TaskData, Trainer
from recipes._config_args import config_from_args, config_parser

log = logging.getLogger("lora_maml")


class SFTRecipe(Trainer):
    kind = "sft"
    metric_prefix = "sft"

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.model.fsdp_config.enabled and cfg.meta.adapter == "full":
            # Its step all-reduces whole gradients; the meta-training recipe is the one that trains on shards.
            raise ConfigError(
                "model.fsdp_config.enabled=true with meta.adapter=full is supported by the meta-training recipe "
                "only, not by SFT: use meta.adapter=lora"
            )
        self.check_even_share(
            self.micro_batches_per_step(),
            f"the micro-batches per step (sft.batch_size={cfg.sft.batch_size} / sft.micro_batch_size="
            f"{cfg.sft.micro_batch_size}, rounded up)",
        )
        self.ensure_inputs()
        self.setup_model()
        # MetaICL writes the shots' text into each prompt at batch time; setup_data drops the records.
        self.shot_records = {t: {part: self.records[t][part] for part in ("support", "query")}
                             for t in self.task_names} if cfg.sft.icl_max_shots else {}
        # The longest sequence the model takes (None: unknown), a bound on a MetaICL example's cap.
        self.positions = getattr(self.model.config, "max_position_embeddings", None)
        self.setup_data()
        self.setup_eval_set()
        self.sampler = MixedBatchSampler(
            {t: (len(d.support), len(d.query)) for t, d in self.tasks.items()},
            batch_size=cfg.sft.batch_size,
            seed=cfg.trainer.seed,
            max_shots=cfg.sft.icl_max_shots,
        )
        self.total_steps = self.matched_steps() if cfg.sft.match_tokens_of else cfg.trainer.total_steps
        self.optimizer = build_optimizer(self.params, cfg.sft.lr, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        resumed = self.resume()
        self.setup_logging(resumed, self.total_steps)

    def matched_steps(self) -> int:
        """Steps whose batches hold at least as many label tokens as the meta-training run trains on."""
        meta_run = load_run_config(self.cfg.sft.match_tokens_of)
        for section in ("data", "model"):
            if getattr(meta_run, section) != getattr(self.cfg, section):
                raise ValueError(
                    f"sft.match_tokens_of={self.cfg.sft.match_tokens_of}: its {section} section differs from this "
                    f"run's; matched compute needs the same {section} (tokens are counted on this run's data)"
                )
        target = meta_training_label_tokens(meta_run, self.tasks)
        seen, steps = 0, 0
        # Counted on the plain examples: a MetaICL example trains exactly their label tokens (icl_example).
        while seen < target:
            seen += sum(label_tokens(self.example(ref)) for ref in self.sampler.sample(steps))
            steps += 1
        log.info("sft.match_tokens_of: %d label tokens of meta-training -> %d SFT steps (%d tokens)",
                 target, steps, seen)
        return steps

    def example(self, ref: tuple[str, str, int]) -> dict:
        task, part, index = ref
        return getattr(self.tasks[task], part)[index]

    def icl_example(self, ref: tuple[str, str, int], shots: list[tuple[str, str, int]]) -> tuple[dict, int]:
        """Example ``ref`` after the longest prefix of ``shots`` (j of them) with which it fits its cap
        (``in_context_cap``) untruncated, and j. No prefix fits (a plain example already cut by
        ``data.truncation`` included): the plain example, 0. Either way its labels are the plain example's
        (the response is tokenised on its own), so the shots add context tokens, never label tokens."""
        plain = self.example(ref)
        if not shots or plain["truncated"]:
            return plain, 0
        task, part, index = ref
        record = self.shot_records[task][part][index]
        pairs = [(r["prompt"], r["response"]) for r in (self.shot_records[t][p][i] for t, p, i in shots)]
        fitted, used = plain, 0
        # Bisection on the number of shots (each adds tokens); every shot is tried first, the common case.
        low, high, m = 1, len(pairs), len(pairs)
        while low <= high:
            encoded = encode_example(self.tokenizer, record["prompt"], record["response"], shots=pairs[:m],
                                     max_length=in_context_cap(self.cfg.data.max_length, m, self.positions),
                                     truncation="right")
            if encoded["truncated"]:
                high = m - 1
            else:
                fitted, used, low = encoded, m, m + 1
            m = (low + high) // 2
        return fitted, used

    def micro_batches_per_step(self) -> int:
        return math.ceil(self.cfg.sft.batch_size / self.cfg.sft.micro_batch_size)

    def counted_label_tokens(self, metrics: dict[str, float]) -> int:
        return int(metrics["sft/tokens"])

    def train_step(self, step: int) -> tuple[dict[str, float], list[dict]]:
        """One AdamW step on the global batch of ``step``, cut into micro-batches of
        ``sft.micro_batch_size`` (they bound the memory); each process takes a round-robin share of
        the micro-batches and the loss is normalised by the GLOBAL label-token count, so the summed
        gradient is the same for any number of processes. Sharing whole micro-batches keeps each
        micro-batch's examples (and so its float rounding) the same whatever the number of processes."""
        drawn = self.sampler.shots(step)
        encoded = [self.icl_example(ref, shots) for ref, shots in zip(self.sampler.sample(step), drawn)]
        examples = [example for example, _ in encoded]
        global_tokens = sum(label_tokens(e) for e in examples)
        size = self.cfg.sft.micro_batch_size
        micro = [examples[i : i + size] for i in range(0, len(examples), size)]
        params = list(self.params.values())
        batches = []
        # [the gradients | the loss sum], summed across processes by one all-reduce
        flat, grads, loss_sum = flat_buffer([p.shape for p in params], 1, dtype=torch.float64, device=self.dist.device)
        for chunk in local_share(micro, self.dist.rank, self.dist.world_size):
            batch = self.batch(chunk)
            batches.append(batch)
            loss, n = causal_lm_loss_tensors(self.model, batch)
            (loss * n / max(global_tokens, 1)).backward()
            loss_sum += (loss * n).detach().double()
        for g, p in zip(grads, params):
            if p.grad is not None:  # a process may get no examples: its share of the sum stays 0
                g.copy_(p.grad)
        all_reduce_sum(flat)
        for g, p in zip(grads, params):
            p.grad = g.to(p.dtype)
        metrics = {"sft/loss": float(loss_sum[0]) / max(global_tokens, 1), "sft/tokens": global_tokens,
                   "sft/context_tokens": sum(len(e["input_ids"]) for e in examples) - global_tokens}
        if self.cfg.sft.icl_max_shots:
            used = [n for _, n in encoded]
            metrics |= {"sft/icl_shots": sum(used) / len(used),
                        "sft/icl_shots_dropped": sum(map(len, drawn)) - sum(used)}
        update = apply_gradients(params, self.optimizer, self.scheduler, self.cfg.optim.clip_grad)
        metrics |= {f"sft/{k}": v for k, v in update.items()}
        return metrics, batches


def label_tokens(example: dict) -> int:
    """Target tokens of one encoded example (the HF shift never scores position 0)."""
    return sum(label != -100 for label in example["labels"][1:])


def meta_training_label_tokens(meta_cfg: Config, tasks: dict[str, TaskData]) -> int:
    """Label tokens a meta-training run of ``meta_cfg`` trains on in ``trainer.total_steps`` meta-steps:
    every inner-step support batch and every query batch, replayed from its (pure) episode sampler."""
    meta = meta_cfg.meta
    sampler = EpisodeSampler(
        {t: (len(d.support), len(d.query)) for t, d in tasks.items()},
        meta_batch_size=meta.meta_batch_size,
        num_inner_steps=meta.num_inner_steps,
        inner_batch_size=meta.inner_batch_size,
        query_batch_size=meta.query_batch_size,
        seed=meta_cfg.trainer.seed,
    )
    counts = {t: ([label_tokens(e) for e in d.support], [label_tokens(e) for e in d.query]) for t, d in tasks.items()}
    total = 0
    for step in range(meta_cfg.trainer.total_steps):
        for draw in sampler.sample(step):
            support, query = counts[draw.task]
            total += sum(support[i] for batch in draw.support_batches for i in batch)
            total += sum(query[i] for i in draw.query_indices)
    return total


def load_run_config(path: str | Path) -> Config:
    """The config of a run: its YAML file, one of its ``.pt`` checkpoints, a ``step_N`` directory
    or its run directory (the newest complete checkpoint)."""
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        return load_config(path)
    kind, source = resolve_model_path(path)
    if kind != "checkpoint":
        raise ConfigError(f"{path}: expected a run config (.yaml), checkpoint (.pt) or run directory, found a {kind}")
    return read_run_config(source)


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    SFTRecipe(config_from_args(build_parser().parse_args(argv))).run()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
