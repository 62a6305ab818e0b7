"""The one causal-LM loss shared by FOMAML/MAML/Reptile, the SFT baseline and evaluation.

Batches follow the Hugging Face convention: ``labels`` is aligned with ``input_ids`` (same shape
[B, T]) and holds -100 where no loss is taken (prompt, padding); the shift happens here, so the
logits at position t are scored against ``labels[:, t + 1]``. A padded batch carries
``attention_mask``; a packed batch carries ``position_ids`` and no ``attention_mask``.

The loss is the token mean of the negative log-likelihood over all label tokens of the batch,
computed in fp32 (or fp64 for an fp64 model) whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100

# Keys of a batch forwarded to the model; everything else (labels, task names, ...) stays here.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def token_nll_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of the NLL over label tokens, HF shift (``logits[:, t]`` predicts ``labels[:, t+1]``).

    Shifting the labels (one -100 appended) instead of slicing the logits avoids copying the
    [B, T, V] logits. This is the place where a chunked cross-entropy (hidden states + lm_head
    weight, chunk by chunk) would go for large vocabularies.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(
        logits.to(compute_dtype).flatten(0, 1),
        shifted.flatten().to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def label_token_count(batch: dict[str, Tensor]) -> Tensor:
    """Number of scored tokens (labels after the shift that are not -100), as a 0-d tensor."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss_tensors(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Token-mean NLL and token count, both as tensors (no host sync; used in the meta-learning loop).

    A batch without label tokens gives loss 0 (not nan) and count 0: the caller sees the count.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"expected a batch dict of tensors, got {type(batch).__name__}")
    if "labels" not in batch:
        raise KeyError(f"batch has no 'labels' (keys: {sorted(batch)}); see lora_maml.data.tokenize.collate")
    inputs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    n_tokens = label_token_count(batch).to(logits.device)
    loss = token_nll_sum(logits, batch["labels"]) / n_tokens.clamp(min=1)
    return loss, n_tokens


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Token-mean NLL over the label tokens of ``batch`` (fp32) and the number of those tokens."""
    loss, n_tokens = causal_lm_loss_tensors(model, batch)
    return loss, int(n_tokens)
