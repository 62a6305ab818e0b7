import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_maml.errors import run_main
from lora_maml.tiny_model import build_tiny_model
from recipes.build_tiny_model import build_parser, main

TEXTS = [
    f"Problem: what is {a} + {b}? Add the numbers: {a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$."
    for a in range(3, 60, 7)
    for b in range(2, 40, 9)
] + ["Find the area of a triangle with base 6 and height 4. Area = (1/2)(6)(4) = 12, so $\\boxed{12}$."] * 5


def file_hashes(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", TEXTS, seed=3)


def test_loads_like_a_hub_checkpoint(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert (tiny / "model.safetensors").is_file()
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) <= model.config.vocab_size == 512
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == model.config.bos_token_id == tok.pad_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as Qwen3-4B
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)


def test_chat_template_is_chatml(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    # The scaffolding was in the tokenizer's training texts: one token per special token, role and newline.
    for role in ("system", "user", "assistant"):
        assert len(tok(f"<|im_start|>{role}\n", add_special_tokens=False)["input_ids"]) == 3
    with pytest.raises(Exception, match="unsupported role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_byte_level_round_trip(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    # Characters never seen in training still encode (as bytes) and decode exactly.
    for text in ("The answer is $\\boxed{42}$.", "  two  spaces\n\nand ünïcødé ∑ x² 🙂", "12345"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Digits are split one by one, as in Qwen's pre-tokenisation.
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5


def test_generate_stops_and_pads_with_configured_ids(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and ids["input_ids"].shape[1] < out.shape[1] <= ids["input_ids"].shape[1] + 4


def test_deterministic_and_seeded(tmp_path, tiny):
    rng_state = torch.get_rng_state()
    again = build_tiny_model(tmp_path / "again", TEXTS, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state), "building must not consume the caller's torch RNG"
    assert file_hashes(again) == file_hashes(tiny)

    other = build_tiny_model(tmp_path / "other", TEXTS, seed=4)
    hashes, ref = file_hashes(other), file_hashes(tiny)
    assert hashes["tokenizer.json"] == ref["tokenizer.json"]
    assert hashes["model.safetensors"] != ref["model.safetensors"]


def test_existing_output_dir_needs_overwrite(tmp_path):
    out = build_tiny_model(tmp_path / "m", TEXTS[:10], num_hidden_layers=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_tiny_model(out, TEXTS[:10])
    build_tiny_model(out, TEXTS[:10], num_hidden_layers=3, overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_invalid_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(tmp_path / "a", TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        build_tiny_model(tmp_path / "b", TEXTS, num_attention_heads=4, num_key_value_heads=3)
    assert not list(tmp_path.iterdir())


def test_cli_parses_size_flags():
    args = build_parser().parse_args(
        ["--output-dir", "x", "--synthetic-per-task", "3", "--hidden-size", "32", "--untied-embeddings"]
    )
    assert (args.synthetic_per_task, args.hidden_size, args.untied_embeddings, args.data_dir) == (3, 32, True, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["--output-dir", "x", "--data-dir", "d", "--synthetic-per-task", "3"]
        )


def test_cli_builds_from_the_synthetic_suite(tmp_path):
    pytest.importorskip("lora_maml.data.synthetic", reason="lora_maml/data/synthetic.py not written yet")
    out = tmp_path / "cli"
    assert main(["--output-dir", str(out), "--synthetic-per-task", "3", "--num-hidden-layers", "1"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


def test_cli_builds_from_a_prepared_data_dir(tmp_path):
    prepare = pytest.importorskip("lora_maml.data.prepare", reason="lora_maml/data/prepare.py not written yet")
    tasks = prepare.list_tasks  # the reader the CLI uses; its writer is `lora-maml prepare`
    data_dir = tmp_path / "data"
    from lora_maml.cli import main as cli_main

    assert cli_main(["prepare", "--source", "synthetic", "--synthetic-per-task", "12", "--output-dir", str(data_dir)]) == 0
    assert tasks(data_dir)["meta_train"]
    out = tmp_path / "from_data"
    assert main(["--output-dir", str(out), "--data-dir", str(data_dir), "--num-hidden-layers", "1"]) == 0
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|endoftext|>"


def test_cli_errors_name_its_options(tmp_path, capsys):
    assert run_main(main, ["--output-dir", str(tmp_path / "m"), "--synthetic-per-task", "0"]) == 1
    assert capsys.readouterr().err == "error: --synthetic-per-task must be an integer >= 1, got 0\n"
    assert run_main(main, ["--output-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'manifest.json'}: not found")
    assert not (tmp_path / "m").exists()
