"""Load whatever evaluation and export take as a model path (``--model-path``) into a model with adaptable parameters.

Accepted, checked in this order:

* a run checkpoint ``maml_checkpoint_step_N.pt`` (FOMAML or SFT) - the run's config is rebuilt from
  the file, the base loaded with ``load_base`` (+ ``add_lora`` in LoRA mode) and the saved
  ``model_state_dict`` copied into the adaptable parameters, names checked strictly;
* a checkpoint's ``step_N`` directory - the same, through its sibling ``.pt``;
* a run directory (``trainer.default_local_dir``) - its newest complete checkpoint: the one
  ``latest`` names, else the newest complete one before it (as resuming picks it);
* a PEFT adapter directory (``adapter_config.json``) or hub id - the base is the adapter's
  ``base_model_name_or_path`` unless ``base`` overrides it; LoRA weights stay fp32;
* a model directory (``config.json``) or hub id - a base or merged model. A fresh LoRA (``lora`` or
  the default ``LoraConfig``) is added with B = 0, which leaves the function unchanged, so a base
  model is adapted exactly like a trained adapter.

What a checkpoint or adapter brings is checked before anything uses it: every saved weight finite (a NaN
would score as accuracy 0, not as an error), and an adapter's ``adapter_config.json`` covering exactly the
LoRA weights its file holds (peft would silently drop weights of modules ``target_modules`` does not name,
and leave a target without weights at its fresh initialisation); errors name the file and the tensors.
A run checkpoint's base is compared with the fingerprint it recorded (:mod:`lora_maml.inputs`): a warning
when it is not the base it was trained on (``Trained.inputs`` keeps the fingerprint for the data check).

Remote code (the Python a model directory ships, named by ``auto_map`` in its config) runs only when
the caller passes ``trust_remote_code=True`` (a program: its ``--trust-remote-code`` flag, for that run).
The ``model.trust_remote_code`` a checkpoint stored in its config is ignored: a file someone hands you
must not be able to switch it on.

The returned :class:`Trained` holds the module and its adaptable parameters. Evaluation adapts with
fast weights (``lora_maml.meta.fast_weights``) and must not write into ``Trained.params``: several
adaptations start from the same loaded weights.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from pydantic import ValidationError
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase

from lora_maml.config import Config, LoraConfig, ModelConfig
from lora_maml.errors import LoraMamlError
from lora_maml.models import (
    DTYPES,
    add_lora,
    adapted_parameters,
    check_model_files,
    gradient_checkpointing_on,
    load_base,
    load_tokenizer,
    torch_dtype,
)
from lora_maml import checkpoint as ckpt
from lora_maml import inputs

log = logging.getLogger("lora_maml")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_ADAPTER_WEIGHTS = "adapter_model.bin"
MODEL_CONFIG = "config.json"
EXPECTED = (
    "expected a run checkpoint (maml_checkpoint_step_N.pt), its step_N directory, a run directory "
    "(with a 'latest' file), a PEFT adapter directory (adapter_config.json) or a model directory "
    "(config.json) / hub id"
)
# A hub id is "name" or "owner/name"; anything else that does not exist is a missing local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# get_peft_model_state_dict drops the adapter name: "...q_proj.lora_A.weight" for "...lora_A.default.weight".
_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")
_FRESH_LORA_SEED = 0


class LoadTrainedError(LoraMamlError, ValueError):
    """A model path that is none of the accepted kinds, or inconsistent options; names the path."""


@dataclass
class Trained:
    """A loaded model and what was loaded.

    ``params`` are the adaptable parameters by their names in ``model`` (``adapted_parameters``):
    the LoRA matrices (``adapter == "lora"``) or every parameter (``"full"``). ``config`` is the
    training run's config for ``kind == "checkpoint"``, else None. ``base`` is the base model the
    weights sit on (hub id or directory), ``native_dtype`` the dtype the weights were trained or
    stored in (the run's ``model.dtype`` or the base's saved dtype), whatever ``dtype`` they were
    loaded in. The model is in eval mode.
    """

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    params: dict[str, nn.Parameter]
    config: Config | None
    kind: str
    adapter: str
    source: str
    base: str = ""
    native_dtype: str = "fp32"
    step: int | None = None
    inner_lrs: dict[str, float] | None = None  # Meta-SGD's learned rates by name in ``params``; else None
    trust_remote_code: bool = False  # what the caller allowed (never what a checkpoint stored)
    # A checkpoint's fingerprint of its data and base (lora_maml.inputs); None for the other kinds and old checkpoints.
    inputs: dict | None = None


# ----------------------------------------------------------------------------------------------
# What a path names


class ModelPath(NamedTuple):
    """A classified model path (:func:`resolve_model_path`); ``str()`` gives ``source``. Passing it
    on (to :func:`load_trained`, or back to :func:`resolve_model_path`) does not classify it again."""

    kind: str
    source: str

    def __str__(self) -> str:
        return self.source


def resolve_model_path(path: str | Path | ModelPath) -> ModelPath:
    """``(kind, source)`` of a model path, loading no weights.

    ``kind`` is ``checkpoint`` (``source`` = the ``.pt``), ``adapter`` (the adapter directory) or
    ``model`` (the model directory or hub id). Raises :class:`FileNotFoundError` for a missing path,
    :class:`LoadTrainedError` for one that is none of these, ``CheckpointError`` for a run directory
    without a complete checkpoint.
    """
    if isinstance(path, ModelPath):
        return path
    text = str(path)
    p = Path(text).expanduser()
    if p.is_file():
        if ckpt.PT_PATTERN.match(p.name):
            return ModelPath("checkpoint", str(p))
        raise LoadTrainedError(f"{p}: a file, but not a run checkpoint; {EXPECTED}")
    if p.is_dir():
        m = ckpt.DIR_PATTERN.match(p.name)
        step_files = (ckpt.MANIFEST_FILE, ckpt.TRAINER_STATE_FILE)
        if m and (ckpt.pt_path(p.parent, int(m.group(1))).exists() or any((p / f).exists() for f in step_files)):
            # load_checkpoint reports what is missing when the step is incomplete.
            return ModelPath("checkpoint", str(ckpt.pt_path(p.parent, int(m.group(1)))))
        if (p / ckpt.LATEST_FILE).exists() or any(ckpt.PT_PATTERN.match(e.name) for e in p.iterdir()):
            found = ckpt.find_resume_checkpoint(SimpleNamespace(resume_mode="auto", default_local_dir=str(p)))
            if found is None:
                raise ckpt.CheckpointError(
                    f"{p}: a run directory without a complete checkpoint (see the warnings above)"
                )
            return ModelPath("checkpoint", str(found))
        if (p / ADAPTER_CONFIG).is_file():
            return ModelPath("adapter", str(p))
        if (p / MODEL_CONFIG).is_file():
            return ModelPath("model", str(p))
        shown = sorted(e.name for e in p.iterdir())[:8]
        raise LoadTrainedError(f"{p}: a directory holding none of these ({shown or 'empty'}); {EXPECTED}")
    if text.endswith(".pt") or not _HUB_ID.fullmatch(text):
        raise FileNotFoundError(f"{text}: no such file or directory; {EXPECTED}")
    from transformers.utils import cached_file

    # A hub id (local cache, or the hub when online): an adapter repo has adapter_config.json.
    for filename, kind in ((ADAPTER_CONFIG, "adapter"), (MODEL_CONFIG, "model")):
        try:
            found = cached_file(
                text,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError as err:  # e.g. no such repository
            raise FileNotFoundError(f"{text}: no such file or directory, nor a hub repository: {err}") from err
        if found is not None:
            return ModelPath(kind, str(Path(found).parent) if kind == "adapter" else text)
    raise FileNotFoundError(
        f"{text}: no such file or directory, nor a hub model or adapter in the local cache (or on the hub when "
        f"online); {EXPECTED}"
    )


def stored_dtype(source: str, *, trust_remote_code: bool = False) -> str:
    """The dtype name (``bf16``...) a model directory / hub id stores its weights in; ``fp32`` if unrecorded."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(
            f"{source}: cannot read its config.json (expected a model directory or a hub id in the local cache): {err}"
        ) from err
    except ValueError as err:
        if _remote_code_refused(err, trust_remote_code):
            raise _remote_code_error(source, source) from None
        raise
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    names = {d: name for name, d in DTYPES.items()}
    return names.get(value, "fp32")  # transformers loads a config without a dtype in fp32


def _remote_code_refused(err: BaseException, trust_remote_code: bool) -> bool:
    """Whether ``err`` is transformers refusing to run a model's own code (which only the caller may allow)."""
    return not trust_remote_code and "trust_remote_code" in str(err)


def _remote_code_error(where: str, source: str, stored: bool = False) -> LoadTrainedError:
    ignored = " (the model.trust_remote_code=true stored in the checkpoint's config is ignored)" if stored else ""
    return LoadTrainedError(
        f"{where}: the model {source} ships its own Python code (auto_map in its config), which is not run "
        f"unless the caller passes trust_remote_code=True{ignored}"
    )


def read_run_config(pt: str | Path, saved: dict | None = None) -> Config:
    """The training run's :class:`Config` stored in a checkpoint ``.pt``."""
    saved = ckpt.load_checkpoint(pt) if saved is None else saved
    try:
        return Config.model_validate(saved["config"])
    except ValidationError as err:
        raise ckpt.CheckpointError(f"{pt}: its 'config' does not fit this version's Config schema: {err}") from None


# ----------------------------------------------------------------------------------------------
# Loading


def load_trained(
    path: str | Path | ModelPath,
    *,
    base: str | None = None,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
    keep_quantization: bool = True,
    trust_remote_code: bool = False,
) -> Trained:
    """Load ``path`` (see the module docstring) into a :class:`Trained`.

    ``base`` replaces the base model the weights were trained on (a run's ``model.partial_pretrain``,
    an adapter's ``base_model_name_or_path``); it names a transformers-format model, so a run's
    ``model.gguf_file`` is dropped with it. ``dtype`` (bf16|fp16|fp32|fp64) replaces the run's
    ``model.dtype`` / the base's saved dtype, e.g. to evaluate a bf16-trained adapter in fp32 on CPU.
    ``device`` loads the weights straight onto that device. ``lora`` is the fresh adapter of a plain
    model (it is an error for the other kinds, whose LoRA shape is fixed by what was saved).
    ``keep_quantization=False`` loads a run's nf4 base dense (export merges into the dense base).
    ``trust_remote_code`` lets transformers run the Python code a model directory ships; only the caller
    can allow it (a checkpoint's stored ``model.trust_remote_code`` is ignored, see the module docstring).
    """
    if dtype is not None:
        torch_dtype(dtype)
    kind, source = resolve_model_path(path)
    if lora is not None and kind != "model":
        raise LoadTrainedError(
            f"{path}: lora= sets the fresh adapter of a plain model; this {kind} brings its own LoRA configuration"
        )
    if base is not None and kind == "model":
        raise LoadTrainedError(f"{path}: base= replaces the base of a checkpoint or adapter; this is a model itself")
    device_map = None if device is None else {"": torch.device(device)}
    options = {"enable_gradient_checkpointing": gradient_checkpointing, "trust_remote_code": trust_remote_code}
    if kind == "checkpoint":
        trained = _load_checkpoint(source, base, dtype, device_map, options, keep_quantization)
    elif kind == "adapter":
        trained = _load_adapter(source, base, dtype, device_map, options)
    else:
        trained = _load_model(source, dtype, device_map, options, lora)
    trained.model.eval()
    trained.trust_remote_code = trust_remote_code
    return trained


def load_trained_tokenizer(path: str | Path | ModelPath, *, base: str | None = None, trust_remote_code: bool = False):
    """The tokenizer :func:`load_trained` gives ``path`` (with ``base``), its files checked, without loading
    any weight: for checks that need it before the slow loading (e.g. that a length cap leaves a scored
    problem something to score)."""
    kind, source = resolve_model_path(path)
    if kind == "adapter":
        own = _adapter_tokenizer(source, trust_remote_code)
        return own if own is not None else load_tokenizer(_adapter_base(source, base), trust_remote_code=trust_remote_code)
    if kind == "checkpoint":
        model_cfg = read_run_config(source).model
        return load_tokenizer(base or model_cfg.partial_pretrain, gguf_file=None if base else model_cfg.gguf_file,
                              trust_remote_code=trust_remote_code)
    return load_tokenizer(source, trust_remote_code=trust_remote_code)


def _model_config(where: str, **values) -> ModelConfig:
    try:
        return ModelConfig.model_validate(values)
    except ValidationError as err:
        raise LoadTrainedError(f"{where}: invalid model options: {err}") from None


def _load_base(model_cfg: ModelConfig, device_map, where: str, hint: str, stored_trust: bool = False):
    try:
        return load_base(model_cfg, device_map=device_map)
    except OSError as err:
        raise FileNotFoundError(f"{where}: its base model could not be loaded ({hint}): {err}") from err
    except ValueError as err:
        if _remote_code_refused(err, model_cfg.trust_remote_code):
            raise _remote_code_error(where, model_cfg.partial_pretrain, stored_trust) from None
        raise


def _load_checkpoint(pt: str, base, dtype, device_map, options, keep_quantization) -> Trained:
    saved = ckpt.load_checkpoint(pt)
    cfg = read_run_config(pt, saved)
    values = cfg.model.model_dump()
    # options carry the caller's trust_remote_code: the one the checkpoint stored never counts.
    values.update(options, build_tiny_if_missing=False)
    stored_trust = cfg.model.trust_remote_code and not options["trust_remote_code"]
    if stored_trust:
        log.warning("%s: its config sets model.trust_remote_code=true; ignored (only the caller can allow remote code)", pt)
    cfg.model.trust_remote_code = options["trust_remote_code"]  # what Trained.config reports is what was allowed
    if base is not None:
        values.update(partial_pretrain=base, gguf_file=None)
    if dtype is not None:
        values["dtype"] = dtype
    if not keep_quantization:
        values["quantization"] = None
    model_cfg = _model_config(pt, **values)
    hint = f"model.partial_pretrain={model_cfg.partial_pretrain!r} of its config; pass base= to use another path"
    model, tokenizer = _load_base(model_cfg, device_map, pt, hint, stored_trust)
    if cfg.meta.adapter == "lora":
        model = add_lora(model, cfg.model.lora)
    params = adapted_parameters(model, cfg.meta.adapter)
    copy_saved_weights(params, saved["model_state_dict"], where=f"{pt} (meta.adapter={cfg.meta.adapter})")
    check_finite_weights(params, pt)
    recorded = inputs.recorded_inputs(saved["trainer_state"], pt)
    inputs.warn_if_base_changed(pt, recorded, model_cfg.partial_pretrain, model_cfg.gguf_file)
    return Trained(
        model=model, tokenizer=tokenizer, params=params, config=cfg, kind="checkpoint", adapter=cfg.meta.adapter,
        source=str(pt), base=model_cfg.partial_pretrain, native_dtype=cfg.model.dtype, step=int(saved["step"]),
        inner_lrs=ckpt.load_inner_lrs(saved["pretrained_dir"], params), inputs=recorded,
    )


def copy_saved_weights(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy ``saved`` into ``params`` (names as in ``params`` or PEFT state-dict names); strict."""
    by_peft_name = {_ADAPTER_NAME.sub(r".\1", name): name for name in params}
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in saved.items():
        name = key if key in params else by_peft_name.get(key)
        if name is None:
            unexpected.append(key)
        else:
            mapped[name] = value
    missing = sorted(set(params) - set(mapped))
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"{where}: model_state_dict does not match the model rebuilt from its config "
            f"({len(saved)} saved, {len(params)} expected); missing {missing[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}. "
            "Was it trained on another base (model.partial_pretrain / base=) or with another model.lora?"
        )
    with torch.no_grad():
        for name, p in params.items():
            value = mapped[name]
            if value.shape != p.shape:
                raise ckpt.CheckpointError(
                    f"{where}: model_state_dict[{name!r}] has shape {tuple(value.shape)}, the model rebuilt "
                    f"from its config expects {tuple(p.shape)}"
                )
            p.copy_(value)


def check_finite_weights(params: dict[str, nn.Parameter], where: str | Path, *, names: dict[str, str] | None = None) -> None:
    """Raise :class:`LoadTrainedError` naming ``where`` (the file) and the tensors holding NaN or inf
    (``names``: parameter name -> the name the file uses, when they differ)."""
    bad = []
    for name, p in params.items():
        count = int((~torch.isfinite(p.detach())).sum())
        if count:
            bad.append(f"{(names or {}).get(name, name)} ({count} of {p.numel()} values)")
    if bad:
        raise LoadTrainedError(
            f"{where}: {len(bad)} saved tensor(s) hold non-finite values (NaN or inf), e.g. {'; '.join(bad[:3])}: "
            "the file is damaged or the run that wrote it diverged"
        )


def _adapter_keys(weights: Path) -> set[str]:
    """The tensor names in an adapter's weights file (safetensors: its header only; a .bin: loaded safely)."""
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), framework="pt") as f:
            return set(f.keys())
    return set(torch.load(weights, map_location="cpu", weights_only=True))


def check_adapter_keys(weights: Path, model: nn.Module, targets) -> None:
    """Raise :class:`LoadTrainedError` when the LoRA tensors in an adapter's ``weights`` file are not exactly
    those the PeftModel ``model`` built from its ``adapter_config.json`` (``targets``: its target_modules)
    would save, naming the keys on either side: peft drops the uncovered ones, and keeps a target without
    weights at its fresh (B = 0) initialisation, both without a word."""
    from peft import get_peft_model_state_dict

    saved = {key for key in _adapter_keys(weights) if ".lora_" in key}
    expected = {key for key in get_peft_model_state_dict(model, save_embedding_layers=False) if ".lora_" in key}
    uncovered, missing = sorted(saved - expected), sorted(expected - saved)
    if not (uncovered or missing):
        return

    def modules(keys: list[str]) -> list[str]:
        return sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys})

    problems = []
    if uncovered:
        problems.append(f"{len(uncovered)} tensors of modules {modules(uncovered)} that target_modules does not cover, "
                        f"e.g. {uncovered[:2]}")
    if missing:
        problems.append(f"no tensors for {len(missing)} LoRA weights of target modules {modules(missing)}, e.g. "
                        f"{missing[:2]}")
    raise LoadTrainedError(
        f"{weights}: does not match {weights.parent / ADAPTER_CONFIG} (target_modules={targets!r}): "
        + "; ".join(problems) + ". target_modules must name exactly the modules the file holds LoRA weights for"
    )


def _load_adapter(directory: str, base, dtype, device_map, options) -> Trained:
    from peft import PeftModel
    from safetensors import SafetensorError

    base_id = _adapter_base(directory, base)
    check_adapter_files(directory)
    # An adapter that ships a tokenizer is meant with it; checked, like the base's, before any weight loads.
    own_tokenizer = _adapter_tokenizer(directory, options["trust_remote_code"])
    native = stored_dtype(base_id, trust_remote_code=options["trust_remote_code"])
    model_cfg = _model_config(directory, partial_pretrain=base_id, dtype=dtype or native, **options)
    model, tokenizer = _load_base(
        model_cfg, device_map, directory, f"base_model_name_or_path={base_id!r}; pass base= to use another path"
    )
    try:
        model = PeftModel.from_pretrained(model, directory, is_trainable=True, autocast_adapter_dtype=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # e.g. a truncated weights file
        raise LoadTrainedError(
            f"{Path(directory) / ADAPTER_WEIGHTS}: cannot load the adapter onto {base_id}: "
            f"{' '.join(str(err).split())[:500]}"
        ) from None
    if gradient_checkpointing_on(model):
        model.get_base_model().disable_input_require_grads()  # as add_lora: not needed by non-reentrant checkpointing
    params = adapted_parameters(model, "lora")
    low = [n for n, p in params.items() if p.dtype in (torch.float16, torch.bfloat16)]
    if low:
        raise RuntimeError(
            f"{directory}: LoRA weights {low[:3]} were not upcast to fp32 by peft (autocast_adapter_dtype)"
        )
    weights = Path(directory) / ADAPTER_WEIGHTS  # the only adapter file accepted (checked before the base loaded)
    targets = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("target_modules")
    check_adapter_keys(weights, model, targets)
    check_finite_weights(params, weights, names={name: _ADAPTER_NAME.sub(r".\1", name) for name in params})
    return Trained(
        model=model, tokenizer=tokenizer if own_tokenizer is None else own_tokenizer, params=params, config=None,
        kind="adapter", adapter="lora",
        source=directory, base=base_id, native_dtype=native, inner_lrs=ckpt.load_inner_lrs(directory, params),
    )


def _adapter_base(directory: str, base: str | None) -> str:
    """The base model of the PEFT adapter ``directory``: ``base``, else its ``base_model_name_or_path``."""
    config_path = Path(directory) / ADAPTER_CONFIG
    try:
        adapter_cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoadTrainedError(f"{config_path}: unreadable: {err}") from None
    if adapter_cfg.get("peft_type") != "LORA":
        raise LoadTrainedError(f"{config_path}: peft_type={adapter_cfg.get('peft_type')!r}, expected 'LORA'")
    base_id = base or adapter_cfg.get("base_model_name_or_path")
    if not base_id:
        raise LoadTrainedError(f"{config_path}: no base_model_name_or_path; pass base= to name the base model")
    return base_id


def check_adapter_files(directory: str | Path) -> None:
    """Raise :class:`LoadTrainedError` unless the PEFT adapter ``directory`` holds its weights as safetensors:
    a pickled ``adapter_model.bin`` is refused, never unpickled (unpickling a file can run code), and the
    files' headers are checked (:func:`lora_maml.models.check_model_files`: a truncated one is named)."""
    directory = Path(directory)
    pickled = directory / PICKLED_ADAPTER_WEIGHTS
    if not (directory / ADAPTER_WEIGHTS).is_file() and pickled.is_file():
        raise LoadTrainedError(
            f"{pickled}: a pickled adapter; only safetensors adapters ({ADAPTER_WEIGHTS}) are accepted, because "
            "unpickling a file can run code. Convert it where you trust it, e.g. PeftModel.from_pretrained(...)"
            ".save_pretrained(dir, safe_serialization=True)"
        )
    check_model_files(directory)


def _adapter_tokenizer(directory: str, trust_remote_code: bool):
    if not (Path(directory) / "tokenizer_config.json").is_file():
        return None
    return load_tokenizer(directory, trust_remote_code=trust_remote_code)


def _load_model(source: str, dtype, device_map, options, lora: LoraConfig | None) -> Trained:
    native = stored_dtype(source, trust_remote_code=options["trust_remote_code"])
    model_cfg = _model_config(source, partial_pretrain=source, dtype=dtype or native, **options)
    model, tokenizer = _load_base(model_cfg, device_map, source, "a model directory or a hub id in the local cache")
    # LoRA's A is random: a fixed seed makes repeated loads identical, without touching the caller's RNG.
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(_FRESH_LORA_SEED)
        model = add_lora(model, lora or LoraConfig())
    params = adapted_parameters(model, "lora")
    return Trained(
        model=model, tokenizer=tokenizer, params=params, config=None, kind="model", adapter="lora",
        source=source, base=source, native_dtype=native,
    )
