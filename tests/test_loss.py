"""causal_lm_loss: token-mean NLL over label tokens with the HF shift, in fp32, for padded and packed batches."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from lora_maml.loss import causal_lm_loss

VOCAB = 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads cost more than they save (10 s vs 60 s on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(dtype=torch.float64, attn="eager"):
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, attn_implementation=attn,
        initializer_range=0.2,
    )
    return Qwen3ForCausalLM(cfg).to(dtype).eval()


def padded_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_matches_per_token_log_softmax():
    model, batch = tiny_model(), padded_batch()
    loss, n = causal_lm_loss(model, batch)
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
        ours, _ = causal_lm_loss(model, batch)
    # transformers computes its loss in fp32 even for an fp64 model.
    torch.testing.assert_close(ours, hf.to(ours.dtype), rtol=1e-6, atol=1e-6)


def test_bf16_model_loss_in_fp32():
    model, batch = tiny_model(torch.bfloat16), padded_batch()
    loss, n = causal_lm_loss(model, batch)
    assert loss.dtype == torch.float32
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-6, atol=1e-6)


def test_first_label_is_never_scored_and_empty_batch_is_zero():
    model, batch = tiny_model(), padded_batch()
    batch["labels"][:, 0] = batch["input_ids"][:, 0]
    assert causal_lm_loss(model, batch)[1] == int((batch["labels"][:, 1:] != -100).sum())
    batch["labels"][:] = -100
    loss, n = causal_lm_loss(model, batch)
    assert n == 0 and loss.item() == 0.0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_batch_equals_separate_sequences(attn):
    """Two sequences packed in one row (position_ids restart, no attention_mask) give the token-weighted
    mean of their separate losses: attention must not cross the boundary. transformers only derives the
    block mask from position_ids when no KV cache exists, hence use_cache=False in the loss."""
    model = tiny_model(attn=attn)
    a, b = padded_batch(3), padded_batch(4)
    seq_a = {k: v[:1] for k, v in a.items() if k != "attention_mask"}
    seq_b = {k: v[:1, :8] for k, v in b.items() if k != "attention_mask"}
    packed = {
        "input_ids": torch.cat([seq_a["input_ids"], seq_b["input_ids"]], 1),
        "labels": torch.cat([seq_a["labels"], seq_b["labels"]], 1),
        "position_ids": torch.cat([torch.arange(10), torch.arange(8)])[None],
    }
    la, na = causal_lm_loss(model, seq_a)
    lb, nb = causal_lm_loss(model, seq_b)
    lp, n_p = causal_lm_loss(model, packed)
    assert n_p == na + nb  # the first label of b is -100 (prompt): no cross-boundary target
    # RoPE angles are computed in fp32 even in an fp64 model: ~1e-7 differences between layouts;
    # attention across the boundary would change the loss by ~1e-1.
    torch.testing.assert_close(lp, (la * na + lb * nb) / (na + nb), rtol=1e-6, atol=1e-6)


def test_missing_labels_is_a_clear_error():
    batch = padded_batch()
    del batch["labels"]
    with pytest.raises(KeyError, match="labels"):
        causal_lm_loss(tiny_model(), batch)
