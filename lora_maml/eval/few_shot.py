"""Few-shot scoring of one loaded model: per episode, adapt on its n shots, then score its problems.

:func:`evaluate_model` takes the episodes of :mod:`lora_maml.eval.plan` and one :class:`AdaptSettings`,
and returns one row per (episode, scored problem). Each episode starts from the loaded weights:

1. adapt (n > 0, ``steps`` > 0): ``steps`` full-batch steps of ``optimizer`` over all n shots (cut into
   micro-batches of ``batch_size``, loss = their token-weighted mean) on fast weights
   (:func:`lora_maml.meta.algorithms.adapt`; the loaded parameters are never written), model in train
   mode, torch RNG seeded per episode;
2. score each problem under teacher forcing at the adapted weights and, once per problem, at the
   loaded ones (``*_pre``): mean token NLL of the reference solution (nats), and on the tokens of its
   final boxed answer their mean NLL and the fraction the model ranks first;
3. generate greedily (``generate=True``) with a backend of :mod:`lora_maml.eval.generation`, and grade
   with the ``math_accuracy`` metric (:func:`lora_maml.eval.grading.load_metric`, the grader users load
   with ``evaluate.load``).

In context (``AdaptSettings.shots_in_prompt``, in-context learning): the episode's n shots are written
into the prompt of every scored problem, its generation prompt and its ``*_pre`` scores, in the chat
format of :func:`lora_maml.data.tokenize.chat_messages`; ``steps=0`` is ICL alone, ``steps`` > 0 adapts
each shot after the episode's other shots and scores in context (ICL + gradient adaptation). The plan,
the scored tokens and the rows are the same as without, so the rows pair.

Non-finite numbers are never scored: the loaded weights giving non-finite logits is an error (a corrupt
model or adapter, e.g. a huge ``lora_alpha``, or an overflow in its dtype); an adaptation that ends in
non-finite weights or logits (e.g. too high a learning rate) marks its rows ``invalid`` (the reason), with
no scores, no generation and no grades, which the report counts and leaves out of its means.

The full protocol, the backends and the command line (``recipes/evaluate_few_shot.py``): docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora_maml.config import MIN_MAX_LENGTH
from lora_maml.data.tokenize import Truncation, collate, encode_example, in_context_cap, prompt_ids
from lora_maml.eval.generation import Generated, GenerationBackend, HFBackend, device_of
from lora_maml.eval.grading import DEFAULT_TIMEOUT_S, load_metric
from lora_maml.eval.plan import Episode
from lora_maml.loss import IGNORE_INDEX, token_nll_and_hits
from lora_maml.meta.algorithms import adapt as adapt_weights
from lora_maml.meta.fast_weights import FunctionalLoss

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_TRUNCATION = "right"
INNER_OPTIMIZERS = ("sgd", "adam")
TRUNCATIONS = get_args(Truncation)
# What generate=False leaves in a row's generation and grading fields.
_NOT_GENERATED = {"text": None, "tokens": None, "finished": None}
_NOT_GRADED = {"extracted": None, "math_verify": None, "strict": None}


@dataclass(frozen=True)
class AdaptSettings:
    """How every episode adapts, and the token caps of its shots and references.

    ``lr``: one learning rate, or one per parameter name of ``Trained.params`` (Meta-SGD's learned
    rates); ``steps``: full-batch steps over the n shots (0: no adaptation); ``batch_size``: shots per
    micro-batch of a step; ``optimizer``: ``sgd`` or ``adam`` (a fresh bias-corrected Adam per episode,
    the meta-training inner loop's). ``lr``, ``steps`` and ``batch_size`` may be None (not set) only for
    an evaluation in which no episode adapts. ``max_length`` / ``truncation`` cap shots and references
    as training does (``data.max_length`` / ``data.truncation``; at least ``MIN_MAX_LENGTH`` tokens, the
    config key's minimum). ``shots_in_prompt``: in-context learning — every scored problem follows the
    episode's n shots in its prompt (:func:`lora_maml.data.tokenize.chat_messages`); with ``steps`` > 0 the
    inner loop trains each shot after the episode's other shots, so it adapts in the format it is scored in
    (``steps=0``: ICL alone, no gradient step). Raises ``ValueError`` for a value out of range (a rate must
    be finite).
    """

    lr: float | Mapping[str, float] | None
    steps: int | None
    batch_size: int | None
    optimizer: str = "sgd"
    max_length: int = DEFAULT_MAX_LENGTH
    truncation: str = DEFAULT_TRUNCATION
    shots_in_prompt: bool = False

    def __post_init__(self) -> None:
        if self.lr is not None:
            rates = self.lr.values() if isinstance(self.lr, Mapping) else [self.lr]
            for rate in rates:
                _check_positive("lr", rate, "(one rate, or one per parameter name)")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 0):
            raise ValueError(f"AdaptSettings.steps must be an int >= 0, got {self.steps!r}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise ValueError(f"AdaptSettings.batch_size must be an int >= 1, got {self.batch_size!r}")
        if self.optimizer not in INNER_OPTIMIZERS:
            raise ValueError(f"AdaptSettings.optimizer must be one of {'|'.join(INNER_OPTIMIZERS)}, got {self.optimizer!r}")
        if not _is_int(self.max_length) or self.max_length < MIN_MAX_LENGTH:
            raise ValueError(f"AdaptSettings.max_length must be an int >= {MIN_MAX_LENGTH}, got {self.max_length!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"AdaptSettings.truncation must be one of {'|'.join(TRUNCATIONS)}, got {self.truncation!r}")
        if not isinstance(self.shots_in_prompt, bool):
            raise ValueError(f"AdaptSettings.shots_in_prompt must be a bool, got {self.shots_in_prompt!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(field: str, value, detail: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"AdaptSettings.{field} must be a positive finite number {detail}, got {value!r}")


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


Key = tuple[tuple[str, ...], str]  # (the ids of the in-context shots before it, the record's id)


def _scored_key(ep: Episode, pid: str, in_context: bool) -> Key:
    """How problem ``pid`` of ``ep`` is scored: after all the episode's shots in the prompt (``in_context``) or alone."""
    return (ep.shot_ids if in_context else (), pid)


def _shot_key(ep: Episode, sid: str, in_context: bool) -> Key:
    """How shot ``sid`` of ``ep`` is trained on: after the episode's OTHER shots in the prompt (``in_context``:
    the inner loop sees what scoring sees, without a shot answering itself) or alone."""
    return (tuple(i for i in ep.shot_ids if i != sid) if in_context else (), sid)


def check_lengths(tokenizer, episodes: Sequence[Episode], records: Mapping[str, dict], adapt: AdaptSettings, *,
                  max_new_tokens: int | None = None) -> None:
    """Raise ``ValueError`` when ``adapt``'s length cap cannot score ``episodes`` (the checks of
    :func:`evaluate_model` that need only the tokenizer): a record longer than the cap with
    ``truncation="error"``, or a cap that leaves no scored reference a token to score. For a program to
    call before it loads any weight."""
    _encode_plan(tokenizer, None, episodes, records, adapt, max_new_tokens=max_new_tokens)


def _encode_plan(tokenizer, positions: int | None, episodes: Sequence[Episode], records: Mapping[str, dict],
                 adapt: AdaptSettings, *, max_new_tokens: int | None) -> tuple[dict[Key, dict], dict[Key, list[int]], set[Key]]:
    """Encode every shot and scored problem of ``episodes`` (:func:`encode_example`) and, when
    ``max_new_tokens`` is given, every generation prompt, within the lengths the model can take
    (``positions``: its ``max_position_embeddings``, None when unknown). Returns the examples and the
    prompts by :data:`Key` (with ``adapt.shots_in_prompt``, a problem is encoded once per episode, after that
    episode's shots), and the keys of the prompts that were cut.

    An example with k shots in its prompt is cut to ``min((k + 1) * max_length, max_position_embeddings)``
    tokens (it holds k + 1 records, each of which training caps at ``max_length``) as training cuts examples
    (``adapt.truncation``: ``left`` drops the oldest context first). A prompt may take
    ``max_position_embeddings - max_new_tokens`` tokens (and at most its example's cap); a longer one keeps
    its LAST tokens (the end of the problem and the assistant turn the model answers in), or with
    ``truncation=error`` raises ``ValueError`` naming the record. Truncations are counted in one warning;
    without these caps a 100k-token problem would be fed to the model whole. A cap that leaves no scored
    reference a target token (right truncation shorter than every scored prompt) raises ``ValueError``:
    nothing would be scored.
    """
    in_context = adapt.shots_in_prompt

    def cap(context: Sequence[str]) -> int:
        return in_context_cap(adapt.max_length, len(context), positions)

    if positions is not None and adapt.max_length > positions:
        log.warning("max_length %d exceeds the model's max_position_embeddings: shots and references are cut "
                    "to %d tokens", adapt.max_length, positions)
    scored = list(dict.fromkeys(_scored_key(ep, pid, in_context) for ep in episodes for pid in ep.test_ids))
    trained = [_shot_key(ep, sid, in_context) for ep in episodes if ep.n > 0 and adapt.steps for sid in ep.shot_ids]
    encoded = {}
    for key in dict.fromkeys([*trained, *scored]):
        context, rid = key
        shots = [(records[i]["prompt"], records[i]["response"]) for i in context]
        try:
            encoded[key] = encode_example(tokenizer, records[rid]["prompt"], records[rid]["response"],
                                          max_length=cap(context), truncation=adapt.truncation,
                                          answer=records[rid]["answer"], shots=shots)
        except ValueError as err:
            where = f" after the in-context shots {list(context)}" if context else ""
            raise ValueError(f"record {rid}{where}: {err}") from None
    if scored and not any(label != IGNORE_INDEX for key in scored for label in encoded[key]["labels"][1:]):
        shortest = min(len(prompt_ids(tokenizer, records[rid]["prompt"])) for _, rid in scored)
        raise ValueError(
            f"max_length={adapt.max_length} ({adapt.truncation} truncation) leaves no scored problem a token of its "
            f"solution to score: the shortest of the {len(scored)} scored prompts takes {shortest} tokens with the "
            f"chat template; expected max_length > {shortest} (or truncation=left)"
        )
    prompts: dict[Key, list[int]] = {}
    cut_prompts: set[Key] = set()
    if max_new_tokens is not None:
        ungraded = next((rid for _, rid in scored if not records[rid]["answer"]), None)
        if ungraded is not None:  # records without answers (a records: source): NLL only
            raise ValueError(f"record {ungraded}: no answer to grade a generation against; score without "
                             "generating (generate=False)")
        if positions is not None and positions - max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within the model's "
                             f"max_position_embeddings={positions}")
        for key in scored:
            context, rid = key
            prompt_cap = cap(context) if positions is None else min(cap(context), positions - max_new_tokens)
            ids = prompt_ids(tokenizer, records[rid]["prompt"], [(records[i]["prompt"], records[i]["response"])
                                                                  for i in context])
            if len(ids) > prompt_cap:
                if adapt.truncation == "error":
                    raise ValueError(
                        f"record {rid}: its prompt has {len(ids)} tokens"
                        + (f" with {len(context)} in-context shots" if context else "")
                        + f" > {prompt_cap} (min of its cap {cap(context)} and the model's max_position_embeddings="
                        f"{positions} - max_new_tokens={max_new_tokens}); set truncation to left or right to cut it"
                    )
                ids = ids[-prompt_cap:]
                cut_prompts.add(key)
            prompts[key] = ids
    cut = sum(ex["truncated"] for ex in encoded.values())
    if cut or cut_prompts:
        log.warning("%d of %d shots / references cut to their caps (%s truncation); %d of %d generation prompts cut "
                    "to their last tokens", cut, len(encoded), adapt.truncation, len(cut_prompts), len(prompts))
    return encoded, prompts, cut_prompts


def evaluate_model(
    trained,
    episodes: Sequence[Episode],
    records: Mapping[str, dict],
    adapt: AdaptSettings,
    *,
    generate: bool = True,
    backend: GenerationBackend | None = None,
    max_new_tokens: int = 1024,
    gen_batch_size: int = 16,
    grading_timeout_s: int = DEFAULT_TIMEOUT_S,
    desc: str = "episodes",
    progress: bool = True,
) -> list[dict]:
    """One row per (episode, scored problem), in the order of ``episodes`` and their ``test_ids``.

    ``trained`` has ``model``, ``tokenizer`` and ``params`` (name → the adapted parameters of ``model``),
    as :func:`lora_maml.load_trained.load_trained` returns. ``records`` maps ids to records
    (:func:`lora_maml.eval.plan.episode_records`). ``generate=False`` scores under teacher forcing only:
    the generation and grading keys are None. ``backend`` generates (default: a :class:`HFBackend` of
    ``gen_batch_size``, closed here; a backend passed in stays open for the next model); greedy, at most
    ``max_new_tokens`` per problem. ``grading_timeout_s``: math-verify's timeout per parse / comparison.

    Row keys: task, n, seed, holdout, id, shot_ids, in_context (the shots were in its prompt); nll, tokens (the reference's mean token NLL and its
    scored tokens), answer_nll, answer_accuracy, answer_tokens (the final boxed answer's tokens alone),
    truncated (the reference was cut), nll_pre, answer_nll_pre (at the loaded weights: ``nll_pre - nll``
    is the gain of adaptation; in context, with the same shots in the prompt), prompt_truncated; generation, gen_tokens, finished (a stop token ended it);
    extracted, gold, correct (math-verify), strict (notational match). A NaN score: no target token left,
    or an ``invalid`` row. invalid: None, or why the adapted episode was not scored (its adapted weights
    or logits were not finite; every score, generation and grade of the row is then None / NaN).

    Every length is checked before the first episode; ``ValueError`` for a setting out of range (e.g.
    ``adapt.lr`` unset while an episode adapts) or a record longer than the caps with
    ``truncation="error"``; ``FloatingPointError`` naming the model when its loaded weights give
    non-finite logits. The loaded parameters and the model's train/eval mode are the same after the call.
    """
    model, tokenizer, params = trained.model, trained.tokenizer, trained.params
    positions = getattr(model.config, "max_position_embeddings", None)
    if any(ep.n > 0 for ep in episodes) and adapt.steps != 0:
        for field in ("lr", "steps", "batch_size"):
            if getattr(adapt, field) is None:
                raise ValueError(f"AdaptSettings.{field} must be a positive number to adapt on n > 0 shots, got None")
    if max_new_tokens < 1 or gen_batch_size < 1:
        raise ValueError(f"max_new_tokens and gen_batch_size must be >= 1, got {max_new_tokens}, {gen_batch_size}")
    device = device_of(model)
    pad_id = _pad_id(tokenizer, model)
    names = list(params)
    fn = FunctionalLoss(model, names)
    loaded = [p.detach() for p in params.values()]
    # Every shot, reference and prompt is encoded and length-checked here, before the first episode.
    encoded, prompts, cut_prompts = _encode_plan(tokenizer, positions, episodes, records, adapt,
                                                 max_new_tokens=max_new_tokens if generate else None)
    in_context = adapt.shots_in_prompt
    # Scores at the loaded weights, per problem (and, in context, per shots before it): the same for every
    # episode that scores it so, computed once (an unadapted episode's own scores are these).
    unadapted: dict[Key, dict] = {}

    @torch.no_grad()
    def score(key: Key, weights: list[torch.Tensor]) -> dict | None:
        """NLL of the reference solution (token mean) and, on its final answer's tokens alone, the NLL and
        the fraction of tokens the model ranks first (teacher forcing: one forward, no generation); None
        when the logits are not finite (their argmax and NLL would read as accuracy 0 and no NLL)."""
        ref = encoded[key]
        batch = _to(collate([ref], pad_id, packed=False), device)
        logits = fn.logits(weights, batch)
        if not torch.isfinite(logits).all():
            return None
        nll, hits, mask = token_nll_and_hits(logits, batch["labels"])
        answer_mask = (F.pad(torch.tensor([ref["answer_labels"]]), (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX).to(device)
        n_tokens, n_answer = int(mask.sum()), int(answer_mask.sum())
        nan = float("nan")
        return {
            "nll": float(nll.sum() / n_tokens) if n_tokens else nan, "tokens": n_tokens,
            "answer_nll": float(nll[answer_mask].mean()) if n_answer else nan,
            "answer_accuracy": float(hits[answer_mask].float().mean()) if n_answer else nan,
            "answer_tokens": n_answer, "truncated": bool(ref["truncated"]),
        }

    def score_loaded(key: Key) -> dict:
        """:func:`score` at the loaded weights; non-finite logits there are an error: every episode starts from them."""
        scores = score(key, loaded)
        if scores is None:
            raise FloatingPointError(
                f"{getattr(trained, 'source', 'the model')}: its loaded weights give non-finite logits on problem "
                f"{key[1]!r}: the model or adapter is corrupt (e.g. a huge lora_alpha in adapter_config.json) or "
                "overflows in its dtype (evaluate in fp32); nothing was scored"
            )
        return scores

    if generate:
        backend_owned = backend is None
        backend = HFBackend(gen_batch_size) if backend_owned else backend
        eos_ids = _eos_ids(tokenizer, model)
        # Before any adaptation: a backend that cannot serve this model says so at once.
        backend.start(trained, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, label=desc)
    was_training = model.training
    scored: list[tuple[Episode, dict[str, dict], str | None]] = []  # (episode, scores, why it is invalid)
    bar = tqdm(episodes, desc=desc, unit="episode", dynamic_ncols=True, disable=not progress)
    try:
        for ep in bar:
            adapted = None
            if ep.n > 0 and adapt.steps > 0:
                shots = [encoded[_shot_key(ep, i, in_context)] for i in ep.shot_ids]
                micro = [_to(collate(shots[i : i + adapt.batch_size], pad_id, packed=False), device)
                         for i in range(0, len(shots), adapt.batch_size)]
                model.train()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(_rng_seed(ep))
                    # One element = one inner step over ALL micro-batches (token-weighted mean loss).
                    adapted = adapt_weights(model, params, [micro], adapt.lr, adapt.steps, optimizer=adapt.optimizer)
            model.eval()
            keys = [_scored_key(ep, pid, in_context) for pid in ep.test_ids]
            for key in keys:
                if key not in unadapted:
                    unadapted[key] = score_loaded(key)
            scores, why = _score_adapted(keys, adapted, names, unadapted, score)
            if generate and why is None:  # a broken adapted model is not worth generating with
                backend.add(adapted, [prompts[key] for key in keys])
            scored.append((ep, scores, why))
            bar.set_postfix(task=ep.task, n=ep.n, nll=f"{sum(scores[k]['nll'] for k in keys) / len(keys):.3f}")
        bar.close()
        invalid = [(ep, why) for ep, _, why in scored if why is not None]
        if invalid:
            ep, why = invalid[0]
            log.warning("%s: %d of %d episodes invalid, their rows marked so and left out of every score (first: task "
                        "%s, n=%d, episode %d: %s)", desc, len(invalid), len(scored), ep.task, ep.n, ep.seed, why)
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
    problems = [(ep, scores, why, _scored_key(ep, pid, in_context)) for ep, scores, why in scored for pid in ep.test_ids]
    golds = [records[pid]["answer"] for *_, (_, pid) in problems]
    texts = [_NOT_GENERATED] * len(problems)
    verdicts = [_NOT_GRADED] * len(problems)
    if generate:
        # The backend got the valid episodes' prompts, in order.
        graded = [i for i, (_, _, why, _) in enumerate(problems) if why is None]
        outputs = [out for episode_outputs in generated for out in episode_outputs]
        for i, out in zip(graded, outputs, strict=True):
            texts[i] = _generation_fields(tokenizer, out, eos_ids)
        for i, verdict in zip(graded, _grade([texts[i]["text"] for i in graded], [golds[i] for i in graded],
                                             grading_timeout_s), strict=True):
            verdicts[i] = verdict
    rows: list[dict] = []
    for (ep, scores, why, key), gold, gen, verdict in zip(problems, golds, texts, verdicts, strict=True):
        rows.append({
            "task": ep.task, "n": ep.n, "seed": ep.seed, "holdout": ep.holdout, "id": key[1],
            "shot_ids": list(ep.shot_ids), "in_context": in_context, **scores[key], "nll_pre": unadapted[key]["nll"],
            "answer_nll_pre": unadapted[key]["answer_nll"], "prompt_truncated": key in cut_prompts,
            "generation": gen["text"], "gen_tokens": gen["tokens"], "finished": gen["finished"],
            "extracted": verdict["extracted"], "gold": gold,
            "correct": verdict["math_verify"], "strict": verdict["strict"], "invalid": why,
        })
    return rows


def _score_adapted(keys: Sequence[Key], adapted: Mapping[str, torch.Tensor] | None, names: Sequence[str],
                   unadapted: Mapping[Key, dict], score) -> tuple[dict[Key, dict], str | None]:
    """An episode's scores per scored problem (``keys``) and None, or (when its adaptation ended in
    non-finite weights or logits) NaN scores and the reason: the whole episode is invalid, its adapted model
    being broken."""
    if adapted is None:
        return {key: unadapted[key] for key in keys}, None
    bad = next((name for name in names if not torch.isfinite(adapted[name]).all()), None)
    why = None if bad is None else f"non-finite adapted weight {bad}"
    scores: dict[Key, dict] = {}
    for key in keys if why is None else ():
        scores[key] = score(key, [adapted[name] for name in names])
        if scores[key] is None:
            why = f"non-finite logits at the adapted weights (problem {key[1]!r})"
            break
    if why is None:
        return scores, None
    nan = float("nan")
    return {key: {**unadapted[key], "nll": nan, "answer_nll": nan, "answer_accuracy": nan} for key in keys}, why


def _grade(predictions: list[str], golds: list[str], timeout_s: int) -> list[dict]:
    """Per generation, the verdicts of the ``math_accuracy`` metric: the grader users load with
    ``evaluate.load``, so their accuracy on these generations is the evaluation's."""
    if not predictions:
        return []
    metric = load_metric()
    return metric.compute(predictions=predictions, references=golds, timeout_s=timeout_s, return_grades=True)["grades"]
