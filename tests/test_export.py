"""merge_and_save: the merged, saved, reloaded model computes base + adapter; failures leave nothing behind."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_maml import export
from lora_maml.cli import COMMANDS
from lora_maml.errors import run_main
from lora_maml.export import ExportError, merge_and_save, tolerance
from lora_maml.load_trained import load_trained
from lora_maml.models import add_lora, adapted_parameters, load_base
from recipes import merge_adapter
from test_load_trained import (
    logits,
    make_tiny,
    probe_ids,
    remote_code_checkpoint,
    run_config,
    save_run_checkpoint,
    trained_model,
)


def merge(argv: list[str]) -> int:
    """``lora-maml merge`` (recipes/merge_adapter.py) as the command line runs it: a user error is one
    ``error:`` line and exit code 1."""
    return run_main(merge_adapter.main, argv)


def saved_keys(directory: Path) -> dict[str, str]:
    keys = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            keys.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    return keys


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def make_run(root: Path, *, tied=True, **model):
    """Tiny base + a LoRA (or full) checkpoint; returns (pt, reference logits, base logits, probe ids)."""
    base = make_tiny(root / "tiny", tied=tied)
    cfg = run_config(base, root / "run", **model)
    trained, tokenizer, params = trained_model(cfg)
    pt = save_run_checkpoint(cfg, trained, params, step=2)
    ids = probe_ids(tokenizer)
    return pt, logits(dense_reference(cfg, params), ids), logits(dense_reference(cfg, {}), ids), ids


def dense_reference(cfg, weights):
    """fp32 unquantised base (+ LoRA) with ``weights`` copied in by name: what a merge must reproduce."""
    dense_cfg = cfg.model.model_copy(update={"dtype": "fp32", "quantization": None})
    model, _ = load_base(dense_cfg)
    if cfg.meta.adapter == "lora":
        model = add_lora(model, cfg.model.lora)
    with torch.no_grad():
        for name, p in adapted_parameters(model, cfg.meta.adapter).items():
            if weights:
                p.copy_(weights[name])
            elif ".lora_B." in name:
                p.zero_()  # no weights given: the base alone
    return model


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("fp32_run"))


def test_merged_fp32_model_equals_base_plus_adapter_and_loads_with_from_pretrained(fp32_run, tmp_path):
    pt, reference, base_logits, ids = fp32_run
    out = tmp_path / "merged"
    report = merge_and_save(pt, out)
    assert report["dtype"] == "fp32" and report["kind"] == "checkpoint" and report["step"] == 2
    assert report["merge_max_abs_diff"] <= 1e-5 and report["max_abs_diff"] <= 1e-5
    assert report["reload_max_abs_diff"] <= 1e-6
    assert report["tied_embeddings"] is True and report["notes"] == []
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert name in report["files"] and (out / name).is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and merged.config.use_cache is True
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert not any("lm_head" in k for k in saved_keys(out)), "tied lm_head must not be saved separately"
    out_logits = logits(merged, ids)
    assert (out_logits - reference).abs().max() <= 1e-5
    assert (out_logits - base_logits).abs().max() > 0.1, "the adapter must be in the merged weights"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_a_merge_is_published_with_the_umasks_modes(fp32_run, tmp_path, umask):
    """model.safetensors (written 0600 by safetensors) gets the mode of its siblings: that of a plain create
    under the umask (0644 under 022, 0600 under 077); the directory 0755 / 0700."""
    previous = os.umask(umask)
    try:
        merge_and_save(fp32_run[0], tmp_path / "merged")
    finally:
        os.umask(previous)
    out = tmp_path / "merged"
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert "merged/model.safetensors" in modes
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask}
    assert not wrong, f"umask {umask:03o}: {wrong}"


def test_bf16_base_merges_within_tolerance_and_keeps_the_adapter(tmp_path):
    pt, reference, base_logits, ids = make_run(tmp_path, dtype="bf16")
    out = tmp_path / "merged"
    report = merge_and_save(pt, out, max_shard_size="40KB")
    assert report["dtype"] == "bf16" and report["compute_dtype"] == "fp32"
    assert report["merge_max_abs_diff"] <= 1e-5
    assert report["tolerance"] == pytest.approx(tolerance("bf16", report["logit_scale"]))
    assert 0 < report["max_abs_diff"] <= report["tolerance"]
    assert report["reload_max_abs_diff"] <= 1e-6, "the bf16 files hold exactly the rounded merged weights"
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert set(saved_keys(out).values()) == {"BF16"}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    out_logits = logits(merged, ids)
    assert (out_logits - reference).abs().max() <= report["tolerance"]
    # bf16 rounding of W + s*B@A must not wash the adapter out.
    assert (out_logits - base_logits).abs().max() > 10 * report["tolerance"]


def test_untied_embeddings_stay_untied(tmp_path):
    pt, reference, _, ids = make_run(tmp_path, tied=False)
    out = tmp_path / "merged"
    report = merge_and_save(pt, out)
    assert report["tied_embeddings"] is False
    assert "lm_head.weight" in saved_keys(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert (logits(merged, ids) - reference).abs().max() <= 1e-5


def test_a_broken_merge_raises_and_writes_nothing(fp32_run, tmp_path, monkeypatch):
    pt = fp32_run[0]
    original = LoraModel.merge_and_unload

    def corrupting_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupting_merge)
    with pytest.raises(ExportError, match="the merge is wrong; nothing was written"):
        merge_and_save(pt, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_an_untied_merge_of_a_tied_model_raises(fp32_run, tmp_path, monkeypatch):
    pt = fp32_run[0]
    original = LoraModel.merge_and_unload

    def untying_merge(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        return model

    monkeypatch.setattr(LoraModel, "merge_and_unload", untying_merge)
    with pytest.raises(ExportError, match="no longer the input embedding"):
        merge_and_save(pt, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_the_rounding_check_is_live(fp32_run, tmp_path):
    # bf16 storage rounds the weights: a tolerance below that rounding must fail.
    with pytest.raises(ExportError, match=r"stored as bf16, the merged model differs from base \+ adapter"):
        merge_and_save(fp32_run[0], tmp_path / "merged", dtype="bf16", atol=1e-7)
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_saved_files_that_do_not_reproduce_the_merge_raise(fp32_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    check_files = export._check_files

    def corrupt_then_check(directory, *args):
        path = directory / "model.safetensors"
        tensors = load_file(str(path))
        tensors["model.layers.0.mlp.up_proj.weight"] *= 1.01
        save_file(tensors, str(path), metadata={"format": "pt"})
        return check_files(directory, *args)

    monkeypatch.setattr(export, "_check_files", corrupt_then_check)
    with pytest.raises(ExportError, match="reloaded with from_pretrained, differs from the merged model"):
        merge_and_save(fp32_run[0], tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_output_dir_is_refused_unless_overwrite(fp32_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        merge_and_save(fp32_run[0], out)
    assert (out / "keep.txt").read_text() == "precious"
    merge_and_save(fp32_run[0], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="would replace"):
        merge_and_save(fp32_run[0], Path(fp32_run[0]).parent, overwrite=True)
    base = Path(fp32_run[0]).parent.parent / "tiny"  # the run's model.partial_pretrain
    with pytest.raises(ValueError, match=r"would replace .*tiny"):
        merge_and_save(fp32_run[0], base, overwrite=True)
    assert (base / "model.safetensors").is_file()


def test_nf4_trained_adapter_merges_into_the_unquantised_base_with_a_note(tmp_path, caplog):
    pt, reference, _, ids = make_run(tmp_path, quantization="nf4")
    out = tmp_path / "merged"
    with caplog.at_level(logging.WARNING, logger="lora_maml"):
        report = merge_and_save(pt, out)
    assert len(report["notes"]) == 1 and "nf4-quantised base" in report["notes"][0]
    assert "merged into the unquantised base" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert set(saved_keys(out).values()) == {"F32"}
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert (logits(merged, ids) - reference).abs().max() <= 1e-5


def test_full_parameter_checkpoint_exports_its_weights(tmp_path):
    pt, reference, base_logits, ids = make_run(tmp_path, adapter="full")
    out = tmp_path / "merged"
    report = merge_and_save(pt, out)
    assert report["adapter"] == "full" and "merge_max_abs_diff" not in report
    merged = AutoModelForCausalLM.from_pretrained(out)
    saved = load_trained(pt)
    for name, p in saved.params.items():
        assert torch.equal(merged.get_parameter(name), p), name
    assert (logits(merged, ids) - reference).abs().max() <= 1e-6
    assert (reference - base_logits).abs().max() > 0.1


def test_adapter_dir_and_cli(fp32_run, tmp_path, capsys):
    pt = Path(fp32_run[0])
    out = tmp_path / "merged"
    code = merge(["--model-path", str(pt.parent / "step_2" / "adapter"), "--output", str(out), "--dtype", "fp32"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "adapter" and report["max_abs_diff"] <= 1e-5
    assert (logits(AutoModelForCausalLM.from_pretrained(out), fp32_run[3]) - fp32_run[1]).abs().max() <= 1e-5
    assert merge(["--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 1
    assert "missing: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()

    # `lora-maml merge` is this recipe; --checkpoint is --model-path under its former name.
    assert COMMANDS["merge"][0] == merge_adapter.__name__
    parse = merge_adapter.build_parser().parse_args
    assert parse(["--checkpoint", "run", "--output", "o"]).model_path == "run"
    assert parse(["--model-path", "run", "--output", "o"]).model_path == "run"


def one_error_line(err: str) -> str:
    """The whole stderr of a refused command: exactly one 'error:' line and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len([l for l in lines if l.startswith("error: ")]) == 1, err
    return next(line for line in lines if line.startswith("error: "))


def test_an_output_inside_the_checkpoint_is_refused_before_loading(fp32_run, capsys):
    """`merge --checkpoint RUN --output RUN/step_2 --overwrite` would replace the checkpoint it reads."""
    pt = Path(fp32_run[0])
    run_dir = pt.parent
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    for source in (run_dir, pt, run_dir / "step_2"):
        assert merge(["--checkpoint", str(source), "--output", str(run_dir / "step_2"), "--overwrite"]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"--output {run_dir / 'step_2'}: would replace or write inside {run_dir}" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert leftovers(run_dir) == []


def test_an_unwritable_output_fails_before_loading(fp32_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # --base names nothing loadable: the output is refused before any model is loaded.
    code = merge(["--checkpoint", str(fp32_run[0]), "--base", str(tmp_path / "no_base"), "--output",
                        str(blocker / "merged")])
    assert code == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --output (its parent)={blocker}: not a writable directory ({blocker} is a file)")


def test_leftovers_of_a_killed_merge_are_swept_by_the_next(fp32_run, tmp_path):
    """A merge killed (SIGTERM / SIGKILL) mid-save leaves .merged.tmp-<pid>-*; the next merge to the same
    output removes it. One of a live process (a concurrent merge) is left alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".merged.tmp-{dead_pid}-abc"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".merged.tmp-{1}-xyz"  # pid 1 is alive
    live.mkdir()
    merge_and_save(fp32_run[0], tmp_path / "merged")
    assert not stale.exists() and live.is_dir()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_a_truncated_adapter_file_is_named(fp32_run, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(Path(fp32_run[0]).parent / "step_2" / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert merge(["--checkpoint", str(adapter), "--output", str(tmp_path / "merged")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {weights}: not a valid safetensors file (")  # found before the base loads
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_an_adapter_whose_logits_are_not_finite_is_not_merged(fp32_run, tmp_path, capsys):
    """lora_alpha: 1e30 in adapter_config.json: its weights are finite, base + adapter's logits are not; merge
    says so in one line (not 'the merge is wrong' from comparing NaN with NaN) and writes nothing."""
    adapter = tmp_path / "adapter"
    shutil.copytree(Path(fp32_run[0]).parent / "step_2" / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e30}))
    assert merge(["--model-path", str(adapter), "--output", str(tmp_path / "merged"), "--dtype", "fp32"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        f"error: {adapter}: base + adapter gives non-finite logits on the probe texts: the model or adapter is corrupt "
        "(e.g. a huge lora_alpha in adapter_config.json) or overflows in fp32; nothing was written")
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []


def test_an_unreadable_pickle_is_one_line_in_merge_and_eval(fp32_run, tmp_path, capsys):
    """A checkpoint .pt replaced by a pickle that would run code (its manifest updated, so it looks
    complete): torch.load(weights_only=True) refuses it, and both commands say so in one line."""
    import os
    import pickle
    import shutil

    from lora_maml.data.prepare import prepare
    from lora_maml.data.synthetic import synthetic_records
    from lora_maml.cli import main as cli_main

    run_dir = tmp_path / "run"
    shutil.copytree(Path(fp32_run[0]).parent, run_dir)
    pt = run_dir / "maml_checkpoint_step_2.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    pt.write_bytes(pickle.dumps({"step": 2, "x": Payload()}))
    manifest_path = run_dir / "step_2" / "checkpoint_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["pt_size"] = pt.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    assert merge(["--checkpoint", str(run_dir), "--output", str(tmp_path / "merged")]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {pt}: corrupt or not loadable with torch.load")
    data = tmp_path / "data"
    prepare(synthetic_records(12, 0), data, support_ratio=0.4, query_ratio=0.2, seed=0,
            source_description={"source": "synthetic"})
    assert cli_main(["eval", "--model-path", str(run_dir), "--data-dir", str(data), "--n-shots", "0", "--output-dir",
                     str(tmp_path / "eval")]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {pt}: corrupt or not loadable with torch.load")
    assert not (tmp_path / "owned").exists()


def test_a_checkpoint_cannot_switch_on_remote_code_in_merge_or_eval(tmp_path, capsys, monkeypatch):
    """A checkpoint whose stored config sets model.trust_remote_code=true and whose base ships code
    (auto_map): merge and eval refuse it in one line, or load the base natively; the code never runs and
    the merged model carries none of it. Only --trust-remote-code on the command line allows it."""
    from lora_maml.cli import main as cli_main
    from lora_maml.data.prepare import prepare
    from lora_maml.data.synthetic import synthetic_records

    base = make_tiny(tmp_path / "tiny")
    custom = remote_code_checkpoint(base, tmp_path / "custom", native=False)
    assert merge(["--model-path", str(custom["pt"]), "--output", str(tmp_path / "merged")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {custom['pt']}: the model {custom['remote']} ships its own Python code")
    assert "unless the caller passes --trust-remote-code (the model.trust_remote_code=true stored" in line
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path) == []
    data = tmp_path / "data"
    prepare(synthetic_records(12, 0), data, support_ratio=0.4, query_ratio=0.2, seed=0,
            source_description={"source": "synthetic"})
    eval_args = ["--data-dir", str(data), "--tasks", "algebra", "--n-shots", "0", "--max-test-per-task", "1",
                 "--no-generate", "--device", "cpu"]
    assert cli_main(["eval", "--model-path", str(custom["pt"]), *eval_args, "--output-dir", str(tmp_path / "eval")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {custom['pt']}: the model {custom['remote']} ships its own Python code")
    assert "--trust-remote-code" in line
    assert not custom["marker"].exists()

    # A base type transformers implements itself merges natively: no auto_map, no *.py in the output.
    native = remote_code_checkpoint(base, tmp_path / "native", native=True)
    out = tmp_path / "merged_native"
    assert merge(["--model-path", str(native["pt"]), "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("config.json:auto_map" in note for note in report["notes"])
    assert not list(out.glob("*.py"))
    for name in ("config.json", "tokenizer_config.json", "generation_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text()), name
    assert (logits(AutoModelForCausalLM.from_pretrained(out), native["ids"]) - native["logits"]).abs().max() <= 1e-5
    assert not native["marker"].exists()

    # The flag on the command line is what reaches the loader (not run here: it would execute the code).
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise ValueError("stop")

    monkeypatch.setattr(export, "load_trained", record)
    import recipes.evaluate_few_shot as evaluate_recipe

    monkeypatch.setattr(evaluate_recipe, "load_trained", record)
    for flag in ([], ["--trust-remote-code"]):
        assert merge(["--model-path", str(native["pt"]), "--output", str(tmp_path / "m2"), *flag]) == 1
        assert cli_main(["eval", "--model-path", str(native["pt"]), *eval_args, "--output-dir",
                         str(tmp_path / "eval2"), *flag]) == 1
    assert seen == [False, False, True, True]
