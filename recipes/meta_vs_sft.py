"""Is meta-learning worth it here? Meta-learners and SFT trained from one base at matched compute, every init
evaluated on one plan, paired statistics.

    python recipes/meta_vs_sft.py --tiny --source synthetic-rules --pretrain "synthetic-rules:named=8,per_task=400" \\
        --config recipes/configs/rules_tiny.yaml --methods fomaml sft_tokens --eval-on holdout   # the README demo
    python recipes/meta_vs_sft.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf         # MATH, ~65 min on 2 CPU cores
    lora-maml experiment --tiny --out /tmp/mvs -- trainer.total_steps=3                  # smoke run, seconds

``--source`` is any ``prepare`` source and ``--model`` any base, so the demo, the real-model study and a study
on your own data run the same phases. Trailing ``key=value`` config overrides (after ``--``) apply to every
training run. Everything goes under ``--out``, which one invocation at a time owns (``atomic.DirectoryLock``); each
phase skips what an earlier invocation finished (a run killed half-way resumes from its checkpoint); every file is
written atomically.

1. Base model. ``--model DIR`` as it is; ``--model FILE.gguf`` dequantised ONCE to fp32 into
   ``<out>/base_model``; ``--tiny``: a tiny random-init Qwen3 (``--tiny-dims``) whose tokenizer is trained on
   the texts of ``--source`` (and ``--pretrain``).
2. Data. ``--source`` prepared into ``<out>/data`` with the config's ratios and ``--data-seed``. Of a MATH
   source, the config's ``data.tasks`` keep the problems whose encoded example fits ``data.max_length``; a
   generated source (``synthetic``, ``synthetic-rules``) or your own ``records:`` is prepared as it is (a rules
   family holds out its unseen tasks, a records source the tasks its ``holdout=`` names). Records without
   answers score the NLL only: ``--verdict-metric`` must then be ``nll`` (or ``nll_gain``), an error otherwise.
3. Pretraining (``--pretrain SOURCE``, optional): a competent base, as real runs start from. The SFT recipe
   trains EVERY weight (``meta.adapter=full``) for ``--pretrain-steps`` at ``--pretrain-lr`` on ``SOURCE``
   (prepared into ``<out>/pretrain_data``), exported to ``<out>/pretrained_model``, the base of every later
   phase. Its loss curve stays in ``<out>/runs/pretrain/metrics.jsonl``.
4. Training, per seed s (``trainer.seed=s``), from the same base: every method of ``--methods``
   (:data:`METHODS`): ``fomaml``, ``maml`` (second order), ``metasgd`` (FOMAML with learned per-tensor inner
   rates), ``sft_steps`` (the same optimizer steps), ``sft_tokens`` (``sft.match_tokens_of`` the FOMAML
   run: as many training label tokens) and ``metaicl`` (MetaICL: ``sft_tokens`` on k-shot prompts,
   ``sft.icl_max_shots`` = the largest ``--n-shots``, so training shows every shot count evaluation uses).
   Each run's config is ``<out>/runs/<name>/config.yaml``; its recipe runs in a subprocess (``--in-process``:
   in this one); ``<out>/runs/<name>.done.json`` marks it finished and holds that config.
5. Evaluation, on tasks split once (``--eval-on holdout``: the family's unseen tasks; ``--validation-tasks K``
   of them, a draw seeded by ``--plan-seed``, only ever tune, the others are reported). SFT's rate
   (``--sft-lrs``, first seed: the best validation ``--verdict-metric`` at the largest n after the run's best
   ``--adapt-grid`` adaptation; without a grid the lowest answer NLL at n = 0) is chosen during training. Every init
   (``base`` with a fresh LoRA, B = 0, and every run) gets its own adaptation: the ``--adapt-grid`` setting
   with the best validation ``--verdict-metric`` at the largest n (a run that learned its inner rates,
   Meta-SGD: those rates). Then ONE test plan (``--n-shots``, ``--episodes`` shot draws per task and n,
   ``--test-per-episode`` problems per task) and the wrong-code control (the largest n, each task adapted on the
   same episode's shots of another test task) score every init (``--jobs`` inits at a time), teacher forcing
   only: ``nll``, ``answer_nll``, ``answer_accuracy`` (and ``*_pre`` at the init's own weights). ``--icl``: every
   init (``--icl base metaicl``: the named ones) also scored with the shots in its prompt and no gradient step
   (rows ``<init>_icl``, test plan and control).
   Files in ``<out>/eval/{rows,validation,control}/``, each cached with what it depends on.
6. Statistics (:mod:`lora_maml.eval.stats`), per n, pooled over the test tasks: per init and per method
   (seeds pooled) the mean of every metric and the gain ``pre - post`` of the NLLs; paired differences A - B
   (seed s with seed s, the same episode and problem), and each init against its wrong-code control. 95% CIs:
   two-way bootstrap of episodes and problems within each task (``--eval-on holdout``: the tasks drawn too).
   A verdict per comparison on ``--verdict-metric``: better or worse needs the CI to exclude 0 AND every
   seed's paired mean on that side. The exact floor of a generated family (its manifest) is shown beside.
   ``<out>/results.json``, ``results.md``, ``few_shot_curve.png``, ``learning_curves.png``
   (:mod:`lora_maml.eval.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NamedTuple

import torch
import yaml
from tqdm.auto import tqdm

from lora_maml.atomic import DirectoryLock, write_text_atomic
from lora_maml.config import Config, config_to_dict, load_config
from lora_maml.data import SUBJECTS
from lora_maml.data.prepare import (MANIFEST, has_answers, list_tasks, prepare, read_manifest, read_source, summary_text,
                                    validate)
from lora_maml.data.records import is_records_source
from lora_maml.data.rules import is_rules_source
from lora_maml.data.tokenize import records_that_fit
from lora_maml.errors import LoraMamlError, run_main
from lora_maml.eval import report, stats
from lora_maml.eval.few_shot import AdaptSettings, evaluate_model
from lora_maml.eval.plan import Episode, episode_records, plan_episodes, plan_fingerprint
from lora_maml.export import merge_and_save
from lora_maml.load_trained import load_trained, resolve_model_path
from lora_maml.models import dequantize_gguf, load_tokenizer
from lora_maml.tiny_model import build_tiny_model, texts_from_records, tiny_qwen3_dims
from recipes import fomaml_math, sft_math
from recipes._arg_types import positive_float, positive_int

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
DEFAULT_CONFIG = RECIPES_DIR / "configs" / "smollm2_135m_math.yaml"
TINY_CONFIG = RECIPES_DIR / "configs" / "tiny_cpu.yaml"
DEFAULT_MATH = REPO_ROOT.parent / "shared" / "data" / "MATH.tar.gz"
DEFAULT_OUT = REPO_ROOT / "outputs" / "meta_vs_sft"
# method -> (training recipe, the config keys it sets). sft_tokens and metaicl are matched to the same seed's
# fomaml run, and metaicl trains on up to the largest --n-shots shots (set in run_config).
METHODS: dict[str, tuple[ModuleType, dict[str, Any]]] = {
    "fomaml": (fomaml_math, {}),
    "maml": (fomaml_math, {"meta.algorithm": "maml", "model.attn_implementation": "eager",
                           "model.enable_gradient_checkpointing": False, "model.compile": False}),
    "metasgd": (fomaml_math, {"meta.learn_inner_lr": True}),
    "sft_steps": (sft_math, {"sft.match_tokens_of": None, "sft.icl_max_shots": 0}),
    "sft_tokens": (sft_math, {"sft.icl_max_shots": 0}),
    "metaicl": (sft_math, {}),
}
ROW_KEYS = ("task", "n", "seed", "id", "shot_ids", "tokens", "nll", "nll_pre", "answer_nll", "answer_nll_pre",
            "answer_accuracy", "answer_tokens", "invalid")
# Keys this script sets (or relies on) per run; a user override of one would silently break the design.
CONTROLLED = ("model.partial_pretrain", "model.gguf_file", "model.build_tiny_if_missing", "data.data_dir",
              "data.source", "trainer.seed", "trainer.default_local_dir", "trainer.experiment_name",
              "trainer.resume_mode", "sft.match_tokens_of", "sft.icl_max_shots", "meta.algorithm",
              "meta.learn_inner_lr", "meta.adapter")
BASE_SOURCE_FILE = "meta_vs_sft_source.json"
RUN_CONFIG = "config.yaml"


# --- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recipes/meta_vs_sft.py",
        description="Meta-learning (FOMAML, MAML, Meta-SGD) vs multi-task SFT (matched steps, matched tokens) as an "
        "initialisation for few-shot adaptation: train from one base, evaluate on one plan, paired statistics. "
        "Resumable.",
        epilog="key=value overrides go after '--' (or before the options); they apply to every training run.",
    )
    p.add_argument("--model", help="base model: a Hugging Face model directory or a .gguf file (dequantised once)")
    p.add_argument("--tiny", action="store_true", help="a tiny random-init Qwen3 as the base (no --model)")
    p.add_argument("--tiny-dims", default="128,4", metavar="HIDDEN,LAYERS",
                   help="size of the --tiny model (default 128,4: 4 layers learn the rules family's lookup)")
    p.add_argument("--source", help="data: any `lora-maml prepare --source`, e.g. records:my_tasks.jsonl,holdout=a+b "
                   "(default: the MATH archive "
                   f"{DEFAULT_MATH}; with --tiny: synthetic)")
    p.add_argument("--pretrain", metavar="SOURCE", help="first train every weight of the base on this source's text "
                   "(e.g. synthetic-rules:named=8,per_task=400)")
    p.add_argument("--pretrain-steps", type=int, default=500, help="pretraining steps (default 500)")
    p.add_argument("--pretrain-lr", type=positive_float, default=1e-3, help="pretraining learning rate (default 1e-3)")
    p.add_argument("--config", help=f"training config (default {DEFAULT_CONFIG.relative_to(REPO_ROOT)}; "
                   f"with --tiny {TINY_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), default=["fomaml", "sft_steps", "sft_tokens"],
                   help="what to train from the base (default: fomaml sft_steps sft_tokens; none given: nothing, the "
                   "base alone is evaluated, e.g. by gradient and with --icl in context)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--n-shots", nargs="+", type=int, default=[5, 10], help="shot counts (default 5 10)")
    p.add_argument("--eval-on", choices=["all", "holdout"], default="all",
                   help="evaluate the config's tasks (all) or only tasks never seen in meta-training (holdout)")
    p.add_argument("--episodes", type=int, default=2, help="shot draws per task and n (default 2)")
    p.add_argument("--test-per-episode", type=int, default=8, help="scored problems per task (default 8)")
    p.add_argument("--plan-seed", type=int, default=0, help="seed of the scored problems and shot draws (default 0)")
    p.add_argument("--validation-tasks", type=int, default=0, metavar="K",
                   help="with --eval-on holdout: K of the held-out tasks (a seeded draw) choose each init's adaptation "
                   "(--adapt-grid) and SFT's rate (--sft-lrs); they are never reported (default 0: no tuning)")
    p.add_argument("--adapt-grid", nargs="+", default=[], metavar="LR:STEPS",
                   help="adaptations tried per init on the validation tasks at the largest n (the config's inner "
                   "optimizer and micro-batch); the best on --verdict-metric is used on the test tasks (default: "
                   "the config's inner loop for every init)")
    p.add_argument("--sft-lrs", nargs="+", type=positive_float, default=[], metavar="LR",
                   help="SFT (and MetaICL) learning rates trained with the first seed; the one with the best "
                   "validation --verdict-metric at the largest n after its best --adapt-grid adaptation (without a grid: the "
                   "lowest answer NLL at n = 0) trains the other seeds (default: the config's sft.lr)")
    p.add_argument("--icl", nargs="*", metavar="INIT",
                   help="also score these inits ('base' and --methods names; none given: every init) with the n "
                   "shots in the prompt and no gradient step (in-context learning: rows '<init>_icl', on the test "
                   "plan and the wrong-code control)")
    p.add_argument("--data-seed", type=int, default=42, help="seed of the data (generation and split; default 42)")
    p.add_argument("--tiny-per-task", type=int, default=40, help="problems per task of --source synthetic (default 40)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], help="evaluation dtype (default: model.dtype)")
    p.add_argument("--verdict-metric", default="nll", choices=[name for name, _ in report.series_names()],
                   help="the metric verdicts are given on (default nll)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--in-process", action="store_true", help="run the training recipes in this process, not subprocesses")
    p.add_argument("--jobs", type=int, default=1, help="training runs, and then inits evaluated, at a time "
                   "(processes sharing OMP_NUM_THREADS; default 1). Runs and inits are independent: 2 about halves "
                   "the time on 2 cores")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training run")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.tiny == (args.model is not None):
        raise ValueError("give exactly one of --model PATH or --tiny")
    if args.tiny:
        tiny_dims(args.tiny_dims)
    for flag, value in (("--episodes", args.episodes), ("--test-per-episode", args.test_per_episode),
                        ("--n-boot", args.n_boot), ("--tiny-per-task", args.tiny_per_task),
                        ("--pretrain-steps", args.pretrain_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.jobs < 1 or (args.jobs > 1 and args.in_process):
        raise ValueError(f"--jobs {args.jobs}: expected >= 1, and 1 with --in-process")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: duplicates in {args.seeds}")
    if len(set(args.methods)) != len(args.methods):
        raise ValueError(f"--methods: duplicates in {args.methods}")
    for matched in ("sft_tokens", "metaicl"):
        if matched in args.methods and "fomaml" not in args.methods:
            raise ValueError(f"--methods: {matched} is matched to the fomaml run's tokens; add fomaml")
    if min(args.n_shots) < 0 or len(set(args.n_shots)) != len(args.n_shots):
        raise ValueError(f"--n-shots {args.n_shots}: expected distinct integers >= 0")
    if "metaicl" in args.methods and max(args.n_shots) < 1:
        raise ValueError(f"--methods metaicl trains on up to the largest --n-shots shots: {args.n_shots} has none >= 1")
    if args.icl is not None:
        unknown = [name for name in args.icl if name != "base" and name not in args.methods]
        if unknown:
            raise ValueError(f"--icl {' '.join(unknown)}: expected 'base' or names from --methods {args.methods}")
    if "metaicl" in args.methods and "metaicl" not in in_context_methods(args):
        raise ValueError("--methods metaicl learns to read shots in its prompt: add --icl (or --icl metaicl ...) to "
                         "score it so")
    tuning = args.adapt_grid or args.sft_lrs
    if args.validation_tasks < 0 or bool(tuning) != bool(args.validation_tasks) or (tuning and args.eval_on != "holdout"):
        raise ValueError("--adapt-grid / --sft-lrs are chosen on --validation-tasks K > 0 held-out tasks: give both, "
                         "with --eval-on holdout")
    adapt_grid(args.adapt_grid)
    if len(set(args.sft_lrs)) != len(args.sft_lrs):
        raise ValueError(f"--sft-lrs {args.sft_lrs}: expected distinct rates")
    for item in args.overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value (e.g. trainer.total_steps=100)")
        if key in CONTROLLED:
            raise ValueError(f"override {item!r}: {key} is managed by this script ({', '.join(CONTROLLED)})")


def adapt_grid(specs: Sequence[str]) -> list[tuple[float, int]]:
    """``--adapt-grid LR:STEPS ...`` → ``[(lr, steps), ...]``."""
    grid = []
    for spec in specs:
        lr, sep, steps = spec.partition(":")
        try:
            entry = (positive_float(lr), positive_int(steps))
        except ValueError:
            entry = None
        if not sep or entry is None:
            raise ValueError(f"--adapt-grid {spec!r}: expected LR:STEPS with LR > 0 and STEPS >= 1, e.g. 1e-2:3")
        grid.append(entry)
    if len(set(grid)) != len(grid):
        raise ValueError(f"--adapt-grid {specs}: duplicates")
    return grid


def tiny_dims(spec: str) -> dict[str, int]:
    """``--tiny-dims HIDDEN,LAYERS`` → the tiny Qwen3's sizes (:func:`lora_maml.tiny_model.tiny_qwen3_dims`)."""
    try:
        hidden, layers = (int(v) for v in spec.split(","))
        return tiny_qwen3_dims(hidden, layers)
    except ValueError:
        raise ValueError(f"--tiny-dims {spec!r}: expected HIDDEN,LAYERS with HIDDEN a multiple of 64 and "
                         "LAYERS >= 1, e.g. 128,4") from None


# --- small helpers ---------------------------------------------------------------------------
@contextlib.contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"== {name}: {timings[name]:.1f} s", flush=True)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_math_source(source: str) -> bool:
    return source != "synthetic" and not is_rules_source(source) and not is_records_source(source)


def run_name(method: str, seed: int) -> str:
    return f"{method}_{seed}"


def swept_name(method: str, lr: float, seed: int) -> str:
    """The run directory of an SFT method trained at rate ``lr`` of its ``--sft-lrs`` sweep."""
    return f"{method}_lr{lr:g}_{seed}"


def in_context_methods(args: argparse.Namespace) -> list[str]:
    """The methods (``base`` included) whose inits ``--icl`` also scores in context: none without the flag, every
    one with the flag alone."""
    if args.icl is None:
        return []
    return [m for m in ["base", *args.methods] if not args.icl or m in args.icl]


# --- 1. base model ---------------------------------------------------------------------------
def base_model(args: argparse.Namespace, out: Path) -> Path:
    """The base model directory every run starts from (see the module docstring, 1)."""
    target = out / "base_model"
    if args.tiny:
        made_from = {"tiny": tiny_dims(args.tiny_dims), "source": args.source, "pretrain": args.pretrain,
                     "data_seed": args.data_seed}
    else:
        model = Path(args.model).expanduser().resolve()
        if model.is_dir():
            if not (model / "config.json").is_file():
                raise ValueError(f"--model {model}: a directory without config.json (expected a Hugging Face model dir)")
            print(f"base model: {model} (used as it is)")
            return model
        if not model.is_file() or model.suffix != ".gguf":
            raise ValueError(f"--model {model}: expected a model directory or an existing .gguf file")
        made_from = {"gguf": str(model), "bytes": model.stat().st_size}
    stamp = read_json(target / BASE_SOURCE_FILE)
    if stamp is not None:
        if stamp != made_from:
            raise ValueError(f"{target} was made from {stamp}, not {made_from}; use another --out")
        print(f"base model: {target} (made earlier, skipped)")
        return target
    if args.tiny:
        texts = []
        for spec in filter(None, (args.source, args.pretrain)):
            texts += texts_from_records(read_source(spec, seed=args.data_seed, synthetic_per_task=args.tiny_per_task)[0])
        build_tiny_model(target, texts, overwrite=True, **made_from["tiny"])
        print(f"base model: tiny random-init Qwen3 at {target}")
    else:
        print(f"base model: dequantising {model} to fp32 (once) ...", flush=True)
        dequantize_gguf(model, target)
        print(f"base model: {target}")
    write_json(target / BASE_SOURCE_FILE, made_from)  # last: its presence means the model is complete
    return target


# --- 2. data ---------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, cfg: Config, base_dir: Path, data_dir: Path, source: str) -> Path:
    """``data_dir``: ``source`` prepared with the config's ratios (a MATH source length-filtered first)."""
    stamp_path = data_dir.with_name(f"{data_dir.name}_settings.json")
    math_source = is_math_source(source)
    if math_source and Path(source).expanduser().exists():  # a hub id stays as it is
        source = str(Path(source).expanduser().resolve())
    settings = {"source": source, "tokenizer": str(base_dir), "tasks": cfg.data.tasks if math_source else None,
                "max_length": cfg.data.max_length, "support_ratio": cfg.data.support_ratio,
                "query_ratio": cfg.data.query_ratio, "seed": args.data_seed, "per_task": args.tiny_per_task}
    stamp = read_json(stamp_path)
    if (data_dir / MANIFEST).is_file() and stamp is not None:
        if stamp != settings:
            raise ValueError(f"{data_dir} was prepared with {stamp}, not {settings}; use another --out")
        print(f"data: {data_dir} (prepared earlier, skipped)")
        return data_dir
    write_json(stamp_path, settings)  # first: a directory prepared after it is known to match it
    records, tasks, holdout, description = read_source(source, seed=args.data_seed,
                                                       synthetic_per_task=args.tiny_per_task)
    if math_source:
        records, description["length_filter"] = fitting_math_records(records, cfg, base_dir)
    manifest = prepare(records, data_dir, support_ratio=cfg.data.support_ratio, query_ratio=cfg.data.query_ratio,
                       seed=args.data_seed, holdout_tasks=holdout, source_description=description, overwrite=True,
                       tasks=tasks)
    print(summary_text(manifest), end="")
    validate(data_dir)
    return data_dir


def check_verdict_metric(metric: str, data_dir: Path) -> None:
    """Records without answers (a ``records:`` source) score the NLL only: the verdicts, and the tuning that
    follows them, must be on it. Checked once the data is prepared, before anything trains."""
    if not has_answers(data_dir) and metric.removesuffix("_gain") != "nll":
        raise ValueError(f"--verdict-metric {metric}: the records of --source have no answers, so answer_nll and "
                         "answer_accuracy are not scored; use --verdict-metric nll (or nll_gain)")


def fitting_math_records(records: Sequence[dict], cfg: Config, base_dir: Path) -> tuple[list[dict], dict]:
    """The MATH records of the config's tasks whose encoded example fits ``data.max_length`` (the base's
    tokenizer), the other subjects' as they are; and ``{"max_length", "kept", "total"}`` per task."""
    tasks = list(cfg.data.tasks or SUBJECTS)
    tokenizer = load_tokenizer(base_dir)
    # The other subjects are kept unfiltered only because prepare splits every subject; nothing reads them.
    kept = [r for r in records if r["subject"] not in tasks]
    counts: dict[str, dict[str, int]] = {"kept": {}, "total": {}}
    for task in tasks:
        of_task = [r for r in records if r["subject"] == task]
        fit, _ = records_that_fit(of_task, tokenizer, max_length=cfg.data.max_length,
                                  desc=f"{task}: length filter (<= {cfg.data.max_length} tokens)")
        kept += fit
        counts["kept"][task], counts["total"][task] = len(fit), len(of_task)
        print(f"data: {task}: {len(fit)} of {len(of_task)} problems fit data.max_length={cfg.data.max_length}")
    return kept, {"max_length": cfg.data.max_length, **counts}


# --- 3 and 4. training -----------------------------------------------------------------------
@dataclass
class Run:
    """One training run: the recipe that trains it, its config and how it is named in the output."""

    recipe: ModuleType
    cfg: Config
    label: str

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.trainer.default_local_dir)

    @property
    def config_path(self) -> Path:
        return self.run_dir / RUN_CONFIG

    @property
    def marker(self) -> Path:
        return self.run_dir.with_name(f"{self.run_dir.name}.done.json")

    @property
    def log(self) -> Path:
        return self.run_dir.with_name(f"{self.run_dir.name}.log")


def finished(run: Run) -> bool:
    """Whether ``run``'s done marker says it finished with the same config (another config: an error)."""
    done = read_json(run.marker)
    if done is None:
        return False
    was, now = done.get("config"), config_to_dict(run.cfg)
    if was != now:
        changed = "no config recorded" if was is None else "; ".join(
            f"{section}.{key}: was {was.get(section, {}).get(key)!r}, now {value!r}"
            for section, values in now.items() for key, value in values.items()
            if was.get(section, {}).get(key) != value)
        raise ValueError(f"{run.run_dir} was trained with other arguments ({run.marker}: {changed}); use another "
                         "--out or delete both to retrain")
    print(f"{run.label}: finished earlier, skipped ({run.run_dir})")
    return True


# The scheduler stays in this program: it is the one place that launches training recipes, and how runs
# are resumed, refused and stopped is part of this experiment's story, not a library service.
def train_runs(runs: Sequence[Run], *, jobs: int, in_process: bool) -> None:
    """Train the unfinished ``runs``: one by one in this process (``in_process``), or as subprocesses
    (``python -m <recipe> --config <run dir>/config.yaml``), ``jobs`` at a time, sharing ``OMP_NUM_THREADS``
    (default: every core) between them; a parallel run's output goes to ``<run dir>.log``. A run that fails
    stops the experiment (rerun to resume it).

    SIGTERM / SIGINT sent to this program reach every running recipe at once (each finishes its step and
    saves) and unwind this program, which waits for them all: a repeated signal is passed on again, never
    cuts the wait short, so no run directory is left to an orphan still writing it when this is rerun."""
    todo = [run for run in runs if not finished(run)]
    for run in runs:  # a finished run's too: sft_tokens reads its fomaml run's config
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.config_path, yaml.safe_dump(config_to_dict(run.cfg), sort_keys=False))
    jobs = min(jobs, max(len(todo), 1))
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // jobs)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    running: list[tuple[Run, subprocess.Popen, float, IO | None]] = []
    signalled = unwinding = False

    def forward(signum: int, frame) -> None:
        nonlocal signalled
        first, signalled = not (signalled or unwinding), True
        for _, process, _, _ in running:
            if process.poll() is None:
                process.send_signal(signum)
        if first:  # unwind as run_main's handler and Ctrl-C do
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    # In-process runs stop on these signals themselves (the trainer's handler).
    previous = {} if in_process else {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while todo or running:
            while todo and (in_process or len(running) < jobs):
                run = todo.pop(0)
                command = ["--config", str(run.config_path)]
                print(f"{run.label}: {run.recipe.__name__} {' '.join(command)}", flush=True)
                start = time.perf_counter()
                if in_process:  # the same program as the subprocess, called in this process
                    mark_done(run, run.recipe.main(command), start, log=None)
                    continue
                log = open(run.log, "w") if jobs > 1 else None
                process = subprocess.Popen([sys.executable, "-m", run.recipe.__name__, *command], env=env,
                                           stdout=log, stderr=subprocess.STDOUT if log else None)
                running.append((run, process, start, log))
            for item in list(running):
                run, process, start, log = item
                if process.poll() is not None:
                    running.remove(item)
                    if log:
                        log.close()
                    mark_done(run, process.returncode, start, log=run.log if log else None)
            if running:
                time.sleep(0.5)
    finally:
        unwinding = True  # from here on a signal is passed on, never raised: every child is waited for
        if not signalled:  # a failed run: the others are stopped the same way (they finish their step and save)
            for _, process, _, _ in running:
                process.terminate()
        for _, process, _, log in running:
            process.wait()
            if log:
                log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def mark_done(run: Run, code: int | None, start: float, *, log: Path | None) -> None:
    """Mark ``run`` finished (its config and time), or raise for a failed run (exit code ``code``)."""
    if code:
        where = f" (its output: {log})" if log else " (output above)"
        raise LoraMamlError(f"{run.label}: {run.recipe.__name__} exited with {code}{where}; rerun this command to "
                            f"resume it from its last checkpoint in {run.run_dir}")
    write_json(run.marker, {"config": config_to_dict(run.cfg), "seconds": round(time.perf_counter() - start, 1)})
    print(f"{run.label}: trained in {time.perf_counter() - start:.1f} s", flush=True)


def pretrain(args: argparse.Namespace, config: Path, base_dir: Path, data_dir: Path, out: Path) -> tuple[Path, float]:
    """Full-parameter SFT of the base on ``--pretrain`` text, exported as a plain model directory; returns
    it and the last logged training loss (see the module docstring, 3)."""
    run_dir, target = out / "runs" / "pretrain", out / "pretrained_model"
    cfg = load_config(config, args.overrides, {
        "model.partial_pretrain": str(base_dir), "model.gguf_file": None, "model.build_tiny_if_missing": False,
        "data.data_dir": str(data_dir), "data.source": args.pretrain, "meta.adapter": "full",
        "trainer.total_steps": args.pretrain_steps, "sft.lr": args.pretrain_lr, "sft.match_tokens_of": None,
        "sft.icl_max_shots": 0,
        "trainer.save_freq": args.pretrain_steps, "trainer.test_freq": args.pretrain_steps,
        "trainer.default_local_dir": str(run_dir), "trainer.experiment_name": "meta_vs_sft_pretrain", "trainer.seed": 0,
    })
    train_runs([Run(sft_math, cfg, "pretrain (all weights)")], jobs=1, in_process=args.in_process)
    if not (target / "config.json").is_file():
        # This run's own config (the user's file and overrides) decides, as it did for training.
        merge_and_save(run_dir, target, overwrite=True, trust_remote_code=cfg.model.trust_remote_code)
    losses = [r["sft/loss"] for r in report.read_metrics(run_dir) if "sft/loss" in r]
    print(f"pretrained base: {target} (last sft/loss {losses[-1]:.4f} after {args.pretrain_steps} steps)")
    return target, losses[-1]


def run_config(config: Path, overrides: Sequence[str], shared: Mapping[str, Any], out: Path, method: str,
               seed: int, name: str, max_shots: int) -> Config:
    """The config of run ``name``: the user's overrides, then what this script sets (``shared``, the method's
    keys, the seed and the run directory; ``max_shots``: the largest --n-shots, MetaICL's most shots)."""
    settings = {**shared, **METHODS[method][1], "trainer.seed": seed,
                "trainer.default_local_dir": str(out / "runs" / name), "trainer.experiment_name": f"meta_vs_sft_{name}"}
    if method in ("sft_tokens", "metaicl"):
        settings["sft.match_tokens_of"] = str(out / "runs" / run_name("fomaml", seed) / RUN_CONFIG)
    if method == "metaicl":
        settings["sft.icl_max_shots"] = max_shots
    return load_config(config, overrides, settings)


def train_all(args: argparse.Namespace, config: Path, shared: Mapping[str, Any], out: Path,
              plan: "EvalPlan", evaluator: "Evaluator") -> tuple[dict[str, Path], dict]:
    """Train every (method, seed), ``--jobs`` at a time; return ``{name: run dir}`` and the SFT sweep.

    SFT matched in tokens is matched to the FOMAML run's config (written before anything trains), so it need
    not wait for that run. With ``--sft-lrs`` an SFT method (``sft_*``, ``metaicl``) is first trained at every
    rate with the first seed (beside everything else), the rate whose run scores best on the validation tasks
    is kept (that run is the first seed's), and the other seeds train at it. A swept method's run directories
    carry their rate (``sft_tokens_lr0.01_1``): a wider sweep that changes the choice trains the other seeds
    anew beside the runs at the old rate. The score is what the meta-learners
    are judged on: ``--verdict-metric`` at the largest n after the run's best ``--adapt-grid`` adaptation
    (without a grid: answer NLL at n = 0, the multi-task objective, which cannot tell rates apart when every
    rate reaches the floor, and adaptation can); for MetaICL, with the shots in the prompt and no gradient
    step, the way it is used."""
    swept = [m for m in args.methods if (m.startswith("sft") or m == "metaicl") and args.sft_lrs]
    first, *rest = args.seeds

    def run(method: str, seed: int, name: str, extra: Mapping[str, Any] = {}) -> Run:
        return Run(METHODS[method][0], run_config(config, args.overrides, {**shared, **extra}, out, method, seed, name,
                                                  max(args.n_shots)), name)

    batch = [run(m, seed, run_name(m, seed)) for seed in args.seeds for m in args.methods if m not in swept]
    sweep_runs = {(m, lr): run(m, first, swept_name(m, lr, first), {"sft.lr": lr}) for m in swept for lr in args.sft_lrs}
    train_runs([*batch, *sweep_runs.values()], jobs=args.jobs, in_process=args.in_process)
    runs = {r.run_dir.name: r.run_dir for r in batch}
    sweep: dict[str, dict] = {}
    grid, criterion = adapt_grid(args.adapt_grid), args.verdict_metric.removesuffix("_gain")
    for method in swept:
        scores = {}
        in_context = method == "metaicl"
        for lr in args.sft_lrs:
            path = sweep_runs[(method, lr)].run_dir
            if in_context:
                scores[lr] = in_context_score(evaluator, path, plan, criterion)
            elif grid:  # SFT + its best adaptation, on what the meta-learners are judged on
                setting, adaptation = choose_adaptation(evaluator, path.name, path, plan, grid, criterion)
                scores[lr] = next(e for e in adaptation["validation"] if (e["lr"], e["steps"]) == setting)[criterion]
            else:
                scores[lr] = evaluator.validation_score(path, plan)
        how = (f"{criterion} at n = {plan.tune_n} with the shots in the prompt" if in_context
               else f"{criterion} at n = {plan.tune_n} after its best --adapt-grid adaptation" if grid
               else "answer_nll at n = 0")
        better = max if (grid or in_context) and criterion not in report.LOWER_IS_BETTER else min
        chosen = better(scores, key=lambda lr: scores[lr])
        sweep[method] = {"criterion": how, "validation": {f"{lr:g}": v for lr, v in scores.items()}, "chosen_lr": chosen}
        print(f"{method}: sft.lr {chosen:g} chosen on the validation tasks ({how}: "
              + ", ".join(f"{lr:g} -> {v:.4f}" for lr, v in scores.items()) + ")")
        runs[run_name(method, first)] = sweep_runs[(method, chosen)].run_dir
        later = {seed: run(method, seed, swept_name(method, chosen, seed), {"sft.lr": chosen}) for seed in rest}
        train_runs(list(later.values()), jobs=args.jobs, in_process=args.in_process)
        runs |= {run_name(method, seed): r.run_dir for seed, r in later.items()}
    return {run_name(m, seed): runs[run_name(m, seed)] for seed in args.seeds for m in args.methods}, sweep


# --- 5. evaluation ---------------------------------------------------------------------------
WRONG_CODE = report.WRONG_CODE  # suffix of an init's rows adapted on another task's shots (the control)
ICL = report.ICL  # suffix of an init's rows scored with the shots in the prompt, no gradient step


class Job(NamedTuple):
    """One scoring of an init: its rows cached in ``<out>/eval/<file>.json``; ``lr`` / ``steps`` None: the
    config's inner loop; ``in_context``: the shots in the prompt too."""

    file: str
    episodes: Sequence[Episode]
    lr: float | None = None
    steps: int | None = None
    in_context: bool = False


@dataclass
class EvalPlan:
    """Validation tasks (tuning only), test tasks (reported) and the episodes of each (see the module docstring)."""

    validation: list[Episode]
    test: list[Episode]
    control: list[Episode]
    tune_n: int
    records: dict[str, dict]


def wrong_code_episodes(episodes: Sequence[Episode], n: int) -> list[Episode]:
    """The control: each task's episodes at ``n`` with the shots of the same episode of ANOTHER task (task i
    takes task i+1's, in sorted order), the scored problems unchanged. A gain that comes from reading the task
    from its shots vanishes here; one from what all tasks share does not."""
    at_n = {(ep.task, ep.seed): ep for ep in episodes if ep.n == n}
    tasks = sorted({task for task, _ in at_n})
    partner = dict(zip(tasks, tasks[1:] + tasks[:1]))
    return [replace(ep, shot_ids=at_n[(partner[ep.task], ep.seed)].shot_ids) for ep in episodes if ep.n == n]


def eval_plan(args: argparse.Namespace, cfg: Config, data_dir: Path) -> EvalPlan:
    """The plans of every evaluation: validation tasks (``--validation-tasks``, a draw seeded by ``--plan-seed``)
    at n = 0 and the largest n; the other tasks at every n; the wrong-code control at the largest n."""
    if args.eval_on == "holdout":
        tasks = list_tasks(data_dir)["holdout"]
        if len(tasks) < args.validation_tasks + 2:
            raise ValueError(f"--eval-on holdout: {data_dir} has {len(tasks)} held-out tasks; need --validation-tasks "
                             f"({args.validation_tasks}) + at least 2 to report")
    else:
        tasks = list(cfg.data.tasks) if cfg.data.tasks else list_tasks(data_dir)["few_shot_eval"]
    validation = sorted(random.Random(f"validation-tasks:{args.plan_seed}").sample(tasks, args.validation_tasks))
    test_tasks = [t for t in tasks if t not in validation]
    tune_n = max(args.n_shots)
    test = plan_episodes(data_dir, test_tasks, args.n_shots, args.episodes, args.test_per_episode, args.plan_seed)
    val = (plan_episodes(data_dir, validation, sorted({0, tune_n}), args.episodes, args.test_per_episode,
                         args.plan_seed) if validation else [])
    control = wrong_code_episodes(test, tune_n) if args.eval_on == "holdout" and tune_n > 0 else []
    short = sorted({ep.task for ep in [*test, *val] if len(ep.test_ids) < args.test_per_episode})
    if short:
        # Equal cluster sizes make the pooled episode means the mean over rows (module docstring, 6).
        raise ValueError(f"tasks {short[:5]} have fewer than --test-per-episode={args.test_per_episode} test problems "
                         f"to score; lower --test-per-episode")
    return EvalPlan(val, test, control, tune_n, episode_records(data_dir, [*test, *val]))


def weights_stamp(path: Path) -> list:
    """(name, size, mtime) of the files an init loads: a retrained run or a rebuilt base is evaluated again."""
    source = Path(resolve_model_path(path)[1])
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


@dataclass
class Evaluator:
    """Scores inits on plans, teacher forcing only (:data:`ROW_KEYS`); every result is cached in
    ``<out>/eval/<kind>/<file>.json`` with what it depends on (weights, plan, settings, dtype)."""

    cfg: Config
    out: Path
    base_dir: Path
    dtype: str
    device: str
    progress: bool = True  # a progress bar per scored plan

    def settings(self, init, lr: float | None, steps: int | None, in_context: bool = False) -> AdaptSettings:
        """The config's inner loop with ``lr`` / ``steps`` (None: the config's); a Meta-SGD run adapts with
        the rates it learned, whatever ``lr``. ``in_context``: the shots in the prompt too."""
        meta, data = self.cfg.meta, self.cfg.data
        return AdaptSettings(lr=init.inner_lrs or (meta.inner_lr if lr is None else lr),
                             steps=meta.num_inner_steps if steps is None else steps, batch_size=meta.inner_batch_size,
                             optimizer=meta.inner_optimizer, max_length=data.max_length, truncation=data.truncation,
                             shots_in_prompt=in_context)

    def rows(self, name: str, path: Path, jobs: Sequence[Job], records: Mapping[str, dict]) -> list[list[dict]]:
        """For each :class:`Job`: the rows of init ``name`` at ``path`` (the base with a fresh LoRA shaped like
        the runs', B = 0), loaded once for all jobs not cached yet."""
        results: list[list[dict] | None] = []
        todo = []
        for file, episodes, lr, steps, in_context in jobs:
            identity = {"init": name, "path": str(path), "weights": weights_stamp(path), "dtype": self.dtype,
                        "plan_sha256": plan_fingerprint(episodes), "lr": lr, "steps": steps, "in_context": in_context,
                        "inner_loop": [self.cfg.meta.inner_optimizer, self.cfg.meta.inner_batch_size,
                                       self.cfg.data.max_length, self.cfg.data.truncation]}
            saved = read_json(self.out / "eval" / f"{file}.json")
            results.append(saved["rows"] if saved is not None and saved["identity"] == identity else None)
            if results[-1] is None:
                todo.append((len(results) - 1, file, episodes, lr, steps, in_context, identity))
        if not todo:
            print(f"{name}: evaluated earlier, skipped")
        else:
            started = time.perf_counter()
            init = load_trained(str(path), dtype=self.dtype, device=self.device,
                                lora=self.cfg.model.lora if name == "base" else None,
                                trust_remote_code=self.cfg.model.trust_remote_code)
            for i, file, episodes, lr, steps, in_context, identity in todo:
                start = time.perf_counter()
                rows = evaluate_model(init, episodes, records, self.settings(init, lr, steps, in_context), generate=False,
                                      desc=f"{name} {file}", progress=self.progress)
                results[i] = [{k: r[k] for k in ROW_KEYS} for r in rows]
                write_json(self.out / "eval" / f"{file}.json", report.jsonable(
                    {"identity": identity, "seconds": round(time.perf_counter() - start, 1), "rows": results[i]}))
            del init
            gc.collect()  # free this init before the next one loads
            print(f"{name}: evaluated in {time.perf_counter() - started:.1f} s")
        return results

    def validation_score(self, path: Path, plan: EvalPlan) -> float:
        """Mean answer NLL (NLL where there is no answer) of an init at n = 0 on the validation tasks."""
        at_0 = [ep for ep in plan.validation if ep.n == 0]
        (rows,) = self.rows(path.name, path, [Job(f"validation/{path.name}_n0", at_0)], plan.records)
        return answer_nll(rows)


def answer_nll(rows: Sequence[dict]) -> float:
    """The tuning criterion: mean answer-token NLL of the rows (whole-reference NLL for rows without an answer);
    a proper score, smoother than accuracy on a few validation problems."""
    key = "answer_nll" if any(r.get("answer_nll") is not None and math.isfinite(r["answer_nll"]) for r in rows) else "nll"
    return stats.finite_mean(r[key] for r in rows if r.get(key) is not None)


def choose_adaptation(evaluator: Evaluator, name: str, path: Path, plan: EvalPlan, grid: Sequence[tuple[float, int]],
                      criterion: str) -> tuple[tuple[float, int], dict]:
    """The ``grid`` setting ``(lr, steps)`` with the best validation ``criterion`` at the largest n for init
    ``name`` at ``path``, and ``{"criterion", "validation": [{"lr", "steps", <metric>: mean, "invalid": rows}]}``.
    A setting that diverged on some episode (rows marked invalid, left out of its means) is never chosen over
    one that did not: its mean would be over the episodes it survived. The rows are cached under the run
    directory's name (the base's: ``base``): a swept SFT run is scored once, and the same rows serve it as a
    candidate rate and, once chosen, as its method's init."""
    tuned = [ep for ep in plan.validation if ep.n == plan.tune_n]
    cached = name if path == evaluator.base_dir else path.name
    scored = evaluator.rows(cached, path, [Job(f"validation/{cached}_lr{lr:g}_k{k}", tuned, lr, k) for lr, k in grid],
                            plan.records)
    scores = {setting: {key: stats.finite_mean(r[key] for r in rows if r[key] is not None)
                        for key in report.TEACHER_FORCED} | {"invalid": sum(bool(r.get("invalid")) for r in rows)}
              for setting, rows in zip(grid, scored)}
    sign = -1 if criterion in report.LOWER_IS_BETTER else 1
    chosen = max(scores, key=lambda setting: (-scores[setting]["invalid"], sign * scores[setting][criterion]))
    return chosen, {"criterion": criterion, "validation": [{"lr": lr, "steps": k, **v} for (lr, k), v in scores.items()]}


def in_context_score(evaluator: Evaluator, path: Path, plan: EvalPlan, criterion: str) -> float:
    """The validation ``criterion`` of the run at ``path`` at the largest n with the shots in the prompt and no
    gradient step (how a MetaICL run is used)."""
    tuned = [ep for ep in plan.validation if ep.n == plan.tune_n]
    (rows,) = evaluator.rows(path.name, path, [Job(f"validation/{path.name}{ICL}", tuned, None, 0, True)], plan.records)
    return stats.finite_mean(r[criterion] for r in rows if r[criterion] is not None)


def evaluate_init(evaluator: Evaluator, name: str, path: Path, plan: EvalPlan, grid: Sequence[tuple[float, int]],
                  criterion: str, icl: bool = False) -> dict:
    """One init: its adaptation chosen on the validation tasks (:func:`choose_adaptation`; without a grid the
    config's), then its rows on the test plan and on the wrong-code control with it; with ``icl`` also both
    with the shots in the prompt and no gradient step (nothing to tune). A run that learned its inner rates
    (Meta-SGD) adapts as it was meta-trained: its rates, the config's steps (a grid would overwrite what it
    learned)."""
    learned = name != "base" and load_config(path / RUN_CONFIG).meta.learn_inner_lr
    chosen: tuple[float | None, int | None] = (None, None)  # None: the config's
    adaptation: dict[str, Any] = {}
    if grid and plan.validation and not learned:
        chosen, adaptation = choose_adaptation(evaluator, name, path, plan, grid, criterion)
    meta = evaluator.cfg.meta
    adaptation = {"lr": "learned" if learned else meta.inner_lr if chosen[0] is None else chosen[0],
                  "steps": meta.num_inner_steps if chosen[1] is None else chosen[1], **adaptation}
    jobs = [Job(f"rows/{name}", plan.test, *chosen)]
    if plan.control:
        jobs.append(Job(f"control/{name}", plan.control, *chosen))
    if icl:
        jobs.append(Job(f"rows/{name}{ICL}", plan.test, None, 0, True))
        if plan.control:
            jobs.append(Job(f"control/{name}{ICL}", plan.control, None, 0, True))
    scored = dict(zip([job.file for job in jobs], evaluator.rows(name, path, jobs, plan.records)))
    return {"rows": scored[f"rows/{name}"], "control": scored.get(f"control/{name}"), "adaptation": adaptation,
            "icl_rows": scored.get(f"rows/{name}{ICL}"), "icl_control": scored.get(f"control/{name}{ICL}")}


def evaluate_all(args: argparse.Namespace, plan: EvalPlan, evaluator: Evaluator, runs: dict[str, Path]) -> dict:
    """Every init (base + runs) through :func:`evaluate_init`, ``--jobs`` inits at a time (worker processes
    sharing ``OMP_NUM_THREADS``: at this size two 1-thread processes score about twice as fast as one
    2-thread process)."""
    inits = {"base": evaluator.base_dir, **runs}
    grid = adapt_grid(args.adapt_grid)
    # Each init's adaptation is chosen on what the verdicts are given on (a gain: on its metric).
    criterion = args.verdict_metric.removesuffix("_gain")
    print(f"{len(plan.test)} test episodes over {len({ep.task for ep in plan.test})} tasks "
          f"({sum(len(ep.test_ids) for ep in plan.test)} scored problems per init), {len(plan.validation)} validation "
          f"episodes over {len({ep.task for ep in plan.validation})} tasks, {len(plan.control)} wrong-code control "
          f"episodes; {evaluator.dtype} on {evaluator.device}")
    in_context = in_context_methods(args)
    icl_inits = {"base"} & set(in_context) | {run_name(m, seed) for m in in_context for seed in args.seeds}
    jobs = min(args.jobs, len(inits))
    results: dict[str, dict] = {}
    if jobs == 1:
        for name, path in inits.items():
            results[name] = evaluate_init(evaluator, name, path, plan, grid, criterion, name in icl_inits)
    else:
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        # spawn, not fork: a forked torch process can deadlock in its thread pools. The workers' progress bars
        # would overwrite each other on one terminal: they are off, one bar here counts the inits.
        quiet = replace(evaluator, progress=False)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(max(1, threads // jobs),)) as pool:
            futures = {pool.submit(evaluate_init, quiet, name, path, plan, grid, criterion, name in icl_inits): name
                       for name, path in inits.items()}
            for future in tqdm(as_completed(futures), total=len(futures), desc="inits evaluated", unit="init",
                               dynamic_ncols=True):
                results[futures[future]] = future.result()
    rows_by_init, control_rows, adaptation = {}, {}, {}
    for i, name in enumerate(inits, 1):
        rows_by_init[name] = results[name]["rows"]
        if results[name]["control"] is not None:
            control_rows[name + WRONG_CODE] = results[name]["control"]
        if results[name]["icl_rows"] is not None:
            rows_by_init[name + ICL] = results[name]["icl_rows"]
        if results[name]["icl_control"] is not None:
            control_rows[name + ICL + WRONG_CODE] = results[name]["icl_control"]
        adaptation[name] = chosen = results[name]["adaptation"]
        print(f"[{i}/{len(inits)}] {name}: adapts with lr {chosen['lr']}, {chosen['steps']} steps"
              + (f" (the best validation {criterion})" if "validation" in chosen else ""))
    return {"rows": rows_by_init, "control_rows": control_rows, "adaptation": adaptation}


# --- 6. statistics ---------------------------------------------------------------------------
def compare(args: argparse.Namespace, evaluated: dict, tune_n: int) -> dict:
    """Summary rows per init / method and n, paired comparisons, verdicts (see the module docstring, 6), and the
    wrong-code control at the largest n: each init against itself adapted on another task's shots."""
    rows_by_init = evaluated["rows"]
    series = [name for name, _ in report.series_names()]
    keys = [*report.TEACHER_FORCED, *(f"{m}_pre" for m in report.PRE_ADAPTATION)]
    values = stats.paired_values(rows_by_init, keys)
    in_context = in_context_methods(args)
    # adapted by gradient; in context
    variants = {v: ["base", *args.methods] if not v else in_context for v in ("", ICL)}
    bases = ["base" + v for v, methods in variants.items() if "base" in methods]
    inits = {method + v: {seed: run_name(method, seed) + v for seed in args.seeds}
             for v, methods in variants.items() for method in methods if method != "base"}
    units = {**{b: [b] for b in bases}, **{method: list(by_seed.values()) for method, by_seed in inits.items()},
             **{name: [name] for by_seed in inits.values() for name in by_seed.values()}}
    bootstrap = {"n_boot": args.n_boot, "boot_seed": args.boot_seed, "sampled_tasks": args.eval_on == "holdout"}
    summary = stats.pooled_summary(values, units, args.n_shots, series, **bootstrap)
    # The base is one init: every training seed of a method is paired with it.
    paired = {**{b: {seed: b for seed in args.seeds} for b in bases}, **inits}
    comparisons = stats.seed_paired_comparisons(values, report.comparisons([*bases, *inits]), paired,
                                                args.n_shots, series, **bootstrap)
    for row in comparisons:
        row["verdict"] = report.verdict_text(row, args.verdict_metric)
    result = {"summary": summary, "comparisons": comparisons,
              "verdicts": [report.verdict_line(row, args.verdict_metric) for row in comparisons]}
    if evaluated["control_rows"]:
        at_n = {name: [r for r in rows if r["n"] == tune_n] for name, rows in rows_by_init.items()}
        control_values = stats.paired_values({**at_n, **evaluated["control_rows"]}, keys)
        control_inits = {}
        for method, by_seed in {**{b: {0: b} for b in bases}, **inits}.items():
            control_inits[method] = by_seed
            control_inits[method + WRONG_CODE] = {s: name + WRONG_CODE for s, name in by_seed.items()}
        control_units = {unit: list(by_seed.values()) for unit, by_seed in control_inits.items()
                         if unit.endswith(WRONG_CODE)}
        pairs = [(m, m + WRONG_CODE) for m in [*bases, *inits]]
        control_comparisons = stats.seed_paired_comparisons(control_values, pairs, control_inits, [tune_n], series,
                                                            **bootstrap)
        for row in control_comparisons:
            row["verdict"] = report.verdict_text(row, args.verdict_metric)
        result["control"] = {"n": tune_n, "summary": stats.pooled_summary(control_values, control_units, [tune_n],
                                                                          series, **bootstrap),
                             "comparisons": control_comparisons}
    return result


# --- the program -----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    args.source = args.source or ("synthetic" if args.tiny else str(DEFAULT_MATH))
    config = Path(args.config).expanduser().resolve() if args.config else (TINY_CONFIG if args.tiny else DEFAULT_CONFIG)
    if not config.is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    out = Path(args.out).expanduser().resolve()
    with DirectoryLock(out, "--out"):  # one experiment per --out at a time (each run locks its own directory)
        return experiment(args, config, out)


def experiment(args: argparse.Namespace, config: Path, out: Path) -> int:
    """The six phases of the module docstring, everything under ``out``."""
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with phase("1/6 base model", timings):
        base_dir = base_model(args, out)
    # The settings every run shares (seed and run dir aside), validated before anything is trained.
    shared = {"model.partial_pretrain": str(base_dir), "model.gguf_file": None, "model.build_tiny_if_missing": False,
              "data.data_dir": str(out / "data"), "data.source": args.source}
    cfg = load_config(config, args.overrides, shared)

    with phase("2/6 data", timings):
        data_dir = prepare_data(args, cfg, base_dir, out / "data", args.source)
    check_verdict_metric(args.verdict_metric, data_dir)

    pretrained = None
    with phase("3/6 pretraining", timings):
        if args.pretrain:
            pretrain_data = prepare_data(args, cfg, base_dir, out / "pretrain_data", args.pretrain)
            base_dir, last_loss = pretrain(args, config, base_dir, pretrain_data, out)
            pretrained = {"source": args.pretrain, "steps": args.pretrain_steps, "lr": args.pretrain_lr,
                          "last_loss": last_loss, "model": str(base_dir)}
            shared["model.partial_pretrain"] = str(base_dir)
        else:
            print("no --pretrain: the runs start from the base model as it is")

    plan = eval_plan(args, cfg, data_dir)
    write_json(out / "eval" / "plan.json", {
        "plan_sha256": plan_fingerprint(plan.test), "episodes": [asdict(ep) for ep in plan.test],
        "validation_episodes": [asdict(ep) for ep in plan.validation], "control_episodes": [asdict(ep) for ep in plan.control]})
    evaluator = Evaluator(cfg, out, base_dir, args.dtype or cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")

    with phase("4/6 training", timings):
        runs, sft_sweep = train_all(args, config, shared, out, plan, evaluator)

    with phase("5/6 evaluation", timings):
        evaluated = evaluate_all(args, plan, evaluator, runs)

    with phase("6/6 statistics", timings):
        statistics = compare(args, evaluated, plan.tune_n)
    timings["total"] = round(time.perf_counter() - started, 1)

    result = report.jsonable({
        "config": str(config), "overrides": list(args.overrides), "base_model": str(base_dir), "source": args.source,
        "pretrain": pretrained, "methods": list(args.methods), "icl": in_context_methods(args), "seeds": list(args.seeds),
        "n_shots": sorted(args.n_shots), "episodes": args.episodes, "test_per_episode": args.test_per_episode,
        "n_boot": args.n_boot, "boot_seed": args.boot_seed, "verdict_metric": args.verdict_metric,
        "floor": read_manifest(data_dir)["source"].get("code_agnostic_floor"),
        "eval_on": args.eval_on, "test_tasks": sorted({ep.task for ep in plan.test}),
        "validation_tasks": sorted({ep.task for ep in plan.validation}), "tune_n": plan.tune_n,
        "settings": {"dtype": evaluator.dtype, "plan_sha256": plan_fingerprint(plan.test), "eval_on": args.eval_on,
                     "adapt_optimizer": cfg.meta.inner_optimizer, "adapt_batch_size": cfg.meta.inner_batch_size,
                     "adapt_grid": args.adapt_grid, "sft_lrs": args.sft_lrs},
        "adaptation": evaluated["adaptation"], "sft_sweep": sft_sweep,
        "runs": {k: str(v) for k, v in runs.items()}, **statistics, "timings_s": timings,
    })
    markdown = report.render_experiment_markdown(result)
    write_json(out / "results.json", result)
    write_text_atomic(out / "results.md", markdown)
    report.plot_experiment_curve(result, out / "few_shot_curve.png")
    report.plot_learning_curves({name: path for name, path in runs.items() if name.endswith(f"_{args.seeds[0]}")},
                                out / "learning_curves.png")
    print("\n" + markdown)
    print(f"wrote {out / 'results.md'}, results.json, few_shot_curve.png, learning_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
