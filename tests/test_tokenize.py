import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import create_causal_mask

from lora_maml.data.tokenize import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_records,
    padding_efficiency,
    prompt_ids,
    records_that_fit,
)
from lora_maml.loss import label_token_count
from lora_maml.tiny_model import build_tiny_model

PROBLEMS = [
    ("What is 3 + 4?", "Add: 3 + 4 = 7. The answer is $\\boxed{7}$."),
    ("Solve 2x + 6 = 10 for x.", "Subtract 6: 2x = 4. Divide by 2: x = 2, so $\\boxed{2}$."),
    ("How many ways can 3 books be ordered on a shelf?", "There are 3! = 6 orders. $\\boxed{6}$"),
    ("Find the remainder when 17 is divided by 5.", "17 = 3 * 5 + 2, so the remainder is $\\boxed{2}$."),
]
TEXTS = [f"{p}\n{r}" for p, r in PROBLEMS] * 10 + [f"Compute {a} * {b} = {a * b}." for a in range(12) for b in range(9)]
PROMPT, RESPONSE = PROBLEMS[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=0)


@pytest.fixture(scope="module")
def tok(tiny):
    return AutoTokenizer.from_pretrained(tiny)


def full_example(tok, prompt=PROMPT, response=RESPONSE):
    return encode_example(tok, prompt, response, max_length=10_000, truncation="error")


def test_labels_train_the_response_and_eos_only(tok):
    ex = full_example(tok)
    ids, labels = ex["input_ids"], ex["labels"]
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    n_prompt = len(prompt_ids)
    response_ids = tok(RESPONSE, add_special_tokens=False)["input_ids"]

    assert ex["truncated"] is False
    assert len(ids) == len(labels) == n_prompt + len(response_ids) + 1
    assert ids[:n_prompt] == prompt_ids
    assert tok.decode(ids[:n_prompt]) == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids[n_prompt:-1]) == RESPONSE
    assert ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # Token by token: every prompt token (the last one, "\n" after "assistant", included) is -100 ...
    for i in range(n_prompt):
        assert labels[i] == IGNORE_INDEX, f"prompt token {i} ({tok.decode([ids[i]])!r}) is trained"
    # ... and every response token and the final EOS is its own target.
    for i in range(n_prompt, len(ids)):
        assert labels[i] == ids[i], f"response token {i} ({tok.decode([ids[i]])!r}) is not trained"
    # Under the HF shift, the last prompt position predicts the first response token and the last
    # response token predicts EOS.
    targets = [(pos, labels[pos + 1]) for pos in range(len(ids) - 1) if labels[pos + 1] != IGNORE_INDEX]
    assert targets[0] == (n_prompt - 1, response_ids[0])
    assert targets[-1] == (len(ids) - 2, tok.eos_token_id)
    assert len(targets) == len(response_ids) + 1


def test_in_context_shots_are_earlier_turns_and_never_targets(tok):
    shots = PROBLEMS[2:4]
    ex = encode_example(tok, PROMPT, RESPONSE, max_length=10_000, truncation="error", shots=shots, answer="2")
    plain = full_example(tok)
    n_context = len(prompt_ids(tok, PROMPT, shots))
    # The exact text: each shot a user and an assistant turn, in the given order, then the prompt.
    expected = "".join(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n" for p, r in shots)
    expected += f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ex["input_ids"][:n_context]) == expected
    # The targets are the plain example's: the last response and its EOS, nothing of the shots.
    assert all(label == IGNORE_INDEX for label in ex["labels"][:n_context])
    assert ex["labels"][n_context:] == plain["labels"][-(len(ex["labels"]) - n_context):]
    assert [x for x in ex["labels"] if x != IGNORE_INDEX] == [x for x in plain["labels"] if x != IGNORE_INDEX]
    assert [x for x in ex["answer_labels"] if x != IGNORE_INDEX] == tok("2", add_special_tokens=False)["input_ids"]
    # Order matters: the same shots reversed give another context.
    reversed_ex = encode_example(tok, PROMPT, RESPONSE, max_length=10_000, truncation="error", shots=shots[::-1])
    assert reversed_ex["input_ids"] != ex["input_ids"] and len(reversed_ex["input_ids"]) == len(ex["input_ids"])


def test_in_context_example_longer_than_max_length_names_its_shots(tok):
    with pytest.raises(ValueError, match=r"with 2 in-context examples.*data.max_length=40"):
        encode_example(tok, PROMPT, RESPONSE, max_length=40, truncation="error", shots=PROBLEMS[2:4])
    left = encode_example(tok, PROMPT, RESPONSE, max_length=40, truncation="left", shots=PROBLEMS[2:4])
    assert left["truncated"] and left["labels"][-1] == tok.eos_token_id and len(left["input_ids"]) == 40


def test_truncation_modes(tok):
    full = full_example(tok)
    n = len(full["input_ids"])
    n_target = sum(label != IGNORE_INDEX for label in full["labels"])

    fits = encode_example(tok, PROMPT, RESPONSE, max_length=n, truncation="error")
    assert fits["input_ids"] == full["input_ids"] and fits["truncated"] is False
    with pytest.raises(ValueError, match=rf"{n} tokens.*data.max_length={n - 1}"):
        encode_example(tok, PROMPT, RESPONSE, max_length=n - 1, truncation="error")

    right = encode_example(tok, PROMPT, RESPONSE, max_length=n - 3, truncation="right")
    assert right["truncated"] is True
    assert right["input_ids"] == full["input_ids"][: n - 3] and right["labels"] == full["labels"][: n - 3]
    assert tok.eos_token_id not in right["labels"]

    # Left: the start of the prompt goes, the response + EOS stay whole.
    keep = n_target + 2
    left = encode_example(tok, PROMPT, RESPONSE, max_length=keep, truncation="left")
    assert left["truncated"] is True
    assert left["input_ids"] == full["input_ids"][-keep:] and left["labels"] == full["labels"][-keep:]
    assert left["labels"][:2] == [IGNORE_INDEX] * 2 and left["labels"][2:] == full["input_ids"][-n_target:]
    # A response longer than max_length keeps its end (and the EOS).
    tiny = encode_example(tok, PROMPT, RESPONSE, max_length=4, truncation="left")
    assert tiny["input_ids"] == full["input_ids"][-4:] and tiny["input_ids"][-1] == tok.eos_token_id


def test_encode_records_counts_truncations_and_names_bad_records(tok):
    records = [{"id": f"r{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(PROBLEMS)]
    lengths = [len(full_example(tok, p, r)["input_ids"]) for p, r in PROBLEMS]
    n = sorted(lengths)[1]
    examples, n_truncated = encode_records(records, tok, max_length=n, truncation="right")
    assert len(examples) == len(records)
    assert n_truncated == sum(length > n for length in lengths) > 0
    assert [ex["truncated"] for ex in examples] == [length > n for length in lengths]
    with pytest.raises(ValueError, match="id=r"):
        encode_records(records, tok, max_length=n, truncation="error")


def test_records_that_fit_keeps_the_untruncated_examples_in_order(tok):
    records = [{"id": f"r{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(PROBLEMS)]
    lengths = [len(full_example(tok, p, r)["input_ids"]) for p, r in PROBLEMS]
    n = sorted(lengths)[1]
    kept, examples = records_that_fit(records, tok, max_length=n)
    assert kept == [r for r, length in zip(records, lengths) if length <= n] and len(kept) >= 2
    assert examples == [full_example(tok, r["prompt"], r["response"]) for r in kept]


def test_encode_records_warns_when_truncation_leaves_nothing_to_learn(tok, caplog):
    records = [{"id": "r0", "prompt": PROMPT, "response": RESPONSE}]
    with caplog.at_level("WARNING", logger="lora_maml.data.tokenize"):
        (example,), n_truncated = encode_records(records, tok, max_length=5, truncation="right")
    assert n_truncated == 1 and set(example["labels"]) == {IGNORE_INDEX}
    assert "1 of 1 examples have no target token" in caplog.text


def examples_of_three_lengths(tok):
    """Two whole examples and one left-truncated into its response, whose first token is labelled: in a
    packed row that label would be predicted by the previous example's last position."""
    examples = [full_example(tok, p, r) for p, r in PROBLEMS[:2]]
    examples.insert(1, encode_example(tok, *PROBLEMS[2], max_length=6, truncation="left"))
    assert examples[1]["labels"][0] != IGNORE_INDEX
    assert len({len(ex["input_ids"]) for ex in examples}) == 3
    return examples


def test_padded_and_packed_layouts(tok):
    examples = examples_of_three_lengths(tok)
    lengths = [len(ex["input_ids"]) for ex in examples]
    pad_id = tok.pad_token_id

    padded = collate(examples, pad_id, packed=False)
    assert set(padded) == {"input_ids", "attention_mask", "labels"}
    assert padded["input_ids"].shape == (3, max(lengths))
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        assert padded["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert padded["labels"][row, :n].tolist() == ex["labels"]
        assert (padded["input_ids"][row, n:] == pad_id).all() and (padded["labels"][row, n:] == IGNORE_INDEX).all()
        assert padded["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)

    packed = collate(examples, pad_id, packed=True)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, sum(lengths))
    assert packed["input_ids"][0].tolist() == sum((ex["input_ids"] for ex in examples), [])
    assert packed["position_ids"][0].tolist() == sum((list(range(n)) for n in lengths), [])
    starts = [sum(lengths[:i]) for i in range(3)]
    for ex, start, n in zip(examples, starts, lengths):
        assert packed["labels"][0, start].item() == IGNORE_INDEX
        assert packed["labels"][0, start + 1 : start + n].tolist() == ex["labels"][1:]

    # Label 0 of an example is never a target (nothing precedes it), even when it is not -100.
    n_targets = sum(sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in examples)
    assert int(label_token_count(padded)) == int(label_token_count(packed)) == n_targets
    assert padding_efficiency(padded) == pytest.approx(sum(lengths) / (3 * max(lengths)))
    assert padding_efficiency(packed) == 1.0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_mask_is_block_diagonal_causal(tiny, impl):
    config = AutoModelForCausalLM.from_pretrained(tiny, attn_implementation=impl).config
    lengths = [3, 1, 4]
    position_ids = torch.tensor([sum((list(range(n)) for n in lengths), [])])
    mask = create_causal_mask(
        config=config,
        inputs_embeds=torch.zeros(1, sum(lengths), config.hidden_size),
        attention_mask=None,
        cache=None,
        position_ids=position_ids,
    )
    seq = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    q, k = torch.arange(sum(lengths))[:, None], torch.arange(sum(lengths))[None, :]
    expected = (k <= q) & (seq[:, None] == seq[None, :])
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    assert torch.equal(allowed, expected)


def summed_nll_and_grads(model, batch, **forward_kwargs):
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, **forward_kwargs).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


# The eager kernel of transformers 5.24 computes the softmax in float32 even for a float64 model, so its
# two layouts agree to float32 rounding only; sdpa stays in float64. Attending across a packing boundary
# changes the loss by ~1e-3 relative, far above both tolerances (see the use_cache test below).
@pytest.mark.parametrize("impl, rtol", [("sdpa", 1e-9), ("eager", 1e-6)])
def test_packed_and_padded_give_the_same_loss_and_gradients(tiny, tok, impl, rtol):
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64, attn_implementation=impl)
    model.train()  # dropout is 0 in Qwen3; train mode is the setting the meta-learner uses
    examples = examples_of_three_lengths(tok)
    loss_pad, grads_pad = summed_nll_and_grads(model, collate(examples, tok.pad_token_id, packed=False), use_cache=False)
    loss_pack, grads_pack = summed_nll_and_grads(model, collate(examples, tok.pad_token_id, packed=True), use_cache=False)
    assert abs(loss_pack - loss_pad) <= rtol * abs(loss_pad)
    assert grads_pad.keys() == grads_pack.keys()
    for name in grads_pad:
        diff = (grads_pack[name] - grads_pad[name]).norm()
        assert diff <= rtol * grads_pad[name].norm(), f"{name}: relative gradient difference {diff / grads_pad[name].norm():.2e}"


def test_packed_batches_need_use_cache_false(tiny, tok):
    """transformers 5.24 skips packed-sequence detection when a KV cache exists, and a forward pass with
    the Qwen3 default use_cache=True (no gradient checkpointing) creates one: the sequences of a packed
    row then attend to each other. This is why every training forward passes use_cache=False. If this
    test starts failing, transformers has changed that behaviour; the docstring of tokenize.py says so."""
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float64)
    assert model.config.use_cache is True
    examples = examples_of_three_lengths(tok)
    loss_pad, _ = summed_nll_and_grads(model, collate(examples, tok.pad_token_id, packed=False))
    loss_pack, _ = summed_nll_and_grads(model, collate(examples, tok.pad_token_id, packed=True))
    assert abs(loss_pack - loss_pad) > 1e-4 * abs(loss_pad)


def test_collate_rejects_malformed_examples():
    with pytest.raises(ValueError, match="no examples"):
        collate([], 0, packed=True)
    with pytest.raises(ValueError, match="example 1"):
        collate([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [1, 2], "labels": [1]}], 0, packed=False)
