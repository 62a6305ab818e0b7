"""load_base / add_lora / adapted_parameters on tiny Qwen3 checkpoints written to tmp (offline)."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from lora_maml.config import LoraConfig, MetaConfig, ModelConfig
from lora_maml.loss import loss_chunk_size
from lora_maml.meta.algorithms import MetaLearner, TaskBatch
from lora_maml.models import add_lora, adapted_parameters, gradient_checkpointing_on, load_base

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    # head_dim=128 as in Qwen3-4B: transformers' GGUF reader does not take head_dim from the file.
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return Qwen3Config(**{**kw, **overrides})


def save_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", pad_token="t2", unk_token="t0").save_pretrained(
        directory
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, source model) of a tiny random Qwen3 saved in fp32 with a tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_qwen3")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_config()).eval()
    model.save_pretrained(directory)
    save_tokenizer(directory)
    return directory, model


def random_task(name="algebra", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def batch():
        ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return TaskBatch(name, [batch()], batch())


def test_load_base_is_frozen_in_the_asked_dtype_with_checkpointing(checkpoint):
    directory, source = checkpoint
    cfg = ModelConfig(partial_pretrain=str(directory), dtype="bf16", attn_implementation="eager")
    model, tokenizer = load_base(cfg)
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager" and model.config.use_cache is False
    assert gradient_checkpointing_on(model)
    assert loss_chunk_size(model) is None  # model.loss_chunk_size defaults to the full logits
    assert tokenizer.eos_token == "t1" and tokenizer("t5 t9")["input_ids"] == [5, 9]
    plain, _ = load_base(cfg.model_copy(update={"dtype": "fp32", "enable_gradient_checkpointing": False}))
    assert not gradient_checkpointing_on(plain)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ids).logits, source(ids).logits)


def test_load_base_names_the_key_when_the_model_is_missing(tmp_path):
    with pytest.raises(OSError, match="model.partial_pretrain"):
        load_base(ModelConfig(partial_pretrain=str(tmp_path / "nope")))


def test_add_lora_gives_fp32_adapters_on_a_bf16_base(checkpoint):
    directory, _ = checkpoint
    cfg = ModelConfig(partial_pretrain=str(directory), dtype="bf16", loss_chunk_size=8)
    model = add_lora(load_base(cfg)[0], cfg)
    assert loss_chunk_size(model) == 8  # set by load_base on the base, seen through the PeftModel
    params = adapted_parameters(model, "lora")
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(params)
    # 7 target modules × 2 layers × (A, B)
    assert len(params) == 2 * 7 * 2
    # Non-reentrant checkpointing needs no grad-requiring embedding output (it would cost an extra
    # input-gradient pass through layer 0 under .backward()).
    assert not model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_target_modules_matching_nothing_is_a_clear_error(checkpoint):
    directory, _ = checkpoint
    model, _ = load_base(ModelConfig(partial_pretrain=str(directory), dtype="fp32"))
    with pytest.raises(ValueError, match=r"\['q_prj'\].*q_proj"):
        add_lora(model, LoraConfig(target_modules=["q_prj", "v_proj"]))


def test_adapted_parameters_modes(checkpoint):
    directory, _ = checkpoint
    cfg = ModelConfig(partial_pretrain=str(directory), dtype="fp32")
    base, _ = load_base(cfg)
    with pytest.raises(ValueError, match="add_lora"):
        adapted_parameters(base, "lora")
    full = adapted_parameters(base, "full")
    assert set(full) == {n for n, _ in base.named_parameters()} and all(p.requires_grad for p in full.values())
    with pytest.raises(ValueError, match="full"):
        adapted_parameters(add_lora(load_base(cfg)[0], cfg), "full")
    with pytest.raises(ValueError, match="meta.adapter"):
        adapted_parameters(base, "prefix")


def test_nf4_base_loads_on_cpu_and_a_fomaml_step_has_finite_grads(checkpoint):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    directory, _ = checkpoint
    cfg = ModelConfig(partial_pretrain=str(directory), dtype="bf16", quantization="nf4")
    base, _ = load_base(cfg)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = add_lora(base, cfg).train()
    params = adapted_parameters(model, "lora")
    meta = MetaConfig(algorithm="fomaml", inner_optimizer="sgd", inner_lr=1e-2, num_inner_steps=2, meta_batch_size=2)
    result = MetaLearner(model, params, meta).meta_gradient([random_task("a", 0), random_task("b", 1)])
    grads = torch.cat([g.flatten() for g in result.grads.values()])
    assert torch.isfinite(grads).all() and grads.abs().max() > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in result.metrics.values())


def write_gguf(path, model):
    """Minimal qwen3 GGUF (F16 tensors, byte-level BPE tokenizer without merges)."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(list(bytes_to_unicode().values())[: c.vocab_size])
    w.add_token_types([1] * c.vocab_size)
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm", "lm_head.weight": "output"}
    layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}" for k, v in layer.items()})
    state = model.state_dict()
    for ours, theirs in names.items():
        w.add_tensor(f"{theirs}.weight", state[ours].half().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_is_dequantised_into_a_trainable_dense_model(checkpoint, tmp_path):
    _, source = checkpoint
    write_gguf(tmp_path / "tiny.gguf", source)
    cfg = ModelConfig(partial_pretrain=str(tmp_path), gguf_file="tiny.gguf", dtype="fp32", attn_implementation="eager")
    model, tokenizer = load_base(cfg)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token_id == 1
    rounded = Qwen3ForCausalLM(source.config).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in source.state_dict().items()})
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, rounded(ids).logits, rtol=1e-5, atol=1e-5)
    params = adapted_parameters(model, "full")
    meta = MetaConfig(algorithm="fomaml", adapter="full", inner_optimizer="sgd", inner_lr=1e-2, num_inner_steps=1, meta_batch_size=1)
    result = MetaLearner(model.train(), params, meta).meta_gradient([random_task()])
    assert all(torch.isfinite(g).all() for g in result.grads.values())
