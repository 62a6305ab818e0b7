"""Tokenisation of (prompt, response) pairs into supervised examples, and batching them.

An example is the chat-templated user prompt followed by the response and the EOS token::

    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>
    └──────────────── labels = -100 ─────────────────────────────┘└── labels = input ids ──┘

Labels are aligned with ``input_ids`` (the model shifts them: position i predicts token i+1), so the
last prompt token carries no label while it is the position that predicts the first response token, and
the EOS is a target: a model trained on these examples learns to stop.

In-context examples (``shots``: solved (prompt, response) pairs of the same task) go before the prompt as
earlier turns of the same chat, each shot a user turn and an assistant turn, in the order given
(:func:`chat_messages`)::

    user: {shot 1 prompt}  assistant: {shot 1 response}  ...  user: {prompt}  assistant: {response}<EOS>

Only the last response is a target: the shots are context, as in MetaICL (Min et al., 2022) and in
in-context evaluation. The chat template renders the earlier turns (a template may rewrite them, e.g.
Qwen3's drops ``<think>`` blocks of earlier assistant turns).

Two batch layouts hold the same examples:

* padded: ``input_ids``/``attention_mask``/``labels`` of shape [B, T], right-padded;
* packed (padding-free): one row [1, sum of lengths] with ``position_ids`` restarting at 0 for every
  example and no ``attention_mask``. Transformers' mask builder (``masking_utils.find_packed_sequence_indices``)
  detects the restarts and builds a block-diagonal causal mask (tested for sdpa and eager; flex goes through
  the same builder); flash-attention instead cuts varlen segments where ``position_ids`` is 0. The first
  label of every example is -100 so that no position predicts across a boundary; both layouts give the
  same per-token loss and gradients (tests/test_tokenize.py). The sdpa/eager mask is [sum, sum], so a
  packed row costs (sum of lengths)^2 mask memory where a padded batch costs B x (max length)^2.

  CAUTION: the restarts are honoured only when the forward pass has no KV cache. Call the model with
  ``use_cache=False`` (as ``lora_maml.loss`` does): with ``use_cache=True`` (the Qwen3 config default) and
  no gradient checkpointing, transformers 5 creates a cache, skips packed-sequence detection, and every
  example attends to the ones before it in the row (pinned by tests/test_tokenize.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import jinja2
import torch
from tqdm.auto import tqdm

IGNORE_INDEX = -100
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

Truncation = Literal["error", "left", "right"]

logger = logging.getLogger(__name__)


def chat_template_source(tokenizer) -> str:
    """Where ``tokenizer``'s chat template comes from, for messages: the ``chat_template.jinja`` or
    ``tokenizer_config.json`` of the directory it was loaded from, else its name."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    directory = Path(name).expanduser()
    for file in (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG):
        if name and (directory / file).is_file():
            return str(directory / file)
    return f"the chat template of tokenizer {name or type(tokenizer).__name__}"


Shot = tuple[str, str]  # an in-context example: (prompt, response)


def chat_messages(prompt: str, shots: Sequence[Shot] = ()) -> list[dict[str, str]]:
    """The chat of one example: every shot as a user turn (its prompt) and an assistant turn (its
    response), in order, then ``prompt`` as the last user turn (the module docstring's format)."""
    messages = []
    for shot_prompt, shot_response in shots:
        messages += [{"role": "user", "content": shot_prompt}, {"role": "assistant", "content": shot_response}]
    return [*messages, {"role": "user", "content": prompt}]


def in_context_cap(max_length: int, n_shots: int, positions: int | None = None) -> int:
    """Token cap of an example with ``n_shots`` shots in its prompt: it holds ``n_shots + 1`` records, each capped
    at ``max_length`` (``data.max_length``), so ``(n_shots + 1) * max_length``, and at most ``positions`` (the
    model's ``max_position_embeddings``; None: unknown). One rule for in-context evaluation and MetaICL training."""
    cap = (n_shots + 1) * max_length
    return cap if positions is None else min(cap, positions)


def prompt_ids(tokenizer, prompt: str, shots: Sequence[Shot] = ()) -> list[int]:
    """The token ids of ``prompt`` as a user turn, after the in-context ``shots`` (:func:`chat_messages`),
    followed by the assistant's header (the chat template). ``ValueError`` naming the template's file when
    the template fails (jinja2 runs it sandboxed: a template that reaches for Python internals is refused,
    as is one that raises)."""
    try:
        # transformers 5 returns a BatchEncoding unless return_dict=False; accept both so 4.x works as well.
        out = tokenizer.apply_chat_template(
            chat_messages(prompt, shots), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    except jinja2.TemplateError as err:
        what = "a user prompt" if not shots else f"a prompt after {len(shots)} in-context examples"
        raise ValueError(f"{chat_template_source(tokenizer)}: the chat template failed on {what} "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(out, list):
        out = out["input_ids"]
    return list(out)


def answer_span(response: str, answer: str) -> tuple[int, int] | None:
    """Character span of ``answer`` inside the LAST ``\\boxed{...}`` of ``response`` (None when it is not there)."""
    box = response.rfind("\\boxed")
    start = response.find(answer, box) if box >= 0 and answer else -1
    return None if start < 0 else (start, start + len(answer))


def encode_example(
    tokenizer, prompt: str, response: str, *, max_length: int, truncation: Truncation, answer: str | None = None,
    shots: Sequence[Shot] = (),
) -> dict:
    """Chat-templated prompt + response + EOS → ``{"input_ids", "labels", "truncated"}``; with ``shots``,
    the in-context examples before the prompt (:func:`chat_messages`; context only, never targets).

    With ``answer`` (the record's final answer), also ``answer_labels``: ``labels`` kept only on the
    response tokens that overlap the answer's characters in the last ``\\boxed{}`` (-100 elsewhere; all
    -100 when the answer is not found there), for metrics on the answer tokens alone.

    ``truncation`` (``data.truncation``) applies when the example is longer than ``max_length``
    (``data.max_length``): ``error`` raises ``ValueError``; ``right`` keeps the first ``max_length`` tokens
    (the EOS and possibly all targets are lost); ``left`` keeps the last ``max_length`` tokens, which cuts
    the start of the prompt and keeps the response + EOS whole unless they alone are longer.
    """
    if max_length < 1:
        raise ValueError(f"data.max_length must be >= 1, got {max_length}")
    if truncation not in ("error", "left", "right"):
        raise ValueError(f"data.truncation must be one of error|left|right, got {truncation!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token: cannot mark the end of a response")

    prompt_token_ids = prompt_ids(tokenizer, prompt, shots)
    encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=answer is not None)
    response_ids = list(encoded["input_ids"]) + [eos_id]
    input_ids = prompt_token_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_token_ids) + response_ids
    answer_labels = None
    if answer is not None:
        span = answer_span(response, answer)
        in_answer = [span is not None and start < span[1] and end > span[0] for start, end in encoded["offset_mapping"]]
        answer_labels = [IGNORE_INDEX] * len(prompt_token_ids) + [
            token if inside else IGNORE_INDEX for token, inside in zip(response_ids, [*in_answer, False])
        ]

    truncated = len(input_ids) > max_length
    if truncated:
        if truncation == "error":
            raise ValueError(
                f"example has {len(input_ids)} tokens (prompt {len(prompt_token_ids)}"
                + (f" with {len(shots)} in-context examples" if shots else "") + f" + response {len(response_ids) - 1}"
                f" + EOS) > data.max_length={max_length}; raise data.max_length or set data.truncation=left|right"
            )
        cut = slice(None, max_length) if truncation == "right" else slice(-max_length, None)
        input_ids, labels = input_ids[cut], labels[cut]
        answer_labels = None if answer_labels is None else answer_labels[cut]
    example = {"input_ids": input_ids, "labels": labels, "truncated": truncated}
    if answer_labels is not None:
        example["answer_labels"] = answer_labels
    return example


def encode_records(
    records: Iterable[dict],
    tokenizer,
    *,
    max_length: int,
    truncation: Truncation,
    desc: str | None = None,
) -> tuple[list[dict], int]:
    """Encode records (``{"prompt", "response", ...}``) with :func:`encode_example`.

    Returns the examples, in order, and how many were truncated. ``desc`` shows a tqdm progress bar.
    """
    if desc is not None:
        records = tqdm(records, desc=desc)
    examples, n_truncated, n_untrained = [], 0, 0
    for i, rec in enumerate(records):
        try:
            ex = encode_example(
                tokenizer, rec["prompt"], rec["response"], max_length=max_length, truncation=truncation
            )
        except (KeyError, ValueError) as err:
            raise type(err)(f"record {i} (id={rec.get('id', '?')}): {err}") from err
        n_truncated += ex["truncated"]
        n_untrained += all(label == IGNORE_INDEX for label in ex["labels"][1:])
        examples.append(ex)
    if n_untrained:
        logger.warning(
            "%d of %d examples have no target token left after %s truncation to data.max_length=%d",
            n_untrained,
            len(examples),
            truncation,
            max_length,
        )
    return examples, n_truncated


def records_that_fit(
    records: Iterable[dict], tokenizer, *, max_length: int, desc: str | None = None
) -> tuple[list[dict], list[dict]]:
    """The records whose whole example (chat-templated prompt, response and EOS) fits ``max_length`` tokens,
    and those examples (:func:`encode_example`), in order: problems that train and score untruncated."""
    if desc is not None:
        records = tqdm(records, desc=desc, unit="record")
    kept, examples = [], []
    for rec in records:
        ex = encode_example(tokenizer, rec["prompt"], rec["response"], max_length=max_length, truncation="right")
        if not ex["truncated"]:
            kept.append(rec)
            examples.append(ex)
    return kept, examples


def collate(examples: Sequence[dict], pad_token_id: int, *, packed: bool) -> dict[str, torch.Tensor]:
    """Batch encoded examples; see the module docstring for the two layouts.

    padded: ``input_ids`` (pad = ``pad_token_id``), ``attention_mask`` and ``labels`` (-100 on padding),
    each [B, max length]. packed: ``input_ids``, ``labels`` and ``position_ids`` of shape [1, total length].
    """
    if not examples:
        raise ValueError("collate: no examples")
    for i, ex in enumerate(examples):
        if not ex["input_ids"] or len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(
                f"collate: example {i} has {len(ex['input_ids'])} input ids and {len(ex['labels'])} labels"
                " (expected equal, non-zero lengths)"
            )
    if packed:
        input_ids, labels, position_ids = [], [], []
        for ex in examples:
            n = len(ex["input_ids"])
            input_ids.extend(ex["input_ids"])
            # Position 0 of an example would be the target of the previous example's last position.
            labels.append(IGNORE_INDEX)
            labels.extend(ex["labels"][1:])
            position_ids.extend(range(n))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padding_efficiency(batch: dict[str, torch.Tensor]) -> float:
    """Real tokens / processed token slots (1.0 for a packed batch)."""
    processed = batch["input_ids"].numel()
    if "attention_mask" in batch:
        return float(batch["attention_mask"].sum()) / processed
    return 1.0
