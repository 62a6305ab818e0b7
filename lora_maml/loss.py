"""The one causal-LM loss shared by FOMAML/MAML/Reptile, the SFT baseline and evaluation.

Batches follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` (same shape
[B, T]) and holds -100 where no loss is taken (prompt, padding); the shift happens here, so the
logits at position t are scored against ``labels[:, t + 1]``. A padded batch carries
``attention_mask``; a packed batch carries ``position_ids`` and no ``attention_mask``.

The loss is the token mean of the negative log-likelihood over all label tokens of the batch,
computed in fp32 (or fp64 for an fp64 model) whatever the model's dtype.

Chunked cross-entropy (``model.loss_chunk_size``, set on the model by :func:`set_loss_chunk_size`,
which ``lora_maml.models.load_base`` calls): instead of the [B, T, V] logits of the whole batch (for
Qwen3's 151,936-token vocabulary, 4 x 2048 tokens are 2.5 GB of bf16 logits, 5 GB more once upcast to
fp32, and as much again saved by the log-softmax for backward), the decoder body gives the final hidden
states, the label positions alone are gathered (prompt and padding never reach the LM head), and the
logits are formed ``loss_chunk_size`` positions at a time, each chunk under non-reentrant activation
checkpointing so that no chunk's logits outlive its forward: the backward recomputes them. Same
values (the logits of a position do not depend on the others), at the price of one more LM-head
matmul over the label positions in the backward.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

# Keys of a batch forwarded to the model; everything else (labels, task names, ...) stays here.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")

# Attribute of the causal LM (under any PeftModel wrapper) holding its loss chunk size (None: off).
_CHUNK_ATTR = "lora_maml_loss_chunk_size"


def token_nll_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the NLL over label tokens, HF shift (``logits[:, t]`` predicts ``labels[:, t+1]``).

    Shifting the labels (one -100 appended) instead of slicing the logits avoids copying the
    [B, T, V] logits. :func:`chunked_token_nll_sum` is the same sum without the full logits.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.to(compute_dtype).flatten(0, 1),
        shifted.flatten().to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def token_nll_and_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position NLL, greedy hit and label mask, HF shift, each [B, T] (fp32 NLL, bool hits and mask).

    Position t scores ``labels[:, t+1]``; where that label is -100 the NLL is 0 and the mask False.
    Evaluation uses it for per-token metrics (e.g. of the answer tokens only); training uses the fused
    sums of :func:`token_nll_sum`.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].to(logits.device)
    mask = shifted != IGNORE_INDEX
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
    hits = (logits.argmax(-1) == shifted) & mask
    return nll, hits, mask


def label_token_count(batch: dict[str, Tensor]) -> Tensor:
    """Number of scored tokens (labels after the shift that are not -100), as a 0-d tensor."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face ``*ForCausalLM`` itself: under a peft ``PeftModel``, its ``get_base_model()``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_body(model: nn.Module, why: str = "model.loss_chunk_size") -> nn.Module:
    """The decoder body of the causal LM (``Qwen3ForCausalLM.model``: embeddings, layers, final norm)."""
    lm = causal_lm(model)
    prefix = getattr(lm, "base_model_prefix", None)
    body = getattr(lm, prefix, None) if prefix else None
    if not isinstance(body, nn.Module) or body is lm:
        raise TypeError(f"{why} needs a Hugging Face *ForCausalLM with a decoder body, got {type(lm).__name__}")
    return body


def set_loss_chunk_size(model: nn.Module, chunk_size: int | None) -> None:
    """Make every loss of ``model`` (and of the PeftModel later wrapped around it) chunked with
    ``chunk_size`` label positions per chunk; None restores the full-logits loss."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"model.loss_chunk_size: expected a positive int or None, got {chunk_size!r}")
    setattr(causal_lm(model), _CHUNK_ATTR, chunk_size)


def loss_chunk_size(model: nn.Module) -> int | None:
    """The chunk size :func:`set_loss_chunk_size` gave ``model``, None when its loss is not chunked."""
    return getattr(causal_lm(model), _CHUNK_ATTR, None)


def _linear_nll(hidden: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # The weight is an argument (not read from the module here): a checkpoint recomputation in the
    # backward then uses the very tensor of the forward, fast weight or not.
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def _module_nll(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def chunked_token_nll_sum(
    model: nn.Module, inputs: Mapping[str, Tensor], labels: Tensor, chunk_size: int
) -> Tensor:
    """:func:`token_nll_sum` of ``model(**inputs)``, the logits formed ``chunk_size`` label positions
    at a time (see the module docstring). One host sync: the number of label positions.

    The LM head is looked up on every call (``get_output_embeddings()``), so a fast weight swapped in
    by ``functional_call`` (``meta.adapter=full``, tied or not) is the one used. A plain ``nn.Linear``
    head passes its weight to the checkpointed chunk explicitly; any other head (a LoRA on lm_head,
    peft's modules_to_save wrapper) is called as a module, so its recomputation in the backward reads
    the module's weights then: take the gradient inside the same functional call, as
    ``lora_maml.meta.fast_weights`` does anyway for gradient checkpointing.
    """
    lm = causal_lm(model)
    body = decoder_body(lm)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"model.loss_chunk_size needs output embeddings (an LM head), {type(lm).__name__} has none")
    config = getattr(lm, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        raise ValueError(
            f"model.loss_chunk_size: {type(lm).__name__} post-processes its logits (soft-capping / scaling), "
            "which the chunked loss does not reproduce; set model.loss_chunk_size=null"
        )
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten()
    positions = (shifted != IGNORE_INDEX).nonzero().squeeze(1)  # the host sync, before the forward is queued
    hidden = body(**inputs, use_cache=False).last_hidden_state
    positions = positions.to(hidden.device)
    targets = shifted.to(hidden.device).index_select(0, positions)
    picked = hidden.flatten(0, 1).index_select(0, positions)  # [N, H]: label positions only
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    if picked.shape[0] == 0:
        return picked.to(compute_dtype).sum()  # 0, still attached to the graph (gradients 0, not an error)
    plain = type(head) is nn.Linear
    recompute = torch.is_grad_enabled()
    total = None
    for start in range(0, picked.shape[0], chunk_size):
        args = (picked[start : start + chunk_size], targets[start : start + chunk_size])
        fn, args = (_linear_nll, (*args, head.weight, head.bias)) if plain else (_module_nll, (head, *args))
        part = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False) if recompute else fn(*args)
        total = part if total is None else total + part
    return total


def causal_lm_loss_tensors(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Token-mean NLL over the label tokens of ``batch`` (fp32, fp64 for an fp64 model) and their count,
    both as tensors: no host sync with the full logits, one with ``model.loss_chunk_size``.

    A batch without label tokens gives loss 0 (not nan) and count 0: the caller sees the count.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"expected a batch dict of tensors, got {type(batch).__name__}")
    if "labels" not in batch:
        raise KeyError(f"batch has no 'labels' (keys: {sorted(batch)}); see lora_maml.data.tokenize.collate")
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    chunk_size = loss_chunk_size(model)
    if chunk_size is None:
        logits = model(**inputs, use_cache=False).logits
        nll = token_nll_sum(logits, batch["labels"])
    else:
        nll = chunked_token_nll_sum(model, inputs, batch["labels"], chunk_size)
    n_tokens = label_token_count(batch).to(nll.device)
    return nll / n_tokens.clamp(min=1), n_tokens
