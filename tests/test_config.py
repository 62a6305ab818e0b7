from pathlib import Path

import pytest
import yaml

from lora_maml.config import Config, ConfigError, load_config, resolve_config_path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


def test_qwen3_config_carries_the_guide_values_but_the_calibrated_lora_inner_loop():
    from lora_maml.config import DEFAULT_INNER_LR, DEFAULT_INNER_OPTIMIZER

    cfg = load_config(CONFIG_DIR / "qwen3_4b_math.yaml")
    assert cfg.model.partial_pretrain == "Qwen/Qwen3-4B-Instruct-2507"
    assert cfg.model.dtype == "bf16"
    assert cfg.meta.adapter == "lora" and cfg.meta.inner_optimizer == DEFAULT_INNER_OPTIMIZER["lora"]
    assert cfg.meta.inner_lr == DEFAULT_INNER_LR[("lora", cfg.meta.inner_optimizer)]
    assert (cfg.meta.num_inner_steps, cfg.meta.outer_lr) == (5, 3e-5)
    assert (cfg.meta.meta_batch_size, cfg.meta.inner_batch_size, cfg.meta.query_batch_size) == (4, 4, 4)
    assert (cfg.trainer.total_steps, cfg.trainer.save_freq, cfg.trainer.test_freq) == (5000, 500, 100)
    assert cfg.data.max_length == 2048


def test_the_guide_inner_loop_is_kept_for_full_parameter_fomaml():
    guide, lora = load_config(CONFIG_DIR / "qwen3_4b_math_guide.yaml"), load_config(CONFIG_DIR / "qwen3_4b_math.yaml")
    assert (guide.meta.adapter, guide.meta.inner_optimizer, guide.meta.inner_lr) == ("full", "sgd", 1e-4)
    assert guide.model == lora.model and guide.data == lora.data and guide.optim == lora.optim


@pytest.mark.parametrize("name", ["qwen3_4b_math.yaml", "qwen3_4b_math_guide.yaml", "smollm2_135m_math.yaml"])
def test_every_key_of_the_shipped_configs_is_commented(name):
    # Each field documents what it does: a comment line directly above every key.
    lines = (CONFIG_DIR / name).read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        key = stripped.split(":")[0]
        assert lines[i - 1].strip().startswith("#"), f"key {key!r} at line {i + 1} has no comment above it"


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["meta.inner_lr=5e-5", "trainer.total_steps=10", "trainer.logger=[console,jsonl]",
                             "model.quantization=null", "optim.betas=[0.8,0.9]"])
    assert cfg.meta.inner_lr == 5e-5
    assert cfg.trainer.total_steps == 10
    assert cfg.trainer.logger == ["console", "jsonl"]
    assert cfg.optim.betas == (0.8, 0.9)


def test_a_single_logger_means_a_one_element_list():
    assert load_config(None, ["trainer.logger=jsonl"]).trainer.logger == ["jsonl"]
    assert load_config(None, ["trainer.logger=[]"]).trainer.logger == []
    with pytest.raises(ConfigError, match=r"trainer\.logger\.0"):
        load_config(None, ["trainer.logger=mlflow"])


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["meta.inner_lrr=1e-4"], "meta.inner_lrr", "unknown key"),
        (["meta.inner_lr=0"], "meta.inner_lr", "greater than 0"),
        (["meta.outer_lr=-1e-5"], "meta.outer_lr", "greater than 0"),
        # Every rate, beta, epsilon and scale must be finite: .inf passed validation and NaN'd the weights.
        (["meta.outer_lr=.inf"], "meta.outer_lr", "finite number"),
        (["meta.inner_lr=.nan"], "meta.inner_lr", "finite number"),
        (["meta.inner_lr_lr=.inf"], "meta.inner_lr_lr", "finite number"),
        (["sft.lr=.inf"], "sft.lr", "finite number"),
        (["optim.eps=.inf"], "optim.eps", "finite number"),
        (["optim.betas=[0.9,.nan]"], "optim.betas.1", "finite number"),
        (["optim.clip_grad=.inf"], "optim.clip_grad", "finite number"),
        (["optim.weight_decay=.inf"], "optim.weight_decay", "finite number"),
        (["model.lora.alpha=.inf"], "model.lora.alpha", "finite number"),
        (["meta.meta_batch_size=0"], "meta.meta_batch_size", "greater than or equal to 1"),
        (["meta.inner_batch_size=two"], "meta.inner_batch_size", "valid integer"),
        (["trainer.save_freq=0"], "trainer.save_freq", "greater than or equal to 1"),
        (["data.support_ratio=1.2"], "data.support_ratio", "less than 1"),
        (["data.support_ratio=0.6", "data.query_ratio=0.4"], "data", "support_ratio + query_ratio"),
        (["optim.betas=[0.9,1.5]"], "optim", "betas"),
        (["optim.lr_warmup_steps_ratio=1.0"], "optim.lr_warmup_steps_ratio", "less than 1"),
        (["data.truncation=middle"], "data.truncation", "'error', 'left' or 'right'"),
        (["trainer.logger=[console,mlflow]"], "trainer.logger.1", "console"),
        (["trainer.console_metrics=some"], "trainer.console_metrics", "'headline' or 'all'"),
        (["trainer.resume_mode=path"], "trainer", "resume_from_path"),
        (["data.tasks=[algebra,topology]"], "data", "topology"),
        (["meta.algorithm=maml"], "<root>", "enable_gradient_checkpointing=false"),
        (["model.quantization=nf4", "meta.adapter=full"], "<root>", "meta.adapter=lora"),
        (["model.lora.r=0"], "model.lora.r", "greater than or equal to 1"),
        (["model.loss_chunk_size=0"], "model.loss_chunk_size", "greater than or equal to 1"),
        (["model.loss_chunk_size=1024", "model.fsdp_config.enabled=true"], "model", "loss_chunk_size=null"),
        (["model.compile=true", "model.fsdp_config.enabled=true"], "model", "model.compile=false"),
        (["meta.algorithm=maml", "model.enable_gradient_checkpointing=false", "model.attn_implementation=eager",
          "model.compile=true"], "<root>", "model.compile=false"),
    ],
)
def test_bad_values_name_the_key(overrides, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert f"  {key}:" in message and expected in message, message


def test_maml_is_accepted_with_its_requirements():
    cfg = load_config(None, ["meta.algorithm=maml", "model.enable_gradient_checkpointing=false",
                             "model.attn_implementation=eager"])
    assert cfg.meta.algorithm == "maml"
    # The chunked loss has a double backward (tests/test_meta_gradients.py checks MAML with it).
    chunked = load_config(None, ["meta.algorithm=maml", "model.enable_gradient_checkpointing=false",
                                 "model.attn_implementation=eager", "model.loss_chunk_size=1024"])
    assert chunked.model.loss_chunk_size == 1024


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"meta": {"inner_steps": 3}}))
    with pytest.raises(ConfigError, match=r"typo.yaml.*\n  meta.inner_steps: unknown key"):
        load_config(typo)
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["meta.inner_lr"])


def test_config_name_resolves_to_the_shipped_file():
    assert resolve_config_path(config_name="qwen3_4b_math") == CONFIG_DIR / "qwen3_4b_math.yaml"
    with pytest.raises(ConfigError, match="known:"):
        resolve_config_path(config_name="qwen9")


def test_defaults_equal_the_guide_config():
    # The schema's defaults are the documented ones: a config that sets nothing means the guide.
    assert Config() == load_config(CONFIG_DIR / "qwen3_4b_math.yaml")


def test_with_absolute_paths_keeps_hub_ids(tmp_path, monkeypatch):
    """Relative local paths become absolute (a checkpoint records them; merging from another directory
    must find the base); a hub id and the synthetic source stay as they are."""
    from lora_maml.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    cfg = with_absolute_paths(load_config(None, ["model.partial_pretrain=models/tiny", "data.data_dir=data",
                                                 "trainer.default_local_dir=./out", "data.source=synthetic"]))
    assert cfg.model.partial_pretrain == str(tmp_path / "models" / "tiny")
    assert (cfg.data.data_dir, cfg.trainer.default_local_dir) == (str(tmp_path / "data"), str(tmp_path / "out"))
    assert cfg.data.source == "synthetic"
    hub = with_absolute_paths(load_config(None, ["model.partial_pretrain=Qwen/Qwen3-4B-Instruct-2507"]))
    assert hub.model.partial_pretrain == "Qwen/Qwen3-4B-Instruct-2507"
    built = with_absolute_paths(load_config(None, ["model.partial_pretrain=outputs/demo/tiny_qwen3",
                                                   "model.build_tiny_if_missing=true"]))
    assert built.model.partial_pretrain == str(tmp_path / "outputs" / "demo" / "tiny_qwen3")


def alias_bomb(levels: int = 9) -> str:
    """A "billion laughs": ``levels`` lists of 9 aliases of the list before, 9**levels strings once expanded,
    in a few hundred bytes; the last is given to a key that wants a number, so validation would quote it."""
    lines = ["l0: &l0 [" + ",".join(["lol"] * 9) + "]"]
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmeta:\n  inner_lr: *l{levels - 1}\n"


def test_nested_aliases_are_refused_at_once_in_one_line_naming_the_file(tmp_path, capsys):
    import subprocess
    import sys
    import time

    from lora_maml.errors import run_main
    from recipes import fomaml_math

    path = tmp_path / "laughs.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 450
    # In a child first, so that a loader that expands the aliases fails this test instead of hanging the suite.
    child = subprocess.run(
        [sys.executable, "-c", "import sys; from lora_maml.config import load_config; from lora_maml.errors import "
         "run_main; sys.exit(run_main(lambda argv: load_config(argv[0]), sys.argv[1:]))", str(path)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )
    assert child.returncode == 2, child.stderr[-2000:]
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith(f"{path}: holds more than 100,000 values once its YAML aliases are expanded")
    assert "\n" not in message and len(message) < 400
    # The training command: one error line, exit code 2 (a config error).
    assert run_main(fomaml_math.main, ["--config", str(path)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith(f"error: {path}: holds more than 100,000 values") and err_text.count("\n") == 1

    # An override is bounded the same way, and a value that refers to itself is refused.
    bomb = "[" + ", ".join(f"&o{i} [" + ", ".join([f"*o{i - 1}" if i else "lol"] * 9) + "]" for i in range(9)) + "]"
    with pytest.raises(ConfigError, match=r"^override 'meta.inner_lr=\[&o0 .*: holds more than 100,000 values"):
        load_config(None, [f"meta.inner_lr={bomb}"])
    with pytest.raises(ConfigError, match=r"^override 'meta.inner_lr=&r \[\*r\]': a YAML alias refers to a value "
                                          r"that contains it"):
        load_config(None, ["meta.inner_lr=&r [*r]"])


def test_error_messages_quote_a_bounded_part_of_the_input(tmp_path):
    long_value = "x" * 100_000
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"meta.inner_lr={long_value}"])
    assert "meta.inner_lr:" in str(err.value) and len(str(err.value)) < 1000
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"meta.inner_lr=[{', '.join(['[1, 2, 3]'] * 10_000)}]"])
    assert len(str(err.value)) < 1000
    with pytest.raises(ConfigError, match="expected key.sub=value") as err:
        load_config(None, [long_value])
    assert len(str(err.value)) < 1000
    deep = tmp_path / "deep.yaml"
    deep.write_text("meta: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml: nested too deeply"):
        load_config(deep)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml: 1,048,579 bytes; a config file is at most 1,048,576"):
        load_config(big)
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"unknown_{i}: 1\n" for i in range(100)))
    with pytest.raises(ConfigError) as err:
        load_config(many)
    assert "... and 80 more" in str(err.value) and len(str(err.value)) < 2000
