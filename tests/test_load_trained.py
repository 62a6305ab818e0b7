"""load_trained: every kind of --model-path gives the weights that were saved (tiny Qwen3 in tmp, offline)."""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_maml.config import Config, LoraConfig, config_to_dict
from lora_maml.load_trained import LoadTrainedError, load_trained, resolve_model_path
from lora_maml.models import add_lora, adapted_parameters, load_base
from lora_maml.tiny_model import build_tiny_model
from lora_maml import checkpoint as ckpt

TEXTS = [
    "What is $1+2$? The sum is $\\boxed{3}$.",
    "Compute the area of a circle of radius $2$: $4\\pi$.",
    "Solve $x^2 - 5x + 6 = 0$; the roots are $2$ and $3$.",
] * 4
PROBE = "<|im_start|>user\nWhat is 7 times 8?<|im_end|>\n<|im_start|>assistant\nThe answer is 56."


def make_tiny(directory: Path, *, tied: bool = True) -> Path:
    return build_tiny_model(directory, TEXTS, vocab_size=320, tie_word_embeddings=tied, seed=0)


def run_config(base: Path, run_dir: Path, **model) -> Config:
    fields = {"partial_pretrain": str(base), "dtype": "fp32", "enable_gradient_checkpointing": False,
              "lora": {"r": 4, "alpha": 8}, **model}
    adapter = fields.pop("adapter", "lora")
    return Config.model_validate(
        {"model": fields, "meta": {"adapter": adapter}, "trainer": {"default_local_dir": str(run_dir)}}
    )


def trained_model(cfg: Config, seed: int = 1):
    """The model a run would hold after training: LoRA with non-zero random B (or perturbed full weights)."""
    model, tokenizer = load_base(cfg.model)
    if cfg.meta.adapter == "lora":
        model = add_lora(model, cfg.model.lora)
    params = adapted_parameters(model, cfg.meta.adapter)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if cfg.meta.adapter == "full" or ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
    return model.eval(), tokenizer, params


def save_run_checkpoint(cfg: Config, model, params, step: int, state_dict=None) -> Path:
    full = cfg.meta.adapter == "full"
    return ckpt.save_checkpoint(
        cfg.trainer.default_local_dir,
        step,
        model_state_dict=state_dict if state_dict is not None else {n: p.detach() for n, p in params.items()},
        optimizer_state_dict={"state": {}, "param_groups": []},
        config=config_to_dict(cfg),
        trainer_state={"kind": "fomaml"},
        rng_states=[ckpt.capture_rng_state()],
        save_pretrained=lambda d: model.save_pretrained(d, safe_serialization=True),
        pretrained_kind="model" if full else "adapter",
    )


def probe_ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(PROBE, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny tied base and a run dir with one LoRA checkpoint; the reference base + adapter logits."""
    root = tmp_path_factory.mktemp("lora_run")
    base = make_tiny(root / "tiny")
    cfg = run_config(base, root / "run")
    model, tokenizer, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, model, params, step=3)
    ids = probe_ids(tokenizer)
    with model.disable_adapter():
        base_logits = logits(model, ids)
    return {"root": root, "base": base, "cfg": cfg, "pt": pt, "ids": ids, "params": params,
            "logits": logits(model, ids), "base_logits": base_logits}


def test_every_path_kind_gives_the_saved_base_plus_adapter(lora_run):
    run_dir = lora_run["root"] / "run"
    paths = {
        "pt": (lora_run["pt"], "checkpoint"),
        "step dir": (run_dir / "step_3", "checkpoint"),
        "run dir": (run_dir, "checkpoint"),
        "adapter dir": (run_dir / "step_3" / "adapter", "adapter"),
    }
    # The adapter changes the function, so matching it is not matching the base.
    assert (lora_run["logits"] - lora_run["base_logits"]).abs().max() > 0.1
    for label, (path, kind) in paths.items():
        trained = load_trained(path)
        assert trained.kind == kind, label
        assert trained.adapter == "lora" and trained.base == str(lora_run["base"])
        assert list(trained.params) == list(lora_run["params"]), label
        assert all(p.dtype == torch.float32 and p.requires_grad for p in trained.params.values())
        assert not trained.model.training
        torch.testing.assert_close(logits(trained.model, lora_run["ids"]), lora_run["logits"], rtol=0, atol=1e-6)
        if kind == "checkpoint":
            assert trained.step == 3 and trained.config == lora_run["cfg"]
            assert trained.source == str(lora_run["pt"])


def test_peft_state_dict_names_load_too(lora_run, tmp_path):
    # checkpoint.py documents get_peft_model_state_dict names (no ".default"); both spellings load.
    cfg = lora_run["cfg"].model_copy(deep=True)
    cfg.trainer.default_local_dir = str(tmp_path / "run")
    peft_names = {n.replace(".default.", "."): p.detach() for n, p in lora_run["params"].items()}
    model, _, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, model, params, step=1, state_dict=peft_names)
    torch.testing.assert_close(logits(load_trained(pt).model, lora_run["ids"]), lora_run["logits"], rtol=0, atol=1e-6)


def test_run_dir_takes_the_newest_complete_checkpoint(lora_run, tmp_path):
    cfg = lora_run["cfg"].model_copy(deep=True)
    cfg.trainer.default_local_dir = str(tmp_path / "run")
    model, _, params = trained_model(cfg, seed=1)
    save_run_checkpoint(cfg, model, params, step=2)
    model5, _, params5 = trained_model(cfg, seed=5)
    save_run_checkpoint(cfg, model5, params5, step=5)
    trained = load_trained(tmp_path / "run")
    assert trained.step == 5
    expected = logits(model5, lora_run["ids"])
    torch.testing.assert_close(logits(trained.model, lora_run["ids"]), expected, rtol=0, atol=1e-6)
    # A checkpoint whose step dir lost a file is incomplete: the run dir falls back to step 2.
    (tmp_path / "run" / "step_5" / "adapter" / "adapter_model.safetensors").unlink()
    assert load_trained(tmp_path / "run").step == 2


def test_base_and_dtype_override_the_run_config(lora_run, tmp_path):
    moved = tmp_path / "moved_base"
    shutil.copytree(lora_run["base"], moved)
    trained = load_trained(lora_run["pt"], base=str(moved), dtype="bf16")
    assert trained.base == str(moved) and trained.native_dtype == "fp32"
    frozen = {p.dtype for n, p in trained.model.named_parameters() if ".lora_" not in n}
    assert frozen == {torch.bfloat16} and {p.dtype for p in trained.params.values()} == {torch.float32}
    out = logits(trained.model, lora_run["ids"])
    assert (out - lora_run["logits"]).abs().max() < 0.05 * lora_run["logits"].abs().max()


def test_plain_model_gets_a_fresh_lora_that_leaves_it_unchanged(lora_run):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    trained = load_trained(lora_run["base"], lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(torch.rand(3), expected_draw), "loading must not consume the caller's RNG"
    assert trained.kind == "model" and trained.adapter == "lora" and trained.config is None
    assert len(trained.params) == 2 * 2 * 2  # 2 layers x {q,v} x {A,B}
    assert all(p.abs().sum() == 0 for n, p in trained.params.items() if ".lora_B." in n)
    torch.testing.assert_close(logits(trained.model, lora_run["ids"]), lora_run["base_logits"], rtol=0, atol=1e-6)
    again = load_trained(lora_run["base"], lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert all(torch.equal(p, again.params[n]) for n, p in trained.params.items()), "fresh LoRA init is seeded"


def test_full_parameter_checkpoint_loads(lora_run, tmp_path):
    cfg = run_config(lora_run["base"], tmp_path / "run", adapter="full")
    model, tokenizer, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, model, params, step=4)
    trained = load_trained(pt)
    assert trained.adapter == "full" and list(trained.params) == list(params)
    assert not any(".lora_" in n for n, _ in trained.model.named_parameters())
    ids = probe_ids(tokenizer)
    torch.testing.assert_close(logits(trained.model, ids), logits(model, ids), rtol=0, atol=1e-6)
    assert (logits(trained.model, ids) - lora_run["base_logits"]).abs().max() > 0.1


def test_nf4_run_loads_quantised_by_default_and_dense_on_request(lora_run, tmp_path):
    cfg = run_config(lora_run["base"], tmp_path / "run", quantization="nf4")
    model, _, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, model, params, step=1)
    quantised = load_trained(pt)
    assert type(quantised.model.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    expected = logits(model, lora_run["ids"])
    torch.testing.assert_close(logits(quantised.model, lora_run["ids"]), expected, rtol=0, atol=1e-6)
    dense = load_trained(pt, keep_quantization=False)
    assert type(dense.model.get_base_model().model.layers[0].mlp.down_proj.base_layer) is torch.nn.Linear
    for name, p in quantised.params.items():
        assert torch.equal(p, dense.params[name])


def test_mismatched_weights_name_the_checkpoint(lora_run, tmp_path):
    cfg = lora_run["cfg"].model_copy(deep=True)
    cfg.trainer.default_local_dir = str(tmp_path / "run")
    model, _, params = trained_model(cfg)
    partial = {n: p.detach() for n, p in list(params.items())[:-2]}
    pt = save_run_checkpoint(cfg, model, params, step=1, state_dict=partial)
    with pytest.raises(ckpt.CheckpointError, match=r"maml_checkpoint_step_1\.pt.*does not match.*missing"):
        load_trained(pt)
    # The config says r=4; weights of rank 2 under the right names are a shape error.
    small = {n: (p[:2] if ".lora_A." in n else p[:, :2]).detach() for n, p in params.items()}
    pt = save_run_checkpoint(cfg, model, params, step=2, state_dict=small)
    with pytest.raises(ckpt.CheckpointError, match=r"has shape \(2, 64\).*expects \(4, 64\)"):
        load_trained(pt)


def test_errors_name_the_path_and_what_was_expected(lora_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*no such file or directory.*expected a run checkpoint"):
        load_trained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"someorg/not-cached: no such file or directory, nor a hub model"):
        load_trained("someorg/not-cached")  # offline: a hub id that is not in the cache
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("hello")
    with pytest.raises(LoadTrainedError, match=r"odd: a directory holding none of these \(\['notes.txt'\]\)"):
        load_trained(odd)
    with pytest.raises(LoadTrainedError, match=r"notes.txt: a file, but not a run checkpoint"):
        load_trained(odd / "notes.txt")
    with pytest.raises(LoadTrainedError, match="brings its own LoRA configuration"):
        load_trained(lora_run["pt"], lora=LoraConfig(r=2))
    with pytest.raises(LoadTrainedError, match="this is a model itself"):
        load_trained(lora_run["base"], base=str(lora_run["base"]))
    with pytest.raises(ValueError, match="model.dtype"):
        load_trained(lora_run["pt"], dtype="fp8")
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "latest").write_text("step_7\n")
    with pytest.raises(ckpt.CheckpointError, match="empty_run: a run directory without a complete checkpoint"):
        load_trained(empty_run)
    adapter_without_base = tmp_path / "adapter"
    shutil.copytree(lora_run["root"] / "run" / "step_3" / "adapter", adapter_without_base)
    config_path = adapter_without_base / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(LoadTrainedError, match="no base_model_name_or_path; pass base="):
        load_trained(adapter_without_base)
    assert load_trained(adapter_without_base, base=str(lora_run["base"])).kind == "adapter"


def test_resolve_model_path_kinds(lora_run):
    run_dir = lora_run["root"] / "run"
    assert resolve_model_path(run_dir) == ("checkpoint", str(lora_run["pt"]))
    assert resolve_model_path(run_dir / "step_3") == ("checkpoint", str(lora_run["pt"]))
    assert resolve_model_path(run_dir / "step_3" / "adapter")[0] == "adapter"
    assert resolve_model_path(lora_run["base"]) == ("model", str(lora_run["base"]))


# --- remote code: only the caller can allow it ---------------------------------------------------
_REMOTE_CONFIG_PY = """from pathlib import Path

Path({marker!r}).write_text("remote code ran")
from transformers import Qwen3Config


class EvilConfig(Qwen3Config):
    model_type = {model_type!r}
"""
_REMOTE_MODEL_PY = """from pathlib import Path

Path({marker!r}).write_text("remote code ran")
from transformers import Qwen3ForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(Qwen3ForCausalLM):
    config_class = EvilConfig
"""


def with_remote_code(base: Path, directory: Path, marker: Path, *, native: bool) -> Path:
    """A copy of the model ``base`` whose config names its own code (``auto_map``): code that writes
    ``marker`` when it runs. ``native``: its model_type stays qwen3, which transformers implements without
    the code; else a type only the code defines."""
    shutil.copytree(base, directory)
    model_type = "qwen3" if native else "evil_qwen3"
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                   "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_evil.py").write_text(_REMOTE_CONFIG_PY.format(marker=str(marker), model_type=model_type))
    (directory / "modeling_evil.py").write_text(_REMOTE_MODEL_PY.format(marker=str(marker)))
    return directory


def remote_code_checkpoint(base: Path, root: Path, *, native: bool) -> dict:
    """A LoRA checkpoint trained on the plain ``base`` whose STORED config says model.trust_remote_code=true
    and points model.partial_pretrain at a copy of ``base`` with remote code (:func:`with_remote_code`).
    Returns pt, the remote-code directory, the marker its code writes, probe ids and base + adapter logits."""
    marker = root / "REMOTE_CODE_RAN"
    model, tokenizer, params = trained_model(run_config(base, root / "unused"))
    remote = with_remote_code(base, root / "remote_base", marker, native=native)
    pt = save_run_checkpoint(run_config(remote, root / "run", trust_remote_code=True), model, params, step=2)
    ids = probe_ids(tokenizer)
    return {"pt": pt, "remote": remote, "marker": marker, "ids": ids, "logits": logits(model, ids)}


def test_a_checkpoint_cannot_switch_on_remote_code(lora_run, tmp_path, caplog):
    custom = remote_code_checkpoint(lora_run["base"], tmp_path / "custom", native=False)
    with pytest.raises(LoadTrainedError, match=(
        r"maml_checkpoint_step_2\.pt: the model .*remote_base ships its own Python code \(auto_map in its config\), "
        r"which is not run unless the caller passes trust_remote_code=True \(the model.trust_remote_code=true "
        r"stored in the checkpoint's config is ignored\)")):
        load_trained(custom["pt"])
    # The same directory as a model or as an adapter's base is refused alike.
    with pytest.raises(LoadTrainedError, match=r"remote_base ships its own Python code"):
        load_trained(custom["remote"])
    with pytest.raises(LoadTrainedError, match=r"remote_base ships its own Python code"):
        load_trained(custom["pt"].parent / "step_2" / "adapter", base=str(custom["remote"]))
    assert not custom["marker"].exists()

    # A type transformers implements itself loads natively: the code is not run, the weights are the run's.
    native = remote_code_checkpoint(lora_run["base"], tmp_path / "native", native=True)
    with caplog.at_level("WARNING", logger="lora_maml"):
        trained = load_trained(native["pt"])
    assert not native["marker"].exists()
    assert "model.trust_remote_code=true; ignored" in caplog.text
    assert trained.trust_remote_code is False and trained.config.model.trust_remote_code is False
    assert type(trained.model.get_base_model()).__name__ == "Qwen3ForCausalLM"
    torch.testing.assert_close(logits(trained.model, native["ids"]), native["logits"], rtol=0, atol=1e-6)


# --- what a checkpoint or adapter brings is checked --------------------------------------------
def copied_adapter(lora_run, directory: Path) -> Path:
    shutil.copytree(lora_run["root"] / "run" / "step_3" / "adapter", directory)
    return directory


def test_non_finite_saved_weights_are_refused_naming_file_and_tensor(lora_run, tmp_path):
    """A NaN in one lora_B of a checkpoint (save_checkpoint refuses to write one: here a damaged file of the
    same size), or an inf in an adapter file: an error naming the file and the tensor, before anything is
    scored (it would evaluate to accuracy 0 with no NLL)."""
    cfg = lora_run["cfg"].model_copy(deep=True)
    cfg.trainer.default_local_dir = str(tmp_path / "run")
    model, _, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, model, params, step=1)
    name = next(n for n in params if ".lora_B." in n)
    data = pt.read_bytes()
    stored = params[name].detach().numpy().tobytes()  # the tensor's bytes, stored uncompressed in the .pt
    assert data.count(stored) == 1
    pt.write_bytes(data.replace(stored, struct.pack("<f", float("nan")) + stored[4:]))  # same size: complete
    with pytest.raises(LoadTrainedError, match=rf"{pt}: 1 saved tensor\(s\) hold non-finite values .*"
                                               rf"{re.escape(name)} \(1 of \d+ values\)"):
        load_trained(pt)

    adapter = copied_adapter(lora_run, tmp_path / "adapter")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = sorted(k for k in weights if ".lora_A." in k)[-1]
    weights[key][1, :3] = float("inf")
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LoadTrainedError, match=rf"adapter_model\.safetensors: 1 saved tensor\(s\) hold non-finite "
                                               rf"values .*{re.escape(key)} \(3 of \d+ values\)"):
        load_trained(adapter)


def test_an_adapter_config_must_cover_exactly_the_weights_it_ships(lora_run, tmp_path):
    """target_modules naming q_proj only while the file holds all seven projections would drop 6 of 7 trained
    pairs; naming modules the file has no weights for would keep those at B = 0. Both are errors naming the
    keys and modules on either side."""
    narrow = copied_adapter(lora_run, tmp_path / "narrow")
    config = json.loads((narrow / "adapter_config.json").read_text())
    (narrow / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(LoadTrainedError) as err:
        load_trained(narrow)
    message = str(err.value)
    assert message.startswith(f"{narrow / 'adapter_model.safetensors'}: does not match {narrow / 'adapter_config.json'} "
                              "(target_modules=['q_proj']): 24 tensors of modules ['down_proj', 'gate_proj', 'k_proj', "
                              "'o_proj', 'up_proj', 'v_proj'] that target_modules does not cover, e.g. ")
    assert "no tensors for" not in message

    partial = copied_adapter(lora_run, tmp_path / "partial")
    weights = load_file(str(partial / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".q_proj." in k}, str(partial / "adapter_model.safetensors"))
    with pytest.raises(LoadTrainedError, match=r"no tensors for 24 LoRA weights of target modules \['down_proj', "
                                               r"'gate_proj', 'k_proj', 'o_proj', 'up_proj', 'v_proj'\], e\.g\. "):
        load_trained(partial)
    # Consistent again (both sides q_proj only): it loads, with the q_proj pairs only.
    (partial / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    assert len(load_trained(partial).params) == 2 * 2  # 2 layers x {A, B}


def test_a_checkpoint_without_an_inputs_fingerprint_loads_with_one_warning(lora_run, tmp_path, caplog):
    """Checkpoints of older versions recorded no fingerprint of their data and base: they keep loading, and
    say once that whether those changed cannot be checked."""
    cfg = lora_run["cfg"].model_copy(deep=True)
    cfg.trainer.default_local_dir = str(tmp_path / "run")
    model, _, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, model, params, step=1)  # trainer_state without "inputs"
    first, second = load_trained(pt), load_trained(pt)
    assert first.inputs is None and second.step == 1
    assert caplog.text.count(f"{pt}: written without a fingerprint of its data and base model") == 1
