"""Does FOMAML beat plain multi-task SFT as an initialisation for few-shot adaptation? (issue 7)

    python benchmarks/meta_vs_sft.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf      # ~65 min on 2 CPU cores
    python benchmarks/meta_vs_sft.py --model DIR --seeds 0 1 2 --n-shots 5 10 25 -- trainer.total_steps=200
    python benchmarks/meta_vs_sft.py --tiny --out /tmp/mvs -- trainer.total_steps=3    # smoke run, seconds

Trailing ``key=value`` config overrides (after ``--``, or before the options) apply to every training run.
Everything goes under ``--out`` (default ``outputs/meta_vs_sft`` in the repository, which git ignores). Each
phase skips what an earlier invocation finished, so an interrupted run resumes where it stopped
(a training run killed half-way resumes from its last checkpoint); every file is written atomically.

1. Base model. ``--model DIR`` is used as it is. ``--model FILE.gguf`` is dequantised ONCE to fp32 into
   ``<out>/base_model`` (``lora_maml.models.load_base`` detaches the GGUF quantizer; model and tokenizer
   saved with ``save_pretrained``). ``--tiny``: a tiny random-init Qwen3 (``lora_maml.tiny_model``) instead.
2. Data. The MATH train records (``--math``; ``--tiny``: the synthetic suite) of the config's ``data.tasks``
   whose encoded example (chat template + solution + EOS, the model's tokenizer) fits ``data.max_length``
   without truncation, written to ``<out>/records.jsonl`` and split by ``lora_maml.data.prepare`` into
   ``<out>/data`` (``--data-seed``, the config's ratios). The other subjects are written unfiltered only
   because ``prepare`` splits every subject; nothing reads them.
3. Training, per seed s (``trainer.seed=s``), from the same base, with the config + overrides:
   ``fomaml_s`` (``recipes/fomaml_math.py``), ``sft_steps_s`` (``recipes/sft_math.py``, the same
   ``trainer.total_steps`` optimizer steps) and ``sft_tokens_s`` (``sft.match_tokens_of=<fomaml_s>``: as many
   label tokens as FOMAML trained on). Each recipe runs in a subprocess (``--in-process``: in this one);
   ``<out>/runs/<name>.done.json`` marks a finished run and holds its arguments.
4. Evaluation: ONE plan (``plan_episodes`` on ``<out>/data``: the config's tasks, ``--n-shots``, ``--episodes``
   shot draws per task and n, ``--test-per-episode`` scored problems per task) shared by every init: ``base``
   (the base model with a fresh LoRA shaped like the runs', B = 0, so it is the base model) and every run.
   Every init adapts with the SAME inner loop: the config's ``meta.inner_optimizer`` / ``meta.inner_lr`` /
   ``meta.num_inner_steps``, full-batch steps over all n shots in micro-batches of ``meta.inner_batch_size``
   (``lora_maml.eval.few_shot.evaluate_model`` with ``generate=False``: NLL only). A Meta-SGD run's learned
   rates are NOT used here, so that the inits differ in their weights only. Rows per init in
   ``<out>/eval/rows/<init>.json``: per (episode, problem) ``nll`` (after adaptation) and ``nll_pre``
   (at the init's own weights).
5. Statistics, per n, pooled over tasks: per init and per method (its seeds pooled), the mean post-adaptation
   NLL and the mean gain ``nll_pre - nll``; FOMAML - SFT(steps) and FOMAML - SFT(tokens): the mean paired
   difference of post NLL and of gain (seed s paired with seed s, the same episode and problem). 95% CIs:
   a bootstrap over EPISODES (clusters: every scored problem of an episode, all seeds, moves together;
   resampled within each task; the same resamples for every init, comparison and metric of an n), via
   ``lora_maml.eval.report.bootstrap_mean`` / ``paired_bootstrap`` on [episodes x 1] grids of episode means
   (with every episode scoring the same number of rows, their pooled mean is the mean over rows). A verdict
   per comparison: "better / worse / not distinguishable at 95%" on post-adaptation NLL (lower is better);
   "better" or "worse" also needs every seed's paired mean on that side (the CI does not cover training seeds).
   ``<out>/results.json`` and ``<out>/results.md``; the table and the wall time of every phase are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "recipes" / "configs" / "smollm2_135m_math.yaml"
TINY_CONFIG = REPO_ROOT / "recipes" / "configs" / "tiny_cpu.yaml"
DEFAULT_MATH = REPO_ROOT.parent / "shared" / "data" / "MATH.tar.gz"
DEFAULT_OUT = REPO_ROOT / "outputs" / "meta_vs_sft"
RECIPES = {"fomaml": REPO_ROOT / "recipes" / "fomaml_math.py", "sft": REPO_ROOT / "recipes" / "sft_math.py"}
KINDS = ("fomaml", "sft_steps", "sft_tokens")
COMPARISONS = (("fomaml", "sft_steps"), ("fomaml", "sft_tokens"))
LABELS = {"base": "base", "fomaml": "FOMAML", "sft_steps": "SFT (matched steps)", "sft_tokens": "SFT (matched tokens)"}
# Keys this script sets (or relies on) per run; a user override of one would silently break the design.
CONTROLLED = ("model.partial_pretrain", "model.gguf_file", "model.build_tiny_if_missing", "data.data_dir",
              "data.source", "trainer.seed", "trainer.default_local_dir", "trainer.experiment_name",
              "trainer.resume_mode", "sft.match_tokens_of")
BASE_SOURCE_FILE = "meta_vs_sft_source.json"
TINY_MODEL = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=16, intermediate_size=64)


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


# --- 1. base model ---------------------------------------------------------------------------
def prepare_base_model(args: argparse.Namespace, out: Path) -> Path:
    """The base model directory every run starts from (see the module docstring)."""
    target = out / "base_model"
    if args.tiny:
        source = {"tiny": TINY_MODEL, "synthetic_per_task": args.tiny_per_task}
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
        from lora_maml.data.synthetic import synthetic_records
        from lora_maml.tiny_model import build_tiny_model

        texts = [f"{r['prompt']}\n{r['response']}" for r in synthetic_records(args.tiny_per_task, 0)]
        build_tiny_model(target, texts, overwrite=True, **TINY_MODEL)  # written atomically
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
def prepare_data(args: argparse.Namespace, cfg, base_dir: Path, out: Path) -> tuple[Path, Path]:
    """``(<out>/data, <out>/records.jsonl)``: the length-filtered records of the config's tasks, split."""
    from lora_maml.data import SUBJECTS
    from lora_maml.data import prepare
    from lora_maml.data.math import PROMPT_INSTRUCTION, load_math_records, make_prompt
    from lora_maml.data.tokenize import encode_example

    data_dir, jsonl, stamp_path = out / "data", out / "records.jsonl", out / "data_settings.json"
    tasks = list(cfg.data.tasks or SUBJECTS)
    if args.tiny:
        source = f"synthetic (seed 0, {args.tiny_per_task} per task)"
    else:
        math_path = Path(args.math).expanduser().resolve()
        if not math_path.exists():
            raise FileNotFoundError(f"--math {math_path}: no such file (the MATH archive, see ../shared/data/README.md)")
        source = str(math_path)
    settings = {"source": source, "tokenizer": str(base_dir), "tasks": tasks, "max_length": cfg.data.max_length,
                "support_ratio": cfg.data.support_ratio, "query_ratio": cfg.data.query_ratio, "seed": args.data_seed}
    stamp = read_json(stamp_path)
    if (data_dir / prepare.MANIFEST).is_file() and stamp is not None:
        if stamp != settings:
            raise ValueError(f"{data_dir} was prepared with {stamp}, not {settings}; use another --out")
        print(f"data: {data_dir} (prepared earlier, skipped)")
        return data_dir, jsonl
    write_json(stamp_path, settings)  # first: a directory prepared after it is known to match it
    if args.tiny:
        from lora_maml.data.synthetic import synthetic_records

        records = synthetic_records(args.tiny_per_task, 0)
    else:
        records, _ = load_math_records(math_path, split="train")
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

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
        problem = record["prompt"].removeprefix(f"{PROMPT_INSTRUCTION}\n\n")
        if make_prompt(problem) != record["prompt"]:
            raise ValueError(f"record {record['id']}: its prompt is not make_prompt(problem); cannot write it as MATH")
        lines.append(json.dumps({"id": record["id"], "problem": problem, "solution": record["response"],
                                 "type": task, "level": record["level"]}, ensure_ascii=False))
    for task in tasks:
        print(f"data: {task}: {kept[task]} of {total[task]} problems fit data.max_length={cfg.data.max_length}")
    from lora_maml.atomic import write_text_atomic

    write_text_atomic(jsonl, "\n".join(lines) + "\n")
    code = prepare.main([
        "--source", str(jsonl), "--output-dir", str(data_dir), "--seed", str(args.data_seed),
        "--support-ratio", str(cfg.data.support_ratio), "--query-ratio", str(cfg.data.query_ratio),
        "--validate", "--overwrite",
    ])
    if code:
        raise RuntimeError(f"preparing {data_dir} from {jsonl} failed (see the error above)")
    return data_dir, jsonl


# --- 3. training -----------------------------------------------------------------------------
def run_name(kind: str, seed: int) -> str:
    return f"{kind}_{seed}"


def run_argv(config: Path, overrides: Sequence[str], common: Sequence[str], out: Path, kind: str, seed: int) -> list[str]:
    """The recipe arguments of one run (user overrides first: the per-run keys of this script win)."""
    name = run_name(kind, seed)
    argv = ["--config", str(config), *overrides, *common, f"trainer.seed={seed}",
            f"trainer.default_local_dir={out / 'runs' / name}", f"trainer.experiment_name=meta_vs_sft_{name}"]
    if kind == "sft_steps":
        argv.append("sft.match_tokens_of=null")
    elif kind == "sft_tokens":
        argv.append(f"sft.match_tokens_of={out / 'runs' / run_name('fomaml', seed)}")
    return argv


def _recipe_main(script: Path):
    spec = importlib.util.spec_from_file_location(f"_meta_vs_sft_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def train_all(args: argparse.Namespace, config: Path, overrides: Sequence[str], common: Sequence[str],
              out: Path) -> dict[str, Path]:
    """Train every (kind, seed) that has no done marker with the same arguments; return ``{name: run dir}``."""
    runs = {}
    todo = [(kind, seed) for seed in args.seeds for kind in KINDS]
    for i, (kind, seed) in enumerate(todo, 1):
        name = run_name(kind, seed)
        run_dir, marker = out / "runs" / name, out / "runs" / f"{name}.done.json"
        argv = run_argv(config, overrides, common, out, kind, seed)
        runs[name] = run_dir
        done = read_json(marker)
        if done is not None:
            if done["argv"] != argv:
                raise ValueError(f"{run_dir} was trained with other arguments ({marker}); use another --out or "
                                 f"delete both to retrain:\n  was: {done['argv']}\n  now: {argv}")
            print(f"[{i}/{len(todo)}] {name}: finished earlier, skipped ({run_dir})")
            continue
        script = RECIPES["fomaml" if kind == "fomaml" else "sft"]
        print(f"[{i}/{len(todo)}] {name}: {script.name} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        if args.in_process:
            code = _recipe_main(script)(argv)
        else:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            code = subprocess.run([sys.executable, str(script), *argv], env=env, check=False).returncode
        if code:
            raise RuntimeError(f"{name}: {script.name} exited with {code} (output above); rerun this command to "
                               f"resume it from its last checkpoint in {run_dir}")
        write_json(marker, {"argv": argv, "seconds": round(time.perf_counter() - start, 1)})
        print(f"[{i}/{len(todo)}] {name}: trained in {time.perf_counter() - start:.1f} s")
    return runs


# --- 4. evaluation ---------------------------------------------------------------------------
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

    from lora_maml.eval.few_shot import episode_records, evaluate_model, plan_episodes, plan_fingerprint
    from lora_maml.load_trained import load_trained

    tasks = list(cfg.data.tasks) if cfg.data.tasks else None
    episodes = plan_episodes(data_dir, tasks, args.n_shots, args.episodes, args.test_per_episode, args.plan_seed)
    short = sorted({ep.task for ep in episodes if len(ep.test_ids) < args.test_per_episode})
    if short:
        # Equal cluster sizes make the pooled episode means the mean over rows (module docstring, 5).
        raise ValueError(f"tasks {short} have fewer than --test-per-episode={args.test_per_episode} test problems "
                         f"after the length filter; lower --test-per-episode")
    records = episode_records(data_dir, episodes)
    fingerprint = plan_fingerprint(episodes)
    write_json(out / "eval" / "plan.json", {"plan_sha256": fingerprint, "episodes": [asdict(ep) for ep in episodes]})
    meta = cfg.meta
    settings = {"adapt_lr": meta.inner_lr, "adapt_steps": meta.num_inner_steps, "adapt_batch_size": meta.inner_batch_size,
                "adapt_optimizer": meta.inner_optimizer, "max_length": cfg.data.max_length, "truncation": "error"}
    dtype = args.dtype or cfg.model.dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(episodes)} episodes, {sum(len(ep.test_ids) for ep in episodes)} scored problems per init "
          f"(plan sha256 {fingerprint[:12]}); every init adapts: {meta.inner_optimizer} lr={meta.inner_lr} "
          f"steps={meta.num_inner_steps} micro-batch={meta.inner_batch_size}; {dtype} on {device}")
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
        if trained.inner_lrs is not None:
            print(f"[{i}/{len(inits)}] {name}: its learned Meta-SGD rates are not used (every init adapts alike)")
        rows = evaluate_model(
            trained, episodes, records, adapt_lr=meta.inner_lr, adapt_steps=meta.num_inner_steps,
            adapt_batch_size=meta.inner_batch_size, adapt_optimizer=meta.inner_optimizer, generate=False,
            max_length=cfg.data.max_length, truncation="error", desc=name,
        )
        del trained
        gc.collect()
        rows = [{k: r[k] for k in ("task", "n", "seed", "id", "shot_ids", "tokens", "nll", "nll_pre")} for r in rows]
        write_json(rows_path, {"identity": identity, "seconds": round(time.perf_counter() - start, 1), "rows": rows})
        rows_by_init[name] = rows
        print(f"[{i}/{len(inits)}] {name}: evaluated in {time.perf_counter() - start:.1f} s")
    return rows_by_init, settings | {"dtype": dtype, "plan_sha256": fingerprint}


# --- 5. statistics ---------------------------------------------------------------------------
def paired_values(rows_by_init: dict[str, list[dict]]) -> dict[str, dict[tuple, tuple[float, float]]]:
    """``{init: {(n, task, episode seed, problem id): (nll, nll_pre)}}``; every init must cover the same keys."""
    values = {}
    for init, rows in rows_by_init.items():
        table = {}
        for r in rows:
            key = (int(r["n"]), r["task"], int(r["seed"]), r["id"])
            if key in table:
                raise ValueError(f"init {init!r}: (n, task, episode, problem) {key} scored twice")
            table[key] = (float(r["nll"]), float(r["nll_pre"]))
        values[init] = table
    first = next(iter(values))
    for init, table in values.items():
        if table.keys() != values[first].keys():
            raise ValueError(f"inits {first!r} and {init!r} were not scored on the same (episode, problem) set: "
                             f"{sorted(table.keys() ^ values[first].keys())[:3]}")
    return values


def episode_grids(values: dict[tuple, float], n: int) -> list[np.ndarray]:
    """Per task, an [episodes x 1] grid of episode means of ``values`` (keys (n, task, seed, id, ...)) at ``n``."""
    sums: dict[str, dict[int, list[float]]] = {}
    for key, value in values.items():
        if key[0] == n:
            sums.setdefault(key[1], {}).setdefault(key[2], []).append(value)
    return [np.array([[np.mean(per_episode[e])] for e in sorted(per_episode)]) for _, per_episode in sorted(sums.items())]


def statistics(values: dict, seeds: Sequence[int], n_shots: Sequence[int], n_boot: int, boot_seed: int) -> dict:
    """Summary rows per init / method and n, paired comparisons, verdicts (see the module docstring, 5)."""
    from lora_maml.eval.report import bootstrap_mean, paired_bootstrap

    def rng(n: int) -> np.random.Generator:
        # One stream per n for every init, comparison and metric: identical grids shapes -> identical resamples.
        return np.random.default_rng([boot_seed, n])

    def without_ci_if_one_episode(stat: dict, grids: list[np.ndarray]) -> dict:
        # One episode in a task (n = 0, or --episodes 1): resampling episodes there shows no variation at all.
        if min(len(g) for g in grids) < 2:
            return stat | {"ci": [math.nan, math.nan], "p": math.nan}
        return stat

    units = {"base": ["base"], **{kind: [run_name(kind, s) for s in seeds] for kind in KINDS},
             **{run_name(kind, s): [run_name(kind, s)] for kind in KINDS for s in seeds}}
    summary = []
    for unit, inits in units.items():
        for n in sorted(n_shots):
            row = {"init": unit, "seeds": len(inits), "n": n}
            for metric in ("nll", "gain"):
                flat = {(*key, init): (v[0] if metric == "nll" else v[1] - v[0])
                        for init in inits for key, v in values[init].items()}
                grids = episode_grids(flat, n)
                stat = without_ci_if_one_episode(bootstrap_mean(grids, n_boot=n_boot, rng=rng(n)), grids)
                row[metric], row[f"{metric}_ci"] = stat["mean"], stat["ci"]
            row["rows"] = sum(1 for init in inits for key in values[init] if key[0] == n)
            summary.append(row)
    comparisons, verdicts = [], []
    for a, b in COMPARISONS:
        for n in sorted(n_shots):
            row = {"a": a, "b": b, "n": n}
            for metric in ("nll", "gain"):
                diffs = {}
                for s in seeds:
                    va, vb = values[run_name(a, s)], values[run_name(b, s)]
                    for key, (post_a, pre_a) in va.items():
                        post_b, pre_b = vb[key]
                        diffs[(*key, s)] = post_a - post_b if metric == "nll" else (pre_a - post_a) - (pre_b - post_b)
                grids = episode_grids(diffs, n)
                stat = without_ci_if_one_episode(paired_bootstrap(grids, n_boot=n_boot, rng=rng(n)), grids)
                row[f"{metric}_diff"], row[f"{metric}_diff_ci"], row[f"{metric}_p"] = stat["diff"], stat["ci"], stat["p"]
                # The bootstrap resamples episodes, not training runs: the per-seed means show the seeds' spread.
                row[f"{metric}_diff_by_seed"] = {
                    str(s): float(np.mean([d for key, d in diffs.items() if key[0] == n and key[-1] == s]))
                    for s in seeds
                }
                row["pairs"] = sum(1 for key in diffs if key[0] == n)
            row["verdict"] = verdict(row)
            comparisons.append(row)
            verdicts.append(verdict_line(row))
    return {"summary": summary, "comparisons": comparisons, "verdicts": verdicts}


def verdict(row: dict) -> str:
    """On post-adaptation NLL: the episode-bootstrap CI must exclude 0 AND every training seed's paired
    mean must lie on the same side, since the CI does not cover the seed-to-seed spread of training."""
    lo, hi = row["nll_diff_ci"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no 95% CI (one episode per task)"
    by_seed = list(row["nll_diff_by_seed"].values())
    if hi < 0 or lo > 0:
        if all(d < 0 for d in by_seed) if hi < 0 else all(d > 0 for d in by_seed):
            return "FOMAML init better" if hi < 0 else "FOMAML init worse"
        return "not distinguishable: the 95% CI excludes 0 but the training seeds disagree in sign"
    return "not distinguishable at 95%"


def finite_or_none(obj):
    """NaN/inf (a degenerate bootstrap) → None, recursively: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _fmt(value: float, ci: Sequence[float] | None = None, sign: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    text = f"{value:+.4f}" if sign else f"{value:.4f}"
    if ci is not None and all(math.isfinite(c) for c in ci):
        text += f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if sign else f" [{ci[0]:.4f}, {ci[1]:.4f}]"
    return text


def _fmt_p(p: float) -> str:
    return "–" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def verdict_line(row: dict) -> str:
    return (f"n={row['n']}: FOMAML vs {LABELS[row['b']]}: {row['verdict']} on post-adaptation NLL "
            f"(FOMAML − SFT {_fmt(row['nll_diff'], row['nll_diff_ci'], sign=True)}, p {_fmt_p(row['nll_p'])}); "
            f"adaptation gain FOMAML − SFT {_fmt(row['gain_diff'], row['gain_diff_ci'], sign=True)} "
            f"(p {_fmt_p(row['gain_p'])}; > 0: FOMAML's init gains more from the same adaptation)")


def render_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# FOMAML vs multi-task SFT as an initialisation for few-shot adaptation", "",
        f"Config `{result['config']}`, seeds {result['seeds']}, {result['episodes']} episodes per task and n, "
        f"{result['test_per_episode']} scored problems per task; every init adapts alike: {s['adapt_optimizer']} "
        f"lr {s['adapt_lr']}, {s['adapt_steps']} full-batch steps over the n shots. NLL: mean token NLL of the "
        "reference solution (lower is better); gain = NLL before − after adaptation. Means over every "
        f"(seed, episode, problem); [95% CI]: bootstrap over episodes within tasks (B = {result['n_boot']}). "
        "Method rows pool their seeds.", "",
        "| init | n | post-adaptation NLL [95% CI] | gain [95% CI] |", "|---|---:|---:|---:|",
    ]
    for r in result["summary"]:
        lines.append(f"| {r['init']} | {r['n']} | {_fmt(r['nll'], r['nll_ci'])} | {_fmt(r['gain'], r['gain_ci'], sign=True)} |")
    lines += ["", "| comparison (paired, seed s with seed s) | n | Δ post NLL [95% CI] | p | Δ post NLL per seed | "
              "Δ gain [95% CI] | p | verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["comparisons"]:
        per_seed = ", ".join(f"{d:+.4f}" for d in r["nll_diff_by_seed"].values())
        lines.append(f"| FOMAML − {LABELS[r['b']]} | {r['n']} | {_fmt(r['nll_diff'], r['nll_diff_ci'], sign=True)} | "
                     f"{_fmt_p(r['nll_p'])} | {per_seed} | {_fmt(r['gain_diff'], r['gain_diff_ci'], sign=True)} | "
                     f"{_fmt_p(r['gain_p'])} | {r['verdict']} |")
    lines += ["", *(f"- {v}" for v in result["verdicts"]), "",
              "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings_s"].items())]
    return "\n".join(lines) + "\n"


# --- command line ----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="FOMAML vs multi-task SFT (matched steps, matched tokens) as an initialisation for few-shot "
        "adaptation: train, evaluate on one plan, paired statistics. Resumable.",
        epilog="key=value overrides go after '--' (or before the options); they apply to every training run.",
    )
    p.add_argument("--model", help="base model: a Hugging Face model directory or a .gguf file (dequantised once)")
    p.add_argument("--math", default=str(DEFAULT_MATH), help="MATH archive or directory (default %(default)s)")
    p.add_argument("--config", help=f"training config (default {DEFAULT_CONFIG.relative_to(REPO_ROOT)}; "
                   f"with --tiny {TINY_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--n-shots", nargs="+", type=int, default=[5, 10], help="shot counts (default 5 10)")
    p.add_argument("--episodes", type=int, default=2, help="shot draws per task and n (default 2)")
    p.add_argument("--test-per-episode", type=int, default=8, help="scored problems per task (default 8)")
    p.add_argument("--plan-seed", type=int, default=0, help="seed of the scored problems and shot draws (default 0)")
    p.add_argument("--data-seed", type=int, default=42, help="seed of the support/query/test split (default 42)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], help="evaluation dtype (default: model.dtype)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--in-process", action="store_true", help="run the training recipes in this process, not subprocesses")
    p.add_argument("--tiny", action="store_true", help="smoke mode: a tiny random Qwen3 and the synthetic suite "
                   "(no --model, no MATH)")
    p.add_argument("--tiny-per-task", type=int, default=40, help="synthetic problems per task with --tiny (default 40)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training run")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.tiny == (args.model is not None):
        raise ValueError("give exactly one of --model PATH or --tiny")
    for flag, value in (("--episodes", args.episodes), ("--test-per-episode", args.test_per_episode),
                        ("--n-boot", args.n_boot), ("--tiny-per-task", args.tiny_per_task)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds: duplicates in {args.seeds}")
    if min(args.n_shots) < 0 or len(set(args.n_shots)) != len(args.n_shots):
        raise ValueError(f"--n-shots {args.n_shots}: expected distinct integers >= 0")
    for item in args.overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value (e.g. trainer.total_steps=100)")
        if key in CONTROLLED:
            raise ValueError(f"override {item!r}: {key} is managed by this script ({', '.join(CONTROLLED)})")


def run(args: argparse.Namespace) -> dict:
    from lora_maml.config import load_config

    check_args(args)
    config = Path(args.config).expanduser().resolve() if args.config else (TINY_CONFIG if args.tiny else DEFAULT_CONFIG)
    if not config.is_file():
        raise FileNotFoundError(f"--config {config}: no such file")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with phase("1/5 base model", timings):
        base_dir = prepare_base_model(args, out)
    common = [f"model.partial_pretrain={base_dir}", "model.gguf_file=null", "model.build_tiny_if_missing=false",
              f"data.data_dir={out / 'data'}", f"data.source={out / 'records.jsonl'}"]
    # The settings every run shares (seed and run dir aside), validated before anything is trained.
    cfg = load_config(config, [*args.overrides, *common])
    with phase("2/5 data", timings):
        data_dir, _ = prepare_data(args, cfg, base_dir, out)
    with phase("3/5 training", timings):
        runs = train_all(args, config, args.overrides, common, out)
    with phase("4/5 evaluation", timings):
        rows_by_init, settings = evaluate_all(args, cfg, base_dir, data_dir, runs, out)
    with phase("5/5 statistics", timings):
        stats = statistics(paired_values(rows_by_init), args.seeds, args.n_shots, args.n_boot, args.boot_seed)
    timings["total"] = round(time.perf_counter() - started, 1)
    result = {"config": str(config), "overrides": list(args.overrides), "base_model": str(base_dir),
              "seeds": list(args.seeds), "n_shots": sorted(args.n_shots), "episodes": args.episodes,
              "test_per_episode": args.test_per_episode, "n_boot": args.n_boot, "boot_seed": args.boot_seed,
              "settings": settings, "runs": {k: str(v) for k, v in runs.items()}, **stats, "timings_s": timings}
    markdown = render_markdown(result)
    from lora_maml.atomic import write_text_atomic

    write_json(out / "results.json", finite_or_none(result))
    write_text_atomic(out / "results.md", markdown)
    print("\n" + markdown)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lora_maml.config import ConfigError
    from lora_maml.train.checkpoint import CheckpointError

    try:
        run(args)
    except (ValueError, OSError, RuntimeError, ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
