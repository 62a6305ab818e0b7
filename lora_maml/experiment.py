"""Train meta-learners and SFT from one base at matched compute, evaluate every init on one plan, compare.

    python recipes/meta_vs_sft.py --tiny --source synthetic-rules --pretrain "synthetic-rules:named=8,per_task=400" \\
        --config recipes/configs/rules_tiny.yaml --methods fomaml sft_tokens --eval-on holdout   # the README demo
    python recipes/meta_vs_sft.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf         # MATH, ~65 min on 2 CPU cores
    python recipes/meta_vs_sft.py --tiny --out /tmp/mvs -- trainer.total_steps=3        # smoke run, seconds

The one orchestration of "is meta-learning worth it here?": the demo, the real-model study and a study on
your own data (``--source`` any ``prepare`` source, ``--model`` any base) all run these phases. Trailing
``key=value`` config overrides (after ``--``) apply to every training run. Everything goes under ``--out``;
each phase skips what an earlier invocation finished (a run killed half-way resumes from its checkpoint);
every file is written atomically.

1. Base model. ``--model DIR`` as it is; ``--model FILE.gguf`` dequantised ONCE to fp32 into
   ``<out>/base_model``; ``--tiny``: a tiny random-init Qwen3 (``--tiny-dims``, :func:`tiny_model_dims`)
   whose tokenizer is trained on the texts of ``--source`` (and ``--pretrain``).
2. Data. ``--source`` prepared into ``<out>/data`` with the config's ratios and ``--data-seed``. A MATH
   source is first cut to the problems whose encoded example fits ``data.max_length`` (``<out>/records.jsonl``)
   and to the config's ``data.tasks``; a generated source (``synthetic``, ``synthetic-rules``) is prepared
   as it is (a rules family holds out its unseen tasks).
3. Pretraining (``--pretrain SOURCE``, optional): a competent base, as real runs start from. The SFT recipe
   trains EVERY weight (``meta.adapter=full``) of the base for ``--pretrain-steps`` at ``--pretrain-lr`` on
   ``SOURCE`` (prepared into ``<out>/pretrain_data``; for the rules family, named codes of the meta-training
   tasks only), and the result is exported (``lora_maml.export``) to ``<out>/pretrained_model``, the base of
   every later phase. Its loss curve stays in ``<out>/runs/pretrain/metrics.jsonl``; its last loss is reported.
4. Training, per seed s (``trainer.seed=s``), from the same base: every method of ``--methods``
   (:data:`METHODS`): ``fomaml``, ``maml`` (second order), ``metasgd`` (FOMAML with learned per-tensor inner
   rates), ``sft_steps`` (the same optimizer steps) and ``sft_tokens`` (``sft.match_tokens_of`` the FOMAML run:
   as many training label tokens). Each recipe runs in a subprocess (``--in-process``: in this one);
   ``<out>/runs/<name>.done.json`` marks a finished run and holds its arguments.
5. Evaluation: ONE plan (``plan_episodes`` on ``<out>/data``: ``--eval-on all`` the config's tasks, or
   ``holdout`` the tasks never seen in meta-training; ``--n-shots``; ``--episodes`` shot draws per task and
   n; ``--test-per-episode`` scored problems per task) for every init: ``base`` (with a fresh LoRA shaped
   like the runs', B = 0) and every run. Every init adapts with the config's inner loop (optimizer, rate,
   steps; full-batch steps over the n shots), except that a Meta-SGD run adapts with the rates it learned
   (what it was trained for). Teacher-forced scores only (``evaluate_model(generate=False)``): ``nll`` of the
   reference solution, and on its final answer's tokens ``answer_nll`` and ``answer_accuracy``; ``*_pre`` at
   the init's own weights. Rows in ``<out>/eval/rows/<init>.json``.
6. Statistics, per n, pooled over tasks: per init and per method (seeds pooled) the mean of every metric
   (:data:`METRICS`) and the gain ``pre - post`` of the NLLs; paired differences A - B (seed s with seed s,
   the same episode and problem) for the comparisons of :func:`comparisons`. 95% CIs: the two-way bootstrap
   of ``lora_maml.eval.report`` on each task's [episodes x problems] grid (seeds averaged per entry):
   episodes AND problems resampled, within each task, the same resamples for every init, comparison and
   metric of an n; n = 0 has one episode per task, so its CI is over problems. With ``--eval-on holdout``
   the tasks are a sample of the family's unseen tasks, so the tasks are drawn with replacement too. A verdict
   per comparison on ``--verdict-metric``: "better / worse / not distinguishable at 95%"; better or worse
   also needs every seed's paired mean on that side (the CI does not cover training seeds).
   ``<out>/results.json``, ``<out>/results.md``, ``<out>/few_shot_curve.png`` (each metric vs n per method,
   CI bands) and ``<out>/learning_curves.png`` (every run on the training-label-tokens axis).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from lora_maml.errors import LoraMamlError
from lora_maml.eval.report import jsonable

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
DEFAULT_CONFIG = RECIPES_DIR / "configs" / "smollm2_135m_math.yaml"
TINY_CONFIG = RECIPES_DIR / "configs" / "tiny_cpu.yaml"
DEFAULT_MATH = REPO_ROOT.parent / "shared" / "data" / "MATH.tar.gz"
DEFAULT_OUT = REPO_ROOT / "outputs" / "meta_vs_sft"
RECIPES = {"fomaml": "recipes.fomaml_math", "sft": "recipes.sft_math"}
# method -> (recipe, overrides). sft_tokens is matched to the same seed's fomaml run (added in run_argv).
METHODS = {
    "fomaml": ("fomaml", []),
    "maml": ("fomaml", ["meta.algorithm=maml", "model.attn_implementation=eager",
                        "model.enable_gradient_checkpointing=false", "model.compile=false"]),
    "metasgd": ("fomaml", ["meta.learn_inner_lr=true"]),
    "sft_steps": ("sft", ["sft.match_tokens_of=null"]),
    "sft_tokens": ("sft", []),
}
META_LEARNERS = ("fomaml", "maml", "metasgd")
BASELINES = ("sft_tokens", "sft_steps")
LABELS = {"base": "base", "fomaml": "FOMAML", "maml": "MAML", "metasgd": "Meta-SGD",
          "sft_steps": "SFT (matched steps)", "sft_tokens": "SFT (matched tokens)"}
# (metric, lower is better, has a pre-adaptation value)
METRICS = (("nll", True, True), ("answer_nll", True, True), ("answer_accuracy", False, False))
ROW_KEYS = ("task", "n", "seed", "id", "shot_ids", "tokens", "nll", "nll_pre", "answer_nll", "answer_nll_pre",
            "answer_accuracy", "answer_tokens")
# Keys this script sets (or relies on) per run; a user override of one would silently break the design.
CONTROLLED = ("model.partial_pretrain", "model.gguf_file", "model.build_tiny_if_missing", "data.data_dir",
              "data.source", "trainer.seed", "trainer.default_local_dir", "trainer.experiment_name",
              "trainer.resume_mode", "sft.match_tokens_of", "meta.algorithm", "meta.learn_inner_lr", "meta.adapter")
BASE_SOURCE_FILE = "meta_vs_sft_source.json"
def tiny_model_dims(spec: str) -> dict[str, int]:
    """``--tiny-dims HIDDEN,LAYERS`` → the tiny Qwen3's sizes: heads of 32 (GQA 2:1), an MLP of 2 x HIDDEN."""
    try:
        hidden, layers = (int(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--tiny-dims {spec!r}: expected HIDDEN,LAYERS, e.g. 128,4") from None
    if hidden < 64 or hidden % 64 or layers < 1:
        raise ValueError(f"--tiny-dims {spec!r}: HIDDEN must be a multiple of 64 and LAYERS >= 1")
    return dict(vocab_size=512, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                num_key_value_heads=hidden // 64, head_dim=32, intermediate_size=2 * hidden)


# --- small helpers ---------------------------------------------------------------------------
@contextlib.contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {name}", flush=True)
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"== {name}: {timings[name]:.1f} s", flush=True)


def write_json(path: Path, obj) -> None:
    from lora_maml.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def is_math_source(source: str) -> bool:
    from lora_maml.data.rules import is_rules_source

    return source != "synthetic" and not is_rules_source(source)


# --- 1. base model ---------------------------------------------------------------------------
def prepare_base_model(args: argparse.Namespace, out: Path) -> Path:
    """The base model directory every run starts from (see the module docstring)."""
    target = out / "base_model"
    if args.tiny:
        source = {"tiny": tiny_model_dims(args.tiny_dims), "source": args.source, "pretrain": args.pretrain,
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
        source = {"gguf": str(model), "bytes": model.stat().st_size}
    stamp = read_json(target / BASE_SOURCE_FILE)
    if stamp is not None:
        if stamp != source:
            raise ValueError(f"{target} was made from {stamp}, not {source}; use another --out")
        print(f"base model: {target} (made earlier, skipped)")
        return target
    if args.tiny:
        from lora_maml.data.prepare import read_source
        from lora_maml.tiny_model import build_tiny_model

        texts = []
        for spec in filter(None, (args.source, args.pretrain)):
            records = read_source(spec, seed=args.data_seed, synthetic_per_task=args.tiny_per_task)[0]
            texts += [f"{r['prompt']}\n{r['response']}" for r in records]
        build_tiny_model(target, texts, overwrite=True, **source["tiny"])  # written atomically
        write_json(target / BASE_SOURCE_FILE, source)  # last: its presence means the model is complete
        print(f"base model: tiny random-init Qwen3 at {target}")
        return target
    from lora_maml.atomic import atomic_dir
    from lora_maml.config import ModelConfig
    from lora_maml.models import load_base

    print(f"base model: dequantising {model} to fp32 (once) ...", flush=True)
    base, tokenizer = load_base(ModelConfig(partial_pretrain=str(model.parent), gguf_file=model.name, dtype="fp32",
                                            enable_gradient_checkpointing=False))
    if not tokenizer.chat_template:
        raise ValueError(f"--model {model}: its tokenizer has no chat template; every example is chat-formatted")
    with atomic_dir(target) as tmp:
        base.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / BASE_SOURCE_FILE).write_text(json.dumps(source), encoding="utf-8")
    del base
    gc.collect()
    print(f"base model: {target}")
    return target


# --- 2. data ---------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, cfg, base_dir: Path, out: Path, name: str, source: str) -> Path:
    """``<out>/<name>``: ``source`` prepared with the config's ratios (a MATH source length-filtered first)."""
    from lora_maml.data import prepare
    from recipes.prepare_math_data import main as prepare_main

    data_dir, stamp_path = out / name, out / f"{name}_settings.json"
    math_source = is_math_source(source)
    if math_source and Path(source).expanduser().exists():  # a hub id stays as it is
        source = str(Path(source).expanduser().resolve())
    settings = {"source": source, "tokenizer": str(base_dir), "tasks": cfg.data.tasks if math_source else None,
                "max_length": cfg.data.max_length, "support_ratio": cfg.data.support_ratio,
                "query_ratio": cfg.data.query_ratio, "seed": args.data_seed, "per_task": args.tiny_per_task}
    stamp = read_json(stamp_path)
    if (data_dir / prepare.MANIFEST).is_file() and stamp is not None:
        if stamp != settings:
            raise ValueError(f"{data_dir} was prepared with {stamp}, not {settings}; use another --out")
        print(f"data: {data_dir} (prepared earlier, skipped)")
        return data_dir
    write_json(stamp_path, settings)  # first: a directory prepared after it is known to match it
    if math_source:
        source = filter_math_by_length(source, cfg, base_dir, out / f"{name}_records.jsonl")
    code = prepare_main([
        "--source", source, "--output-dir", str(data_dir), "--seed", str(args.data_seed),
        "--support-ratio", str(cfg.data.support_ratio), "--query-ratio", str(cfg.data.query_ratio),
        "--synthetic-per-task", str(args.tiny_per_task), "--validate", "--overwrite",
    ])
    if code:
        raise LoraMamlError(f"preparing {data_dir} from {source} failed (see the error above)")
    return data_dir


def filter_math_by_length(source: str, cfg, base_dir: Path, jsonl: Path) -> str:
    """Write the MATH train records of the config's tasks whose encoded example fits ``data.max_length``
    (the base's tokenizer) to ``jsonl``, in MATH's own fields; return its path."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from lora_maml.atomic import write_text_atomic
    from lora_maml.data import SUBJECTS
    from lora_maml.data.math import PROMPT_INSTRUCTION, load_math_records, make_prompt
    from lora_maml.data.tokenize import encode_example

    tasks = list(cfg.data.tasks or SUBJECTS)
    records, _ = load_math_records(source, split="train")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    lines, kept, total = [], dict.fromkeys(tasks, 0), dict.fromkeys(tasks, 0)
    for record in tqdm(records, desc=f"length filter (<= {cfg.data.max_length} tokens)", unit="record"):
        task = record["subject"]
        if task in total:
            total[task] += 1
            example = encode_example(tokenizer, record["prompt"], record["response"],
                                     max_length=cfg.data.max_length, truncation="right")
            if example["truncated"]:
                continue
            kept[task] += 1
        # The other subjects are written unfiltered only because prepare splits every subject; nothing reads them.
        problem = record["prompt"].removeprefix(f"{PROMPT_INSTRUCTION}\n\n")
        if make_prompt(problem) != record["prompt"]:
            raise ValueError(f"record {record['id']}: its prompt is not make_prompt(problem); cannot write it as MATH")
        lines.append(json.dumps({"id": record["id"], "problem": problem, "solution": record["response"],
                                 "type": task, "level": record["level"]}, ensure_ascii=False))
    for task in tasks:
        print(f"data: {task}: {kept[task]} of {total[task]} problems fit data.max_length={cfg.data.max_length}")
    write_text_atomic(jsonl, "\n".join(lines) + "\n")
    return str(jsonl)


# --- 3 and 4. training -----------------------------------------------------------------------
def run_name(method: str, seed: int) -> str:
    return f"{method}_{seed}"


def run_argv(config: Path, overrides: Sequence[str], common: Sequence[str], out: Path, method: str, seed: int) -> list[str]:
    """The recipe arguments of one run (user overrides first: the per-run keys of this script win)."""
    name = run_name(method, seed)
    argv = ["--config", str(config), *overrides, *common, *METHODS[method][1], f"trainer.seed={seed}",
            f"trainer.default_local_dir={out / 'runs' / name}", f"trainer.experiment_name=meta_vs_sft_{name}"]
    if method == "sft_tokens":
        argv.append(f"sft.match_tokens_of={out / 'runs' / run_name('fomaml', seed)}.config.yaml")
    return argv


@dataclass
class Run:
    """One training run: the recipe, its arguments, its run directory and how it is named in the output."""

    recipe: str
    argv: list[str]
    run_dir: Path
    label: str

    @property
    def marker(self) -> Path:
        return self.run_dir.with_name(f"{self.run_dir.name}.done.json")


def finished(run: Run) -> bool:
    """Whether ``run``'s done marker says it finished with the same arguments (other arguments: an error)."""
    done = read_json(run.marker)
    if done is None:
        return False
    if done["argv"] != run.argv:
        raise ValueError(f"{run.run_dir} was trained with other arguments ({run.marker}); use another --out or "
                         f"delete both to retrain:\n  was: {done['argv']}\n  now: {run.argv}")
    print(f"{run.label}: finished earlier, skipped ({run.run_dir})")
    return True


def train_runs(args: argparse.Namespace, runs: Sequence[Run]) -> None:
    """Train the unfinished ``runs``: one by one in this process (``--in-process``), or as subprocesses,
    ``--jobs`` at a time, sharing ``OMP_NUM_THREADS`` (default: every core) between them; a parallel run's
    output goes to ``<run dir>.log``. A run that fails stops the experiment (rerun to resume it)."""
    todo = [run for run in runs if not finished(run)]
    jobs = min(args.jobs, max(len(todo), 1))
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // jobs)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    running: list[tuple[Run, subprocess.Popen, float, object]] = []
    while todo or running:
        while todo and (len(running) < jobs or args.in_process):
            run = todo.pop(0)
            print(f"{run.label}: {run.recipe} {' '.join(run.argv)}", flush=True)
            start = time.perf_counter()
            if args.in_process:
                import importlib

                code = importlib.import_module(RECIPES[run.recipe]).main(run.argv)
                _done(run, code, start)
                continue
            run.run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run.run_dir.with_name(f"{run.run_dir.name}.log"), "w") if jobs > 1 else None
            process = subprocess.Popen([sys.executable, "-m", RECIPES[run.recipe], *run.argv], env=env,
                                       stdout=log, stderr=subprocess.STDOUT if log else None)
            running.append((run, process, start, log))
        for item in list(running):
            run, process, start, log = item
            if process.poll() is not None:
                running.remove(item)
                if log:
                    log.close()
                _done(run, process.returncode, start, running)
        if running:
            time.sleep(0.5)


def _done(run: Run, code: int | None, start: float, running: Sequence = ()) -> None:
    if code:
        for _, process, _, _ in running:  # the others would be orphaned otherwise
            process.terminate()
        where = f" (its output: {run.run_dir.with_name(run.run_dir.name + '.log')})" if running else " (output above)"
        raise LoraMamlError(f"{run.label}: {run.recipe} exited with {code}{where}; rerun this command to resume it "
                            f"from its last checkpoint in {run.run_dir}")
    write_json(run.marker, {"argv": run.argv, "seconds": round(time.perf_counter() - start, 1)})
    print(f"{run.label}: trained in {time.perf_counter() - start:.1f} s", flush=True)


def pretrain(args: argparse.Namespace, config: Path, base_dir: Path, data_dir: Path, out: Path) -> tuple[Path, float]:
    """Full-parameter SFT of the base on ``--pretrain`` text, exported as a plain model directory; returns
    it and the last logged training loss (see the module docstring, 3)."""
    from lora_maml.eval.report import read_metrics

    run_dir, target = out / "runs" / "pretrain", out / "pretrained_model"
    argv = ["--config", str(config), *args.overrides, f"model.partial_pretrain={base_dir}", "model.gguf_file=null",
            "model.build_tiny_if_missing=false", f"data.data_dir={data_dir}", f"data.source={args.pretrain}",
            "meta.adapter=full", f"trainer.total_steps={args.pretrain_steps}", f"sft.lr={args.pretrain_lr}",
            "sft.match_tokens_of=null", f"trainer.save_freq={args.pretrain_steps}",
            f"trainer.test_freq={args.pretrain_steps}", f"trainer.default_local_dir={run_dir}",
            "trainer.experiment_name=meta_vs_sft_pretrain", "trainer.seed=0"]
    train_runs(args, [Run("sft", argv, run_dir, "pretrain (all weights)")])
    if not (target / "config.json").is_file():
        from recipes.merge_adapter import main as merge

        if merge(["--checkpoint", str(run_dir), "--output", str(target), "--overwrite"]):
            raise LoraMamlError(f"exporting the pretrained model {run_dir} to {target} failed (see above)")
    losses = [r["sft/loss"] for r in read_metrics(run_dir) if "sft/loss" in r]
    print(f"pretrained base: {target} (last sft/loss {losses[-1]:.4f} after {args.pretrain_steps} steps)")
    return target, losses[-1]


def train_all(args: argparse.Namespace, config: Path, common: Sequence[str], out: Path) -> dict[str, Path]:
    """Train every (method, seed), ``--jobs`` at a time; return ``{name: run dir}``. SFT matched in tokens is
    matched to the FOMAML run's resolved config (``<out>/runs/fomaml_<seed>.config.yaml``, written first),
    so it need not wait for that run: the token count is replayed from the config alone."""
    from lora_maml.config import config_to_dict, load_config

    runs = []
    for seed in args.seeds:
        if "sft_tokens" in args.methods:
            fomaml = load_config(config, run_argv(config, args.overrides, common, out, "fomaml", seed)[2:])
            path = out / "runs" / f"{run_name('fomaml', seed)}.config.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            from lora_maml.atomic import write_text_atomic

            write_text_atomic(path, yaml.safe_dump(config_to_dict(fomaml), sort_keys=False))
        for method in args.methods:
            name = run_name(method, seed)
            runs.append(Run(METHODS[method][0], run_argv(config, args.overrides, common, out, method, seed),
                            out / "runs" / name, name))
    for i, run in enumerate(runs, 1):
        run.label = f"[{i}/{len(runs)}] {run.label}"
    train_runs(args, runs)
    return {run.run_dir.name: run.run_dir for run in runs}


# --- 5. evaluation ---------------------------------------------------------------------------
def weights_stamp(path: Path) -> list:
    """(name, size, mtime) of the files an init loads: a retrained run or a rebuilt base is evaluated again."""
    from lora_maml.load_trained import resolve_model_path

    source = Path(resolve_model_path(path)[1])
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def evaluate_all(args: argparse.Namespace, cfg, base_dir: Path, data_dir: Path, runs: dict[str, Path],
                 out: Path) -> tuple[dict[str, list[dict]], dict]:
    """Evaluate base + every run on one plan (rows files reused when plan, settings and weights match)."""
    import torch

    from lora_maml.data.prepare import list_tasks
    from lora_maml.eval.few_shot import AdaptSettings, evaluate_model
    from lora_maml.eval.plan import episode_records, plan_episodes, plan_fingerprint
    from lora_maml.load_trained import load_trained

    if args.eval_on == "holdout":
        tasks = list_tasks(data_dir)["holdout"]
        if not tasks:
            raise ValueError(f"--eval-on holdout: {data_dir} has no held-out tasks")
    else:
        tasks = list(cfg.data.tasks) if cfg.data.tasks else None
    episodes = plan_episodes(data_dir, tasks, args.n_shots, args.episodes, args.test_per_episode, args.plan_seed)
    short = sorted({ep.task for ep in episodes if len(ep.test_ids) < args.test_per_episode})
    if short:
        # Equal cluster sizes make the pooled episode means the mean over rows (module docstring, 6).
        raise ValueError(f"tasks {short[:5]} have fewer than --test-per-episode={args.test_per_episode} test problems "
                         f"to score; lower --test-per-episode")
    records = episode_records(data_dir, episodes)
    fingerprint = plan_fingerprint(episodes)
    write_json(out / "eval" / "plan.json", {"plan_sha256": fingerprint, "episodes": [asdict(ep) for ep in episodes]})
    meta = cfg.meta
    settings = {"adapt_lr": meta.inner_lr, "adapt_steps": meta.num_inner_steps, "adapt_batch_size": meta.inner_batch_size,
                "adapt_optimizer": meta.inner_optimizer, "max_length": cfg.data.max_length,
                "truncation": cfg.data.truncation}
    dtype = args.dtype or cfg.model.dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(episodes)} episodes over {len({ep.task for ep in episodes})} tasks, "
          f"{sum(len(ep.test_ids) for ep in episodes)} scored problems per init (plan sha256 {fingerprint[:12]}); "
          f"every init adapts: {meta.inner_optimizer} lr={meta.inner_lr} steps={meta.num_inner_steps} "
          f"micro-batch={meta.inner_batch_size} (Meta-SGD: its learned rates); {dtype} on {device}")
    inits = {"base": base_dir, **runs}
    rows_by_init = {}
    for i, (name, path) in enumerate(inits.items(), 1):
        rows_path = out / "eval" / "rows" / f"{name}.json"
        identity = {"init": name, "path": str(path), "weights": weights_stamp(path), "plan_sha256": fingerprint,
                    "settings": settings, "dtype": dtype}
        saved = read_json(rows_path)
        if saved is not None and saved["identity"] == identity:
            print(f"[{i}/{len(inits)}] {name}: evaluated earlier, skipped")
            rows_by_init[name] = saved["rows"]
            continue
        start = time.perf_counter()
        trained = load_trained(str(path), dtype=dtype, device=device, lora=cfg.model.lora if name == "base" else None)
        adapt = AdaptSettings(lr=trained.inner_lrs or meta.inner_lr, steps=meta.num_inner_steps,
                              batch_size=meta.inner_batch_size, optimizer=meta.inner_optimizer,
                              max_length=cfg.data.max_length, truncation=cfg.data.truncation)
        rows = evaluate_model(trained, episodes, records, adapt, generate=False, desc=name)
        del trained
        gc.collect()
        rows = [{k: r[k] for k in ROW_KEYS} for r in rows]
        write_json(rows_path, jsonable({"identity": identity, "seconds": round(time.perf_counter() - start, 1),
                                              "rows": rows}))
        rows_by_init[name] = rows
        print(f"[{i}/{len(inits)}] {name}: evaluated in {time.perf_counter() - start:.1f} s")
    return rows_by_init, settings | {"dtype": dtype, "plan_sha256": fingerprint, "eval_on": args.eval_on}


# --- 6. statistics ---------------------------------------------------------------------------
def comparisons(methods: Sequence[str]) -> list[tuple[str, str]]:
    """Every meta-learner against every SFT baseline, and MAML / Meta-SGD against FOMAML (those present)."""
    pairs = [(a, b) for a in META_LEARNERS for b in BASELINES if a in methods and b in methods]
    return pairs + [(a, "fomaml") for a in ("maml", "metasgd") if a in methods and "fomaml" in methods]


def _value(row: dict, key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


def paired_values(rows_by_init: dict[str, list[dict]]) -> dict[str, dict[tuple, dict[str, float]]]:
    """``{init: {(n, task, episode seed, problem id): {metric: value, metric_pre: value}}}``; every init must
    cover the same keys."""
    values = {}
    for init, rows in rows_by_init.items():
        table = {}
        for r in rows:
            key = (int(r["n"]), r["task"], int(r["seed"]), r["id"])
            if key in table:
                raise ValueError(f"init {init!r}: (n, task, episode, problem) {key} scored twice")
            table[key] = {k: _value(r, k) for metric, _, has_pre in METRICS
                          for k in ((metric, f"{metric}_pre") if has_pre else (metric,))}
        values[init] = table
    first = next(iter(values))
    for init, table in values.items():
        if table.keys() != values[first].keys():
            raise ValueError(f"inits {first!r} and {init!r} were not scored on the same (episode, problem) set: "
                             f"{sorted(table.keys() ^ values[first].keys())[:3]}")
    return values


def grids(values: dict[tuple, float], n: int) -> list[np.ndarray]:
    """Per task, the [episodes x problems] grid of ``values`` (keys (n, task, episode seed, problem id, ...))
    at ``n``, each entry the mean over the training seeds of that (episode, problem). Every episode of a task
    scores the same problems (the plan's), so the grids are complete; NaN entries (a reference without
    answer tokens) are left out of the means downstream."""
    cells: dict[str, dict[tuple[int, str], list[float]]] = {}
    for key, value in values.items():
        if key[0] == n:
            cells.setdefault(key[1], {}).setdefault((key[2], key[3]), []).append(value)
    out = []
    for _, per_cell in sorted(cells.items()):
        episodes = sorted({e for e, _ in per_cell})
        problems = sorted({p for _, p in per_cell})
        grid = np.full((len(episodes), len(problems)), np.nan)
        for (e, p), seeds in per_cell.items():
            grid[episodes.index(e), problems.index(p)] = _finite_mean(seeds)
        out.append(grid)
    return out


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _series_names() -> list[tuple[str, bool]]:
    """(name, lower is better) of every reported series: the metrics and the gains of those with a pre value."""
    return [(m, lower) for m, lower, _ in METRICS] + [(f"{m}_gain", False) for m, _, has_pre in METRICS if has_pre]


def _series(entry: dict[str, float], name: str) -> float:
    if name.endswith("_gain"):
        metric = name.removesuffix("_gain")
        return entry[f"{metric}_pre"] - entry[metric]
    return entry[name]


def statistics(values: dict, methods: Sequence[str], seeds: Sequence[int], n_shots: Sequence[int], n_boot: int,
               boot_seed: int, verdict_metric: str, sampled_tasks: bool = False) -> dict:
    """Summary rows per init / method and n, paired comparisons, verdicts (see the module docstring, 6).
    ``sampled_tasks``: the tasks are a sample of a family (unseen tasks), so the bootstrap draws them too."""
    from lora_maml.eval.stats import bootstrap_mean, paired_bootstrap

    def rng(n: int) -> np.random.Generator:
        # One stream per n for every init, comparison and metric: identical grid shapes -> identical resamples.
        return np.random.default_rng([boot_seed, n])

    units = {"base": ["base"], **{m: [run_name(m, s) for s in seeds] for m in methods},
             **{run_name(m, s): [run_name(m, s)] for m in methods for s in seeds}}
    summary = []
    for unit, inits in units.items():
        for n in sorted(n_shots):
            row = {"init": unit, "seeds": len(inits), "n": n}
            for name, _ in _series_names():
                flat = {(*key, init): _series(v, name) for init in inits for key, v in values[init].items()}
                stat = bootstrap_mean(grids(flat, n), n_boot=n_boot, rng=rng(n), resample_strata=sampled_tasks)
                row[name], row[f"{name}_ci"] = stat["mean"], stat["ci"]
            row["rows"] = sum(1 for init in inits for key in values[init] if key[0] == n)
            summary.append(row)
    rows, verdicts = [], []
    for a, b in comparisons(methods):
        for n in sorted(n_shots):
            row = {"a": a, "b": b, "n": n}
            for name, _ in _series_names():
                diffs = {}
                for s in seeds:
                    va, vb = values[run_name(a, s)], values[run_name(b, s)]
                    for key, entry in va.items():
                        diffs[(*key, s)] = _series(entry, name) - _series(vb[key], name)
                stat = paired_bootstrap(grids(diffs, n), n_boot=n_boot, rng=rng(n), resample_strata=sampled_tasks)
                row[f"{name}_diff"], row[f"{name}_diff_ci"], row[f"{name}_p"] = stat["diff"], stat["ci"], stat["p"]
                # The bootstrap resamples episodes, not training runs: the per-seed means show the seeds' spread.
                row[f"{name}_diff_by_seed"] = {
                    str(s): _finite_mean([d for key, d in diffs.items() if key[0] == n and key[-1] == s]) for s in seeds
                }
                row["pairs"] = sum(1 for key in diffs if key[0] == n)
            row["verdict"] = verdict(row, verdict_metric)
            rows.append(row)
            verdicts.append(verdict_line(row, verdict_metric))
    return {"summary": summary, "comparisons": rows, "verdicts": verdicts}


def verdict(row: dict, metric: str = "nll") -> str:
    """On ``metric``: the episode-bootstrap CI of A - B must exclude 0 AND every training seed's paired mean
    must lie on the same side, since the CI does not cover the seed-to-seed spread of training."""
    lower_is_better = dict(_series_names())[metric]
    lo, hi = row[f"{metric}_diff_ci"]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "no 95% CI"
    by_seed = list(row[f"{metric}_diff_by_seed"].values())
    if hi < 0 or lo > 0:
        if all(d < 0 for d in by_seed) if hi < 0 else all(d > 0 for d in by_seed):
            better = (hi < 0) == lower_is_better
            return f"{LABELS[row['a']]} init {'better' if better else 'worse'}"
        return "not distinguishable: the 95% CI excludes 0 but the training seeds disagree in sign"
    return "not distinguishable at 95%"


def _fmt(value: float | None, ci: Sequence[float | None] | None = None, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:+.3f}" if sign else f"{value:.3f}"
    if ci is not None and all(c is not None and math.isfinite(c) for c in ci):
        text += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if sign else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _fmt_p(p: float | None) -> str:
    return "–" if p is None or not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def verdict_line(row: dict, metric: str) -> str:
    return (f"n={row['n']}: {LABELS[row['a']]} vs {LABELS[row['b']]}: {row['verdict']} on {metric} "
            f"({row['a']} − {row['b']} {_fmt(row[f'{metric}_diff'], row[f'{metric}_diff_ci'], sign=True)}, "
            f"p {_fmt_p(row[f'{metric}_p'])})")


def render_markdown(result: dict) -> str:
    s = result["settings"]
    headline = ("answer_accuracy", "answer_nll", "nll")
    lines = [
        "# Meta-learning vs multi-task SFT as an initialisation for few-shot adaptation", "",
        f"Config `{result['config']}`, seeds {result['seeds']}, tasks: {s['eval_on']}, {result['episodes']} episodes "
        f"per task and n, {result['test_per_episode']} scored problems per task; every init adapts alike: "
        f"{s['adapt_optimizer']} lr {s['adapt_lr']}, {s['adapt_steps']} full-batch steps over the n shots "
        "(Meta-SGD: its learned rates). answer_accuracy: fraction of the final answer's tokens the model ranks "
        "first (teacher forcing); answer_nll / nll: mean token NLL of the answer / the whole reference solution "
        "(lower is better). Means over every (seed, episode, problem); [95% CI]: bootstrap of episodes and "
        f"problems within tasks{', and of the tasks' if s['eval_on'] == 'holdout' else ''} (B = {result['n_boot']}). "
        "Method rows pool their seeds.", "",
    ]
    if result.get("pretrain"):
        p = result["pretrain"]
        lines += [f"Base: pretrained on all weights for {p['steps']} steps on `{p['source']}` "
                  f"(last training loss {p['last_loss']:.4f}).", ""]
    if result.get("chance_nll_per_answer_token") is not None:
        chance = result["chance_nll_per_answer_token"]
        lines += [f"Without adapting, no model beats answer_nll {chance:.3f} / answer_accuracy "
                  f"{1 / math.exp(chance):.3f} on these tasks (chance).", ""]
    methods = ["base", *result["methods"]]
    lines += ["| n | " + " | ".join(f"{LABELS[m]}: {' / '.join(headline)}" for m in methods) + " |",
              "|---:|" + "---:|" * len(methods)]
    by = {(r["init"], r["n"]): r for r in result["summary"]}
    for n in result["n_shots"]:
        cells = [" / ".join(_fmt(by[(m, n)][k]) for k in headline) for m in methods]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences A − B (seed s with seed s, the same episode and problem) [95% CI]:", "",
              "| A − B | n | Δ answer_accuracy | Δ answer_nll | Δ nll | Δ nll gain | per seed (" + result["verdict_metric"]
              + ") | verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["comparisons"]:
        per_seed = ", ".join(_fmt(d, sign=True) for d in r[f"{result['verdict_metric']}_diff_by_seed"].values())
        cells = [_fmt(r[f"{k}_diff"], r[f"{k}_diff_ci"], sign=True) for k in (*headline, "nll_gain")]
        lines.append(f"| {LABELS[r['a']]} − {LABELS[r['b']]} | {r['n']} | " + " | ".join(cells)
                     + f" | {per_seed} | {r['verdict']} |")
    lines += ["", *(f"- {v}" for v in result["verdicts"]), "",
              "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings_s"].items())]
    return "\n".join(lines) + "\n"


def plot_few_shot_curve(result: dict, path: Path) -> Path:
    """answer_accuracy, answer_nll and nll vs n per method (seeds pooled), 95% CI bands."""
    from lora_maml.eval.report import _pyplot, _save_figure, shots_axis

    plt = _pyplot()
    metrics = [m for m, _, _ in METRICS]
    order = {m: i for i, m in enumerate(metrics)}
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), layout="constrained")
    for method in ["base", *result["methods"]]:
        rows = sorted((r for r in result["summary"] if r["init"] == method), key=lambda r: r["n"])
        x = [r["n"] for r in rows]
        for metric in metrics:
            ax = axes[order[metric]]
            y = [r[metric] if r[metric] is not None else math.nan for r in rows]
            line, = ax.plot(x, y, marker="o", label=LABELS[method])
            lo = [r[f"{metric}_ci"][0] for r in rows]
            hi = [r[f"{metric}_ci"][1] for r in rows]
            keep = [i for i in range(len(x)) if lo[i] is not None and hi[i] is not None]
            ax.fill_between([x[i] for i in keep], [lo[i] for i in keep], [hi[i] for i in keep],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    for metric, ax in zip(metrics, axes):
        shots_axis(ax, result["n_shots"], metric)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Few-shot adaptation ({result['settings']['eval_on']} tasks, 95% CI)")
    _save_figure(fig, path)
    plt.close(fig)
    return path


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
    p.add_argument("--source", help="data: any `lora-maml prepare --source` (default: the MATH archive "
                   f"{DEFAULT_MATH}; with --tiny: synthetic)")
    p.add_argument("--pretrain", metavar="SOURCE", help="first train every weight of the base on this source's text "
                   "(e.g. synthetic-rules:named=8,per_task=400)")
    p.add_argument("--pretrain-steps", type=int, default=500, help="pretraining steps (default 500)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="pretraining learning rate (default 1e-3)")
    p.add_argument("--config", help=f"training config (default {DEFAULT_CONFIG.relative_to(REPO_ROOT)}; "
                   f"with --tiny {TINY_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["fomaml", "sft_steps", "sft_tokens"],
                   help="what to train from the base (default: fomaml sft_steps sft_tokens)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--n-shots", nargs="+", type=int, default=[5, 10], help="shot counts (default 5 10)")
    p.add_argument("--eval-on", choices=["all", "holdout"], default="all",
                   help="evaluate the config's tasks (all) or only tasks never seen in meta-training (holdout)")
    p.add_argument("--episodes", type=int, default=2, help="shot draws per task and n (default 2)")
    p.add_argument("--test-per-episode", type=int, default=8, help="scored problems per task (default 8)")
    p.add_argument("--plan-seed", type=int, default=0, help="seed of the scored problems and shot draws (default 0)")
    p.add_argument("--data-seed", type=int, default=42, help="seed of the data (generation and split; default 42)")
    p.add_argument("--tiny-per-task", type=int, default=40, help="problems per task of --source synthetic (default 40)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], help="evaluation dtype (default: model.dtype)")
    p.add_argument("--verdict-metric", default="nll", choices=[name for name, _ in _series_names()],
                   help="the metric verdicts are given on (default nll)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--in-process", action="store_true", help="run the training recipes in this process, not subprocesses")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (subprocesses sharing OMP_NUM_THREADS; "
                   "default 1). The runs of a seed are independent: 2 halves the training time on 2 cores")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training run")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.tiny == (args.model is not None):
        raise ValueError("give exactly one of --model PATH or --tiny")
    for flag, value in (("--episodes", args.episodes), ("--test-per-episode", args.test_per_episode),
                        ("--n-boot", args.n_boot), ("--tiny-per-task", args.tiny_per_task),
                        ("--pretrain-steps", args.pretrain_steps)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.jobs < 1 or (args.jobs > 1 and args.in_process):
        raise ValueError(f"--jobs {args.jobs}: expected >= 1, and 1 with --in-process")
    if not args.pretrain_lr > 0 or not math.isfinite(args.pretrain_lr):
        raise ValueError(f"--pretrain-lr must be a positive finite number, got {args.pretrain_lr}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: duplicates in {args.seeds}")
    if len(set(args.methods)) != len(args.methods):
        raise ValueError(f"--methods: duplicates in {args.methods}")
    if "sft_tokens" in args.methods and "fomaml" not in args.methods:
        raise ValueError("--methods: sft_tokens is matched to the fomaml run's tokens; add fomaml")
    if min(args.n_shots) < 0 or len(set(args.n_shots)) != len(args.n_shots):
        raise ValueError(f"--n-shots {args.n_shots}: expected distinct integers >= 0")
    for item in args.overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value (e.g. trainer.total_steps=100)")
        if key in CONTROLLED:
            raise ValueError(f"override {item!r}: {key} is managed by this script ({', '.join(CONTROLLED)})")


def run(args: argparse.Namespace) -> dict:
    from lora_maml.atomic import write_text_atomic
    from lora_maml.config import load_config
    from lora_maml.data.prepare import read_manifest
    from lora_maml.eval.report import plot_learning_curves

    check_args(args)
    args.source = args.source or ("synthetic" if args.tiny else str(DEFAULT_MATH))
    config = Path(args.config).expanduser().resolve() if args.config else (TINY_CONFIG if args.tiny else DEFAULT_CONFIG)
    if not config.is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with phase("1/6 base model", timings):
        base_dir = prepare_base_model(args, out)
    common = [f"model.partial_pretrain={base_dir}", "model.gguf_file=null", "model.build_tiny_if_missing=false",
              f"data.data_dir={out / 'data'}", f"data.source={args.source}"]
    # The settings every run shares (seed and run dir aside), validated before anything is trained.
    cfg = load_config(config, [*args.overrides, *common])
    with phase("2/6 data", timings):
        data_dir = prepare_data(args, cfg, base_dir, out, "data", args.source)
    pretrained = None
    with phase("3/6 pretraining", timings):
        if args.pretrain:
            pretrain_data = prepare_data(args, cfg, base_dir, out, "pretrain_data", args.pretrain)
            base_dir, last_loss = pretrain(args, config, base_dir, pretrain_data, out)
            pretrained = {"source": args.pretrain, "steps": args.pretrain_steps, "lr": args.pretrain_lr,
                          "last_loss": last_loss, "model": str(base_dir)}
            common[0] = f"model.partial_pretrain={base_dir}"
        else:
            print("no --pretrain: the runs start from the base model as it is")
    with phase("4/6 training", timings):
        runs = train_all(args, config, common, out)
    with phase("5/6 evaluation", timings):
        rows_by_init, settings = evaluate_all(args, cfg, base_dir, data_dir, runs, out)
    with phase("6/6 statistics", timings):
        stats = statistics(paired_values(rows_by_init), args.methods, args.seeds, args.n_shots, args.n_boot,
                           args.boot_seed, args.verdict_metric, sampled_tasks=args.eval_on == "holdout")
    timings["total"] = round(time.perf_counter() - started, 1)
    source_meta = read_manifest(data_dir)["source"]
    result = {"config": str(config), "overrides": list(args.overrides), "base_model": str(base_dir),
              "source": args.source, "pretrain": pretrained, "methods": list(args.methods), "seeds": list(args.seeds),
              "n_shots": sorted(args.n_shots), "episodes": args.episodes, "test_per_episode": args.test_per_episode,
              "n_boot": args.n_boot, "boot_seed": args.boot_seed, "verdict_metric": args.verdict_metric,
              "chance_nll_per_answer_token": source_meta.get("chance_nll_per_answer_token"),
              "settings": settings, "runs": {k: str(v) for k, v in runs.items()}, **stats, "timings_s": timings}
    result = jsonable(result)
    markdown = render_markdown(result)
    write_json(out / "results.json", result)
    write_text_atomic(out / "results.md", markdown)
    plot_few_shot_curve(result, out / "few_shot_curve.png")
    curves = {name: path for name, path in runs.items() if name.endswith(f"_{args.seeds[0]}")}
    plot_learning_curves(curves, out / "learning_curves.png")
    print("\n" + markdown)
    print(f"wrote {out / 'results.md'}, results.json, few_shot_curve.png, learning_curves.png")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python recipes/meta_vs_sft.py ...``; a user error is one ``error:`` line and exit code 1."""
    from lora_maml.errors import run_main

    def command(args: list[str]) -> int:
        run(build_parser().parse_args(args))
        return 0

    return run_main(command, sys.argv[1:] if argv is None else argv)
