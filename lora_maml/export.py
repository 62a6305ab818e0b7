"""Merge a trained adapter into its base and save a plain Hugging Face model (for vLLM), verified.

The program is ``recipes/merge_adapter.py`` (``lora-maml merge --model-path PATH --output DIR``).

Steps (:func:`merge_and_save`), with three checks on the logits of a probe batch (the probe texts as
user turns of the chat template), all computed in fp32 (fp64 for an fp64 output):

1. :func:`lora_maml.load_trained.load_trained` in fp32 with the base UNQUANTISED: LoRA is merged into
   the dense base, never into a quantised one (an nf4-trained run gets a note: the merged model is
   base + adapter, not the nf4 base it was trained on + adapter). Full-parameter runs are taken as
   they are. Its logits are the reference: base + adapter (non-finite ones are an error: every check
   below would compare NaN with NaN).
2. ``merge_and_unload`` in fp32. Check 1 (the merge): merged logits vs the reference.
3. Round the weights to the storage dtype (``dtype``, else the run's ``model.dtype`` / the base's
   saved dtype). Check 2 (rounding): their logits vs the reference. Tied embeddings must still be tied.
4. Save safetensors shards, config, generation config, tokenizer and chat template into a temporary
   directory next to the output; every tensor in the storage dtype, no separate copy of a tied output
   embedding, the tokenizer reloads with the same chat template and ids.
5. Check 3 (the files): ``AutoModelForCausalLM.from_pretrained`` of that directory must reproduce the
   logits of step 3. Only then is the directory renamed to the output; any failure removes it.

Remote code: the base's own Python (``auto_map``) runs only with ``trust_remote_code=True`` from the
caller, never because a checkpoint's config asks for it (:mod:`lora_maml.load_trained`). Without it the
output carries none: no ``auto_map`` in its JSON files, no ``*.py`` (a base whose config names custom code
that transformers also implements natively is merged natively, and the output says so in a note).

Tolerances (:func:`tolerance`), on the max abs logit difference over the probe tokens, with ``scale`` =
max |reference logit|::

    tol(dtype) = max(1e-4, (8 * u(dtype) + 1e-5) * scale)

The ``1e-5 * scale`` term is fp32 summation-order noise between two equivalent forward passes (merged
``x @ (W + s B A)`` vs unmerged ``x @ W + s (x @ A) @ B``), ~170 fp32 ulps of the largest logit; the
1e-4 floor covers models whose logits are all near 0. Checks 1 and 3 compare equal weights (up to fp32
rounding) and use ``tol(fp32)`` ~ 1e-5 of the logit scale: a wrong LoRA scale, a lost layer, a missing
or misnamed tensor in the files fail. Check 2 uses ``tol(storage dtype)``: ``u`` is the unit roundoff
(bf16 2^-8, fp16 2^-11, fp32 2^-24); storing a merged weight moves it by at most ``u`` relatively, and
the logits move by a few ``u`` of their scale as many independent roundings add up (measured 1.8u on a
2-layer tiny Qwen3); 8u (bf16: ~3% of the logit scale) leaves headroom for a 36-layer model. Failing
check 2 means the storage dtype cannot hold this merge faithfully (e.g. a tiny adapter update rounds
away in bf16); ``atol`` replaces its tolerance.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_maml.atomic import atomic_dir, check_writable_dir
from lora_maml.data.math import make_prompt
from lora_maml.errors import LoraMamlError, write_failure
from lora_maml.load_trained import load_trained, resolve_model_path
from lora_maml.models import torch_dtype

log = logging.getLogger("lora_maml")

UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24, "fp64": 2.0**-53}
STORAGE_FACTOR = 8
COMPUTE_RTOL = 1e-5
ATOL_FLOOR = 1e-4
SAFETENSORS_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32", "fp64": "F64"}
DEFAULT_PROBE_TEXTS = (
    make_prompt("What is the sum of the first $10$ positive integers?"),
    make_prompt("Find all real $x$ such that $x^2 - 5x + 6 = 0$."),
)
PROBE_MAX_TOKENS = 256


class ExportError(LoraMamlError, RuntimeError):
    """The merge or the saved model failed verification, or the output cannot be written."""


def tolerance(storage_dtype: str, scale: float) -> float:
    """Allowed max abs logit difference for weights stored in ``storage_dtype`` (see the module docstring)."""
    return max(ATOL_FLOOR, (STORAGE_FACTOR * UNIT_ROUNDOFF[storage_dtype] + COMPUTE_RTOL) * scale)


def _compute_dtype(dtype: str | None) -> str:
    # Merge and verify in fp32; only an fp64 output is computed in fp64, so nothing is rounded twice.
    return "fp64" if dtype == "fp64" else "fp32"


# ----------------------------------------------------------------------------------------------
# Probe


def probe_batch(tokenizer, texts=None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` of ``texts`` as user turns of the chat template."""
    texts = list(DEFAULT_PROBE_TEXTS if texts is None else texts)
    if not texts:
        raise ValueError("probe_texts is empty: give at least one text (or None for the default prompts)")
    rows = []
    for text in texts:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROBE_MAX_TOKENS]
        if not ids:
            raise ValueError(f"probe text {text!r} encodes to no tokens")
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def probe_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(tokens, vocab)`` logits at the real (non-padding) probe tokens, on CPU in the compute dtype."""
    model.eval()
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
    return logits[batch["attention_mask"].to(device).bool()].cpu()


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ----------------------------------------------------------------------------------------------
# Checks


def embeddings_tied(model: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _ties_expected(model: nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False))


def _check_tied(model: nn.Module, where: str) -> None:
    if _ties_expected(model) and not embeddings_tied(model):
        raise ExportError(
            f"{where}: config.tie_word_embeddings=True but the output embedding is no longer the input embedding "
            "(did the adapter target lm_head / embed_tokens?)"
        )


def _output_embedding_name(model: nn.Module) -> str | None:
    out = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is out:
            return f"{name}.weight"
    return None


def _check_files(directory: Path, storage_dtype: str, tied_name: str | None) -> list[str]:
    """The saved tensors: all in ``storage_dtype``, no separate copy of a tied output embedding."""
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ExportError(f"{directory}: save_pretrained wrote no .safetensors file")
    wrong, keys = [], set()
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                keys.add(key)
                kind = f.get_slice(key).get_dtype()
                if kind.startswith(("F", "BF")) and kind != SAFETENSORS_DTYPES[storage_dtype]:
                    wrong.append(f"{key}: {kind}")
    if wrong:
        raise ExportError(f"{directory}: tensors not stored as {storage_dtype}: {wrong[:3]}")
    saved = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("dtype")
    if saved != str(torch_dtype(storage_dtype)).removeprefix("torch."):
        raise ExportError(f"{directory}/config.json: dtype={saved!r}, expected the storage dtype {storage_dtype}")
    if tied_name is not None and tied_name in keys:
        raise ExportError(f"{directory}: tied embeddings, yet {tied_name} was saved as a separate tensor")
    return sorted(p.name for p in directory.iterdir())


def _check_tokenizer(directory: Path, tokenizer, batch: dict[str, torch.Tensor], texts, trust_remote_code: bool) -> None:
    reloaded = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    if reloaded.chat_template != tokenizer.chat_template:
        raise ExportError(f"{directory}: the saved tokenizer's chat template differs from the source's")
    if not torch.equal(probe_batch(reloaded, texts)["input_ids"], batch["input_ids"]):
        raise ExportError(f"{directory}: the saved tokenizer encodes the probe texts differently")


# ----------------------------------------------------------------------------------------------
# Output directory


def _check_output(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output_dir {output_dir}: exists and is not empty (pass overwrite=True)")


def _check_not_a_source(output_dir: Path, sources: list[str | None]) -> None:
    """The output must not be, contain or lie inside anything the export reads (a run directory, an
    adapter, the base): replacing it would destroy the source."""
    out = output_dir.resolve()
    for source in sources:
        if source is None or not Path(source).exists():
            continue
        src = Path(source).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ValueError(
                f"output_dir {output_dir}: would replace or write inside {source}, which the export reads; "
                "choose an output directory outside it"
            )


# ----------------------------------------------------------------------------------------------
# Merge and save


def merge_and_save(
    model_path: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    dtype: str | None = None,
    probe_texts: list[str] | None = None,
    atol: float | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    trust_remote_code: bool = False,
) -> dict:
    """Merge ``model_path`` (anything :func:`load_trained` takes) and save it to ``output_dir``; verified.

    ``dtype`` is the storage dtype (default: the run's ``model.dtype`` or the base's saved dtype);
    ``probe_texts`` the user messages of the logit checks (default: two fixed MATH prompts); ``atol``
    replaces the tolerance of check 2 (the stored model vs base + adapter). ``output_dir`` must be
    absent or empty unless ``overwrite``. ``trust_remote_code`` lets the base's own code run (and be copied
    into the output); only the caller can allow it. Raises :class:`ExportError` when a check fails, leaving
    ``output_dir`` as it was. Returns the report: ``source, kind, adapter, step, base, output, dtype,
    compute_dtype, notes, probe_tokens, logit_scale, merge_max_abs_diff, merge_tolerance`` (LoRA only),
    ``tied_embeddings, max_abs_diff, tolerance`` (the output vs base + adapter), ``reload_max_abs_diff,
    reload_tolerance`` (from_pretrained of the output vs the merged model), ``files``.
    """
    output_dir = Path(output_dir)
    if dtype is not None:
        torch_dtype(dtype)
    if atol is not None and not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol={atol!r}: expected a finite number >= 0 (a NaN tolerance would fail every check)")
    _check_output(output_dir, overwrite)
    kind, source = resolve_model_path(model_path)
    # A checkpoint is its whole run directory: its other steps, 'latest' and metrics live there too.
    _check_not_a_source(output_dir, [str(model_path), base, str(Path(source).parent) if kind == "checkpoint" else source])
    check_writable_dir(output_dir.parent, "output_dir (its parent)")
    compute = _compute_dtype(dtype)
    loading = {"base": base, "device": device, "keep_quantization": False, "trust_remote_code": trust_remote_code}
    trained = load_trained(model_path, dtype=compute, **loading)
    storage = dtype or trained.native_dtype
    if _compute_dtype(storage) != compute:
        compute = _compute_dtype(storage)
        trained = load_trained(model_path, dtype=compute, **loading)
    _check_not_a_source(output_dir, [trained.source, trained.base])
    report: dict = {
        "source": trained.source,
        "kind": trained.kind,
        "adapter": trained.adapter,
        "step": trained.step,
        "base": trained.base,
        "output": str(output_dir),
        "dtype": storage,
        "compute_dtype": compute,
        "notes": [],
    }
    if trained.config is not None and trained.config.model.quantization is not None:
        note = (
            f"the run trained its adapter on a {trained.config.model.quantization}-quantised base; it is merged into "
            f"the unquantised base {trained.base} (in {compute}). The merged model is base + adapter, which differs "
            "from the quantised base + adapter of training by the quantisation error of the base."
        )
        log.warning("note: %s", note)
        report["notes"].append(note)

    batch = probe_batch(trained.tokenizer, probe_texts)
    reference = probe_logits(trained.model, batch)
    if not torch.isfinite(reference).all():
        raise ExportError(
            f"{model_path}: base + adapter gives non-finite logits on the probe texts: the model or adapter is corrupt "
            f"(e.g. a huge lora_alpha in adapter_config.json) or overflows in {compute}; nothing was written"
        )
    scale = float(reference.abs().max())
    report.update(probe_tokens=int(batch["attention_mask"].sum()), logit_scale=scale)

    model, tokenizer = trained.model, trained.tokenizer
    del trained  # its params would keep the unmerged LoRA weights alive
    if report["adapter"] == "lora":
        model = model.merge_and_unload(safe_merge=True)
        merge_diff = _max_abs_diff(probe_logits(model, batch), reference)
        merge_tol = tolerance(compute, scale)
        report.update(merge_max_abs_diff=merge_diff, merge_tolerance=merge_tol)
        if not merge_diff <= merge_tol:
            raise ExportError(
                f"{model_path}: merged {compute} logits differ from base + adapter by {merge_diff:.3g} "
                f"> tolerance {merge_tol:.3g}: the merge is wrong; nothing was written"
            )
    _check_tied(model, f"{model_path} after merging")
    tied = embeddings_tied(model)
    tied_name = _output_embedding_name(model) if tied else None
    model.requires_grad_(False)
    model.config.use_cache = True  # load_base turned the KV cache off for training; generation wants it
    # The weights rounded as they will be stored, computed in fp32: check 2 (rounding) compares them with
    # base + adapter, check 3 (files) requires the saved directory to reproduce them.
    _cast_parameters(model, storage)
    _cast_parameters(model, compute)
    stored = probe_logits(model, batch)
    diff = _max_abs_diff(stored, reference)
    tol = tolerance(storage, scale) if atol is None else float(atol)
    report.update(tied_embeddings=tied, max_abs_diff=diff, tolerance=tol)
    if not diff <= tol:
        # A wider storage dtype is the remedy only when a narrower one lost the merge.
        if UNIT_ROUNDOFF[storage] > UNIT_ROUNDOFF["fp32"]:
            advice = "use dtype='fp32', or atol= to accept it"
        elif atol is not None:
            advice = "a larger atol= accepts it"
        else:
            advice = f"more than {storage} rounding explains (is the adapter's update out of scale?); atol= accepts it"
        raise ExportError(
            f"{model_path}: stored as {storage}, the merged model differs from base + adapter by {diff:.3g} > "
            f"tolerance {tol:.3g} (logit scale {scale:.3g}); {advice}; nothing was written"
        )
    _cast_parameters(model, storage)  # exact: the values are representable in it already

    with atomic_dir(output_dir) as tmp:
        try:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
        except (OSError, RuntimeError, SafetensorError) as err:  # e.g. a full disk
            raise ExportError(write_failure(output_dir, err) + "; nothing was written") from None
        del model
        if not trust_remote_code:
            dropped = _drop_remote_code(tmp)
            if dropped:
                note = (
                    f"the base names its own code ({', '.join(dropped)}); it was not run (trust_remote_code=False) "
                    "and the merged model does not carry it: it loads with transformers' native implementation"
                )
                log.warning("note: %s", note)
                report["notes"].append(note)
        files = _check_files(tmp, storage, tied_name)
        _check_tokenizer(tmp, tokenizer, batch, probe_texts, trust_remote_code)
        reload_diff = _max_abs_diff(_reload_logits(tmp, batch, compute, device, trust_remote_code, tied), stored)
        reload_tol = tolerance(compute, scale)
        report.update(reload_max_abs_diff=reload_diff, reload_tolerance=reload_tol, files=files)
        if not reload_diff <= reload_tol:
            raise ExportError(
                f"{model_path}: the saved model, reloaded with from_pretrained, differs from the merged model by "
                f"{reload_diff:.3g} > tolerance {reload_tol:.3g}: the files do not hold its weights; "
                "nothing was written"
            )
    log.info(
        "merged %s -> %s (%s): max |logit diff| vs base + adapter %.3g <= %.3g", report["source"], output_dir,
        storage, diff, tol,
    )
    return report


def _cast_parameters(model: nn.Module, dtype: str) -> None:
    """Cast the weights only: ``model.to`` would also round buffers such as RoPE's ``inv_freq``, which are
    not saved and which ``from_pretrained`` recomputes in fp32."""
    for p in model.parameters():  # unique parameters: a tied embedding stays one tensor
        p.data = p.data.to(torch_dtype(dtype))


def _drop_remote_code(directory: Path) -> list[str]:
    """Remove what would make ``directory`` run code on load (``auto_map`` in its JSON files, ``*.py``);
    returns what was removed, as ``file:key`` / file names."""
    dropped = []
    for path in sorted(directory.iterdir()):
        if path.suffix == ".py":
            path.unlink()
            dropped.append(path.name)
        elif path.name.endswith("config.json") and path.is_file():  # config, tokenizer_config, processor_config...
            try:
                content = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                continue  # not a config (save_pretrained writes valid JSON; _check_files reads what matters)
            if isinstance(content, dict) and "auto_map" in content:
                del content["auto_map"]
                path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                dropped.append(f"{path.name}:auto_map")
    return dropped


def _reload_logits(directory: Path, batch, compute: str, device, trust_remote_code: bool, tied: bool) -> torch.Tensor:
    """Load the saved directory as users will (``from_pretrained``), computing in ``compute``; its probe logits."""
    reloaded = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=torch_dtype(compute),
        device_map=None if device is None else {"": torch.device(device)},
        trust_remote_code=trust_remote_code,
    )
    if tied and not embeddings_tied(reloaded):
        raise ExportError(f"{directory}: reloaded with from_pretrained, the embeddings are no longer tied")
    return probe_logits(reloaded, batch)
