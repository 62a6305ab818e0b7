"""A tiny, randomly initialised Qwen3 checkpoint with a real trained tokenizer, for tests and smoke runs.

The directory it writes is an ordinary Hugging Face checkpoint laid out like Qwen3-4B-Instruct-2507:
``config.json``, ``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``chat_template.jinja``. It loads with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(dir)``, so every code path that takes ``model.partial_pretrain`` can be
exercised on CPU in seconds without downloading anything.

The tokenizer mirrors Qwen's: byte-level BPE behind Qwen2's pre-tokenisation regex (digits are split one
by one), the ChatML special tokens, ``<|im_end|>`` as EOS and ``<|endoftext|>`` as padding.

The program is ``recipes/build_tiny_model.py`` (``lora-maml tiny-model``); the tokenizer's texts come from
:func:`texts_from_prepared` (a prepared data directory) or :func:`texts_from_synthetic`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from lora_maml.atomic import atomic_dir
from lora_maml.data.prepare import list_tasks, load_split
from lora_maml.data.synthetic import synthetic_records

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2/Qwen3 pre-tokenisation regex (tokenizer.json of Qwen3-4B-Instruct-2507).
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML as Qwen3-Instruct renders it (no default system prompt), restricted to plain-text messages.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('tiny-model chat template: unsupported role ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Rendered once per training text so that role names and the line breaks around them become single tokens
# in proportion to the corpus, as they are in Qwen's vocabulary.
_TEMPLATE_SCAFFOLD = (
    f"{IM_START}system\n{IM_END}\n{IM_START}user\n{IM_END}\n{IM_START}assistant\n{IM_END}\n"
)

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


def train_tiny_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, model_max_length: int = 1024):
    """Train a Qwen-style byte-level BPE tokenizer on ``texts``; return a ``PreTrainedTokenizerFast``.

    The vocabulary holds at most ``vocab_size`` entries (fewer when the corpus runs out of merges).
    Training is deterministic for the same texts in the same order.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: must be >= {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    corpus = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
        corpus.append(text)
        corpus.append(_TEMPLATE_SCAFFOLD)
    if not corpus:
        raise ValueError("train_tiny_tokenizer: texts is empty; give at least one training text")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tiny_qwen3_dims(hidden_size: int, num_hidden_layers: int) -> dict[str, int]:
    """The sizes (:func:`build_tiny_model`'s keywords) of a tiny Qwen3 of ``hidden_size`` and
    ``num_hidden_layers``: heads of 32 (GQA 2:1), an MLP of 2 x ``hidden_size``, a 512-entry vocabulary.
    Raises ValueError unless ``hidden_size`` is a positive multiple of 64 and ``num_hidden_layers`` >= 1."""
    if hidden_size < 64 or hidden_size % 64 or num_hidden_layers < 1:
        raise ValueError(f"hidden_size={hidden_size}, num_hidden_layers={num_hidden_layers}: hidden_size must be "
                         "a multiple of 64 and num_hidden_layers >= 1")
    return dict(vocab_size=512, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                num_attention_heads=hidden_size // 32, num_key_value_heads=hidden_size // 64, head_dim=32,
                intermediate_size=2 * hidden_size)


def build_tiny_model(
    output_dir: str | os.PathLike,
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a tiny random-init Qwen3 checkpoint + tokenizer trained on ``texts`` to ``output_dir``.

    ``vocab_size`` is the embedding size of the model and the target size of the tokenizer (as in Qwen,
    the embedding may have a few rows more than the tokenizer has tokens). The directory is written to a
    temporary sibling and renamed into place, so a crash never leaves a half-written checkpoint; an
    existing ``output_dir`` is an error unless ``overwrite``. Same texts + seed → identical files.

    Every size must be an integer >= 1 (a zero-width model builds and even trains, on nothing), the
    query heads a multiple of the key/value heads (grouped-query attention) and ``head_dim`` even (rotary
    embeddings turn pairs of dimensions). As in Qwen3, ``num_attention_heads * head_dim`` need not equal
    ``hidden_size`` (Qwen3-4B: 32 x 128 = 4096 on a hidden size of 2560): the projections map between them.
    Raises ``ValueError`` naming the argument.
    """
    sizes = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers,
             "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
             "head_dim": head_dim, "intermediate_size": intermediate_size,
             "max_position_embeddings": max_position_embeddings}
    bad = [f"{name}={value!r}" for name, value in sizes.items()
           if isinstance(value, bool) or not isinstance(value, int) or value < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: every size of the model must be an integer >= 1")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} must be a multiple of num_key_value_heads={num_key_value_heads}"
        )
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim}: must be even (rotary position embeddings turn pairs of dimensions)")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"build_tiny_model: {output_dir} already exists (pass overwrite=True)")

    tokenizer = train_tiny_tokenizer(texts, vocab_size=vocab_size, model_max_length=max_position_embeddings)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size={vocab_size}")
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # Initialise under a forked RNG so the caller's global torch RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)

    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return output_dir


def texts_from_records(records: Iterable[dict]) -> list[str]:
    """The tokenizer's training texts of records: each prompt and response."""
    return [f"{r['prompt']}\n{r['response']}" for r in records]


def texts_from_prepared(data_dir: str | os.PathLike) -> list[str]:
    """The tokenizer's training texts from a prepared data directory (:mod:`lora_maml.data.prepare`):
    prompt and response of every record, meta-training splits first, then the evaluation splits."""
    tasks = list_tasks(data_dir)
    records: list[dict] = []
    for task in tasks["meta_train"]:
        for part in ("support", "query"):
            records.extend(load_split(data_dir, task, part))
    for task in tasks["few_shot_eval"]:
        records.extend(load_split(data_dir, task, "test"))
    if not records:
        raise ValueError(f"data_dir {data_dir}: the prepared splits hold no records")
    return texts_from_records(records)


def texts_from_synthetic(n_per_task: int, seed: int) -> list[str]:
    """The tokenizer's training texts from ``n_per_task`` problems per task of the synthetic suite
    (:func:`lora_maml.data.synthetic.synthetic_records`)."""
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, int) or n_per_task < 1:
        raise ValueError(f"n_per_task must be an integer >= 1, got {n_per_task!r}")
    return texts_from_records(synthetic_records(n_per_task, seed))
