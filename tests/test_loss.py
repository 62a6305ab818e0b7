"""causal_lm_loss_tensors: token-mean NLL over label tokens with the HF shift, in fp32, for padded and packed
batches, with the full logits and chunked (``model.loss_chunk_size``)."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lora_maml.loss import causal_lm_loss_tensors, loss_chunk_size, set_loss_chunk_size

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


# None: the full-logits loss; 4: chunked, 4 label positions per chunk (several chunks, a ragged last one).
CHUNKS = pytest.mark.parametrize("chunk", [None, 4], ids=["logits", "chunked"])


def tiny_model(dtype=torch.float64, attn="eager", chunk=None):
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_implementation=attn,
        initializer_range=0.2,
    )
    model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    set_loss_chunk_size(model, chunk)
    return model


def padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(a, b):
    """Sequence ``a`` (10 tokens) and ``b`` (8) in one row: position_ids restart, no attention_mask."""
    seq_a = {k: v[:1] for k, v in a.items() if k != "attention_mask"}
    seq_b = {k: v[:1, :8] for k, v in b.items() if k != "attention_mask"}
    packed = {
        "input_ids": torch.cat([seq_a["input_ids"], seq_b["input_ids"]], 1),
        "labels": torch.cat([seq_a["labels"], seq_b["labels"]], 1),
        "position_ids": torch.cat([torch.arange(10), torch.arange(8)])[None],
    }
    return packed, seq_a, seq_b


@CHUNKS
def test_matches_per_token_log_softmax(chunk):
    model, batch = tiny_model(chunk=chunk), padded_batch()
    loss, n = causal_lm_loss_tensors(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll = []
    for b in range(3):
        for t in range(9):
            target = int(batch["labels"][b, t + 1])
            if target != -100:
                nll.append(-torch.log_softmax(logits[b, t], -1)[target])
    assert n == len(nll) == 3 * 6 - 3
    torch.testing.assert_close(loss, torch.stack(nll).mean(), rtol=1e-12, atol=1e-12)


def test_matches_transformers_own_loss():
    model, batch = tiny_model(), padded_batch(2)
    with torch.no_grad():
        hf = model(**batch).loss
        ours, _ = causal_lm_loss_tensors(model, batch)
    # transformers computes its loss in fp32 even for an fp64 model.
    torch.testing.assert_close(ours, hf.to(ours.dtype), rtol=1e-6, atol=1e-6)


@CHUNKS
def test_bf16_model_loss_in_fp32(chunk):
    model, batch = tiny_model(torch.bfloat16, chunk=chunk), padded_batch()
    loss, n = causal_lm_loss_tensors(model, batch)
    assert loss.dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)


@CHUNKS
def test_first_label_is_never_scored_and_empty_batch_is_zero(chunk):
    model, batch = tiny_model(chunk=chunk), padded_batch()
    batch["labels"][:, 0] = batch["input_ids"][:, 0]
    assert causal_lm_loss_tensors(model, batch)[1] == int((batch["labels"][:, 1:] != -100).sum())
    batch["labels"][:] = -100
    loss, n = causal_lm_loss_tensors(model, batch)
    assert n == 0 and loss.item() == 0.0
    # ... and its gradient is 0, not an error (a micro-batch without labels inside a meta-step).
    grads = torch.autograd.grad(loss, list(model.parameters()), materialize_grads=True)
    assert all(not g.any() for g in grads)


@CHUNKS
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_equals_separate_sequences(attn, chunk):
    """Two sequences packed in one row (position_ids restart, no attention_mask) give the token-weighted
    mean of their separate losses: attention must not cross the boundary. transformers only derives the
    block mask from position_ids when no KV cache exists, hence use_cache=False in the loss."""
    model = tiny_model(attn=attn, chunk=chunk)
    packed, seq_a, seq_b = packed_batch(padded_batch(3), padded_batch(4))
    la, na = causal_lm_loss_tensors(model, seq_a)
    lb, nb = causal_lm_loss_tensors(model, seq_b)
    lp, n_p = causal_lm_loss_tensors(model, packed)
    assert n_p == na + nb  # the first label of b is -100 (prompt): no cross-boundary target
    # RoPE angles are computed in fp32 even in an fp64 model: ~1e-7 differences between layouts;
    # attention across the boundary would change the loss by ~1e-1.
    torch.testing.assert_close(lp, (la * na + lb * nb) / (na + nb), rtol=1e-6, atol=1e-6)


def test_missing_labels_is_a_clear_error():
    batch = padded_batch()
    del batch["labels"]
    with pytest.raises(KeyError, match="labels"):
        causal_lm_loss_tensors(tiny_model(), batch)


def rel_err(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp(min=1e-300)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("size", ["smaller", "equal", "larger"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_loss_and_gradients_equal_the_full_logits(layout, size):
    """Chunk sizes below (ragged last chunk), at and above the label-token count: same loss, same
    gradients w.r.t. every weight (the LM head's included) as the [B, T, V] logits."""
    model = tiny_model().train()
    batch = padded_batch(5) if layout == "padded" else packed_batch(padded_batch(3), padded_batch(4))[0]
    params = list(model.parameters())

    def loss_and_grads():
        loss, n = causal_lm_loss_tensors(model, batch)
        return loss, n, torch.autograd.grad(loss, params, materialize_grads=True)

    full_loss, n, full_grads = loss_and_grads()
    chunk = {"smaller": int(n) // 2 - 1, "equal": int(n), "larger": int(n) + 5}[size]
    assert size != "smaller" or int(n) % chunk  # a ragged last chunk
    set_loss_chunk_size(model, chunk)
    assert loss_chunk_size(model) == chunk
    loss, n_chunked, grads = loss_and_grads()
    assert n_chunked == n
    assert abs(loss.item() - full_loss.item()) <= 1e-10 * abs(full_loss.item())
    assert rel_err(grads, full_grads) <= 1e-10
    assert max(g.abs().max().item() for g in full_grads) > 1e-3


def test_chunked_loss_with_lora_on_the_lm_head():
    """An LM head that is not a plain nn.Linear (here peft's LoRA layer) is called as a module per chunk."""
    from lora_maml.config import LoraConfig
    from lora_maml.models import add_lora

    model = tiny_model().requires_grad_(False)
    model = add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "lm_head"])).train()
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    assert type(model.get_base_model().get_output_embeddings()) is not torch.nn.Linear
    batch = padded_batch()
    results = []
    for chunk in (None, 4):
        set_loss_chunk_size(model, chunk)
        loss, _ = causal_lm_loss_tensors(model, batch)
        results.append((loss, torch.autograd.grad(loss, params)))
    assert abs(results[1][0].item() - results[0][0].item()) <= 1e-10 * results[0][0].item()
    assert rel_err(results[1][1], results[0][1]) <= 1e-10


def test_bad_chunk_sizes_are_rejected():
    model = tiny_model()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="loss_chunk_size"):
            set_loss_chunk_size(model, bad)
