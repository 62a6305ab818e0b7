"""The baseline: plain multi-task LoRA SFT on the same tasks' support+query data.

    accelerate launch recipes/sft_math.py --config recipes/configs/qwen3_4b_math.yaml \
        trainer.default_local_dir=./outputs/sft_qwen3_4b_math [sft.match_tokens_of=recipes/configs/qwen3_4b_math.yaml]
    lora-maml sft --config-name tiny_cpu trainer.default_local_dir=./outputs/tiny_sft

It shares the model, LoRA, tokenisation, loss, optimizer, logging, checkpoints and periodic
evaluation with FOMAML (lora_maml/train/recipe.py); only the step differs: one AdamW step on a batch
drawn from all tasks pooled. With ``sft.match_tokens_of`` it trains for exactly as many label tokens
as the named FOMAML run (matched compute); otherwise for ``trainer.total_steps`` steps (matched steps).
"""

from __future__ import annotations

import math
import sys

import torch

from lora_maml.data.episodes import MixedBatchSampler
from lora_maml.errors import run_main
from lora_maml.loss import causal_lm_loss_tensors
from lora_maml.optim import apply_gradients, build_optimizer, build_scheduler
from lora_maml.distributed import all_reduce_sum, local_share
from lora_maml.train.recipe import (
    TrainingRecipe,
    fomaml_training_tokens,
    label_tokens,
    load_run_config,
    log,
    run,
)


class SFTRecipe(TrainingRecipe):
    kind = "sft"

    def setup(self) -> None:
        cfg = self.cfg
        self.check_even_share(
            self.micro_batches_per_step(),
            f"the micro-batches per step (sft.batch_size={cfg.sft.batch_size} / meta.query_batch_size="
            f"{cfg.meta.query_batch_size}, rounded up)",
        )
        self.ensure_inputs()
        self.setup_model()
        self.setup_data()
        self.setup_eval_set()
        self.sampler = MixedBatchSampler(
            {t: (len(d.support), len(d.query)) for t, d in self.tasks.items()},
            batch_size=cfg.sft.batch_size,
            seed=cfg.trainer.seed,
        )
        self.total_steps = self.matched_steps() if cfg.sft.match_tokens_of else cfg.trainer.total_steps
        self.optimizer = build_optimizer(self.params, cfg.sft.lr or cfg.meta.outer_lr, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.total_steps)
        resumed = self.resume()
        self.setup_logging(resumed, self.total_steps)

    def matched_steps(self) -> int:
        """Steps whose batches hold at least as many label tokens as the FOMAML run trains on."""
        fomaml = load_run_config(self.cfg.sft.match_tokens_of)
        for section in ("data", "model"):
            if getattr(fomaml, section) != getattr(self.cfg, section):
                raise ValueError(
                    f"sft.match_tokens_of={self.cfg.sft.match_tokens_of}: its {section} section differs from this "
                    f"run's; matched compute needs the same {section} (tokens are counted on this run's data)"
                )
        target = fomaml_training_tokens(fomaml, self.tasks)
        seen, steps = 0, 0
        while seen < target:
            seen += sum(label_tokens(self.example(ref)) for ref in self.sampler.sample(steps))
            steps += 1
        log.info("sft.match_tokens_of: %d label tokens of FOMAML -> %d SFT steps (%d tokens)", target, steps, seen)
        return steps

    def example(self, ref: tuple[str, str, int]) -> dict:
        task, part, index = ref
        return getattr(self.tasks[task], part)[index]

    def extra_state(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def micro_batches_per_step(self) -> int:
        return math.ceil(self.cfg.sft.batch_size / self.cfg.meta.query_batch_size)

    def train_step(self, step: int) -> tuple[dict[str, float], list[dict]]:
        """One AdamW step on the global batch of ``step``, cut into micro-batches of
        ``meta.query_batch_size`` (they bound the memory); each process takes a round-robin share of
        the micro-batches and the loss is normalised by the GLOBAL label-token count, so the summed
        gradient is the same for any number of processes. Sharing whole micro-batches keeps each
        micro-batch's examples (and so its float rounding) the same whatever the number of processes."""
        examples = [self.example(ref) for ref in self.sampler.sample(step)]
        global_tokens = sum(label_tokens(e) for e in examples)
        size = self.cfg.meta.query_batch_size
        micro = [examples[i : i + size] for i in range(0, len(examples), size)]
        params = list(self.params.values())
        batches = []
        loss_sum = torch.zeros((), device=self.dist.device, dtype=torch.float64)
        for chunk in local_share(micro, self.dist.rank, self.dist.world_size):
            batch = self.batch(chunk)
            batches.append(batch)
            loss, n = causal_lm_loss_tensors(self.model, batch)
            (loss * n / max(global_tokens, 1)).backward()
            loss_sum += (loss * n).detach().double()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]  # a process may get no examples
        flat = torch.cat([torch.cat([g.flatten().double() for g in grads]), loss_sum.view(1)])
        all_reduce_sum(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        metrics = {"sft/loss": float(flat[-1]) / max(global_tokens, 1), "sft/tokens": global_tokens}
        update = apply_gradients(params, self.optimizer, self.scheduler, self.cfg.optim.clip_grad)
        metrics |= {f"sft/{k}": v for k, v in update.items()}
        return metrics, batches



def main(argv: list[str] | None = None) -> int:
    return run(SFTRecipe, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
