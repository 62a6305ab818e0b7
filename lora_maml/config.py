"""The run configuration: a typed schema, YAML loading and dotted command-line overrides.

Every recipe reads one YAML file (``recipes/configs/*.yaml``) into :class:`Config`. Unknown keys,
wrong types and impossible values are rejected with a message naming the dotted key, so a typo such
as ``meta.inner_lr_`` fails at start-up instead of silently training with a default.

Overrides use the dotted key names of the YAML file: ``meta.inner_lr=5e-5 trainer.total_steps=10``.
Values are parsed as YAML, so ``trainer.logger=[console,jsonl]`` and ``model.quantization=null`` work.

Loading is bounded: a file over 1 MiB, YAML whose aliases expand to more than 100,000 values (nested
aliases, a "billion laughs") or that refers to itself is refused before validation; errors quote at most
a few hundred characters of what they got.
"""

from __future__ import annotations

import copy
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_maml.data.records import absolute_source, is_records_source
from lora_maml.errors import LoraMamlError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB
MAX_CONFIG_VALUES = 100_000  # values (keys, items, scalars) once aliases are expanded; a config holds hundreds
MAX_SHOWN_CHARS = 200  # of an input an error message quotes
MAX_SHOWN_ERRORS = 20  # invalid keys listed in one message
# The least data.max_length (and an evaluation's --max-length): ChatML's markers of a user turn and of the
# assistant's header alone take 8 tokens, so a shorter cap cut on the right never reaches a response token,
# whatever the prompt (what a longer one leaves is checked against the records: lora_maml.eval.few_shot).
MIN_MAX_LENGTH = 8


class ConfigError(LoraMamlError, ValueError):
    """A config file or override that does not fit the schema; the message names the key."""

    exit_code = 2


class _Section(BaseModel):
    # extra="forbid" turns typos into errors; validate_assignment keeps programmatic edits checked.
    # allow_inf_nan=False: every rate, beta, epsilon and scale must be a finite number (an infinite
    # meta.outer_lr would turn every weight into NaN after one step).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )


class FSDPConfig(_Section):
    enabled: bool = False
    cpu_offload: bool = False
    # None: FSDP2's own default (decoder layers reshard, the root stays gathered until its backward).
    reshard_after_forward: bool | None = True


class ModelConfig(_Section):
    partial_pretrain: str = "Qwen/Qwen3-4B-Instruct-2507"
    gguf_file: str | None = None
    dtype: Literal["bf16", "fp16", "fp32", "fp64"] = "bf16"
    quantization: Literal["nf4"] | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    enable_gradient_checkpointing: bool = True
    # Label positions per chunk of the chunked cross-entropy (lora_maml.loss); None: full logits.
    loss_chunk_size: int | None = Field(None, ge=1)
    # torch.compile the decoder body for training (lora_maml.models.compile_decoder, by the recipe).
    compile: bool = False
    trust_remote_code: bool = False
    build_tiny_if_missing: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    fsdp_config: FSDPConfig = Field(default_factory=FSDPConfig)

    @model_validator(mode="after")
    def _options_without_fsdp(self) -> "ModelConfig":
        if self.loss_chunk_size is not None and self.fsdp_config.enabled:
            # The chunked loss calls the decoder body and the LM head apart, outside the root module's
            # forward, whose FSDP hooks gather the (sharded) embedding, final norm and LM head.
            raise ValueError(
                "loss_chunk_size with fsdp_config.enabled=true is not supported (the chunked loss bypasses "
                "the root FSDP unit that gathers the LM head): set model.loss_chunk_size=null"
            )
        if self.compile and self.fsdp_config.enabled:
            raise ValueError(
                "compile=true with fsdp_config.enabled=true is not supported (untested): set model.compile=false"
            )
        return self


class DataConfig(_Section):
    data_dir: str = "./data/math_meta"
    source: str = "EleutherAI/hendrycks_math"
    support_ratio: float = Field(0.30, gt=0, lt=1)
    query_ratio: float = Field(0.40, gt=0, lt=1)
    tasks: list[str] | None = Field(None, min_length=1)  # null: every meta-training task
    max_length: int = Field(2048, ge=MIN_MAX_LENGTH)
    truncation: Literal["error", "left", "right"] = "right"
    packing: bool = True

    @model_validator(mode="after")
    def _ratios_leave_a_test_split(self) -> "DataConfig":
        if self.support_ratio + self.query_ratio >= 1:
            raise ValueError(
                f"support_ratio + query_ratio must be < 1 to leave a test split, "
                f"got {self.support_ratio} + {self.query_ratio}"
            )
        if self.tasks is not None:
            from lora_maml.data import SUBJECTS, TASK_NAME_RULE, is_task_name
            from lora_maml.data.rules import is_rules_source, task_name

            if is_rules_source(self.source):  # the family's tasks are code_000, code_001, ...
                unknown = sorted(t for t in self.tasks if not re.fullmatch(r"code_\d{3,}", t))
                expected = f"names like {task_name(0)}"
            elif is_records_source(self.source):  # the user's own names, checked against the prepared tasks later
                unknown = sorted(t for t in self.tasks if not is_task_name(t))
                expected = f"task names ({TASK_NAME_RULE})"
            else:
                unknown = sorted(set(self.tasks) - set(SUBJECTS))
                expected = f"a subset of {list(SUBJECTS)}"
            if unknown:
                raise ValueError(f"tasks: unknown {unknown}; expected {expected}")
        return self


# Inner-loop defaults by meta.adapter, then by (adapter, inner_optimizer) for the rate: what
# benchmarks/calibrate_inner_lr.py measured on SmolLM2-135M-Instruct (docs/performance.md, "Inner-loop calibration").
# A LoRA inner loop needs a far larger SGD rate than full fine-tuning: with B = 0 at the start, one SGD
# step moves the support loss by ~0.13 × lr, so the guide's 1e-4 (tuned for full FOMAML) does nothing.
DEFAULT_INNER_OPTIMIZER = {"lora": "adam", "full": "sgd"}
DEFAULT_INNER_LR = {("lora", "sgd"): 0.3, ("lora", "adam"): 3e-4, ("full", "sgd"): 1e-2, ("full", "adam"): 1e-5}


class MetaConfig(_Section):
    algorithm: Literal["fomaml", "maml", "reptile"] = "fomaml"
    adapter: Literal["lora", "full"] = "lora"
    # None: the calibrated default of the adapter (DEFAULT_INNER_OPTIMIZER, DEFAULT_INNER_LR), filled in
    # at validation so the saved config states the value used.
    inner_optimizer: Literal["sgd", "adam"] | None = None
    inner_lr: float | None = Field(None, gt=0)
    learn_inner_lr: bool = False
    inner_lr_lr: float = Field(1e-2, gt=0)
    num_inner_steps: int = Field(5, ge=0)
    inner_batch_size: int = Field(4, ge=1)
    outer_lr: float = Field(3e-5, gt=0)
    meta_batch_size: int = Field(4, ge=1)
    query_batch_size: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _inner_loop_defaults(self) -> "MetaConfig":
        if self.inner_optimizer is None:
            self.inner_optimizer = DEFAULT_INNER_OPTIMIZER[self.adapter]
        if self.inner_lr is None:
            self.inner_lr = DEFAULT_INNER_LR[(self.adapter, self.inner_optimizer)]
        if self.learn_inner_lr and self.algorithm == "reptile":
            raise ValueError("learn_inner_lr (Meta-SGD) needs algorithm fomaml or maml: Reptile has no query gradient")
        return self


class SFTConfig(_Section):
    """The SFT baseline's own settings (``recipes/sft_math.py``); it shares model, data and optim."""

    batch_size: int = Field(16, ge=1)
    # Sequences per forward/backward (they bound the memory; the step's gradient does not depend on them)
    # and AdamW's learning rate. None: meta.query_batch_size and meta.outer_lr, filled in at validation
    # (Config._sft_defaults): what SFT used before these keys existed, so an older run's config keeps
    # its meaning.
    micro_batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    match_tokens_of: str | None = None
    # MetaICL (Min et al., 2022): > 0 puts k ~ uniform 0..icl_max_shots solved examples of the same task
    # before every training example's prompt (episodes.MixedBatchSampler.shots); 0 is plain SFT.
    icl_max_shots: int = Field(0, ge=0)


class OptimConfig(_Section):
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, gt=0)
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps_ratio: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        for beta in self.betas:
            if not 0 <= beta < 1:
                raise ValueError(f"betas must both lie in [0, 1), got {list(self.betas)}")
        return self


class TrainerConfig(_Section):
    seed: int = 42
    total_steps: int = Field(5000, ge=1)
    save_freq: int = Field(500, ge=1)
    test_freq: int = Field(100, ge=1)
    log_freq: int = Field(1, ge=1)
    project_name: str = "lora_maml"
    experiment_name: str = "fomaml_qwen3_4b_math"
    logger: list[Literal["console", "jsonl", "wandb", "tensorboard"]] = Field(
        default_factory=lambda: ["console", "jsonl", "wandb"]
    )
    # headline: the guide's few numbers per logging step; all: every metric (per task too).
    console_metrics: Literal["headline", "all"] = "headline"
    default_local_dir: str = "./outputs/fomaml_qwen3_4b_math"
    resume_mode: Literal["auto", "disable", "path"] = "auto"
    resume_from_path: str | None = None
    overwrite: bool = False
    max_ckpt_to_keep: int | None = Field(3, ge=1)
    max_consecutive_nonfinite: int = Field(5, ge=1)
    eval_num_support: int = Field(8, ge=1)
    eval_num_test: int = Field(16, ge=1)
    eval_max_tasks: int = Field(16, ge=1)
    # Resume although the data or the base model changed since the checkpoint (lora_maml.inputs): warn only.
    allow_changed_inputs: bool = False

    @field_validator("logger", mode="before")
    @classmethod
    def _one_logger_is_a_list(cls, value: Any) -> Any:
        # ``trainer.logger=jsonl`` means [jsonl], as a user would expect.
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _resume_path_given(self) -> "TrainerConfig":
        if self.resume_mode == "path" and not self.resume_from_path:
            raise ValueError("resume_mode=path needs trainer.resume_from_path")
        return self


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.meta.algorithm == "maml":
            # Second-order gradients need the graph of the inner loop: no recomputation, and an
            # attention kernel with a double backward (CPU SDPA has none).
            if self.meta.adapter != "lora":
                raise ValueError("meta.algorithm=maml supports meta.adapter=lora only")
            if self.model.enable_gradient_checkpointing:
                raise ValueError("meta.algorithm=maml needs model.enable_gradient_checkpointing=false")
            if self.model.attn_implementation != "eager":
                raise ValueError("meta.algorithm=maml needs model.attn_implementation=eager")
            if self.model.compile:
                # AOTAutograd: "torch.compile with aot_autograd does not currently support double backward"
                raise ValueError(
                    "meta.algorithm=maml needs model.compile=false (no double backward through torch.compile)"
                )
        if self.model.quantization == "nf4" and self.meta.adapter == "full":
            raise ValueError("model.quantization=nf4 freezes a 4-bit base: it needs meta.adapter=lora")
        return self

    @model_validator(mode="after")
    def _sft_defaults(self) -> "Config":
        if self.sft.micro_batch_size is None:
            self.sft.micro_batch_size = self.meta.query_batch_size
        if self.sft.lr is None:
            self.sft.lr = self.meta.outer_lr
        return self


def _shown(value: Any) -> str:
    """``repr`` of (part of) the user's input for an error message, bounded in length and in the time it
    takes: a few items of each level, a few levels (an expanded tree can be astronomically large)."""
    return _cut(_REPR.repr(value))


def _cut(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, MAX_SHOWN_CHARS, MAX_SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({_cut(source)}):"]
    errors = err.errors()
    for e in errors[:MAX_SHOWN_ERRORS]:
        key = _cut(".".join(str(p) for p in e["loc"]) or "<root>")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (typo?)")
        else:
            got = e.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {_shown(got)})"
            lines.append(f"  {key}: {e['msg']}{got_text}")
    if len(errors) > MAX_SHOWN_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_SHOWN_ERRORS} more")
    return "\n".join(lines)


def _load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, bounded (see the module docstring); ``where`` names the input in errors."""
    try:
        tree = yaml.safe_load(text)
        _check_expanded_size(tree, where)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {_cut(str(err), 2 * MAX_SHOWN_CHARS)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply (a config has a few levels of sections)") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: not a usable YAML value: {_cut(str(err))}") from None
    return tree


def _check_expanded_size(tree: Any, where: str) -> None:
    """Refuse YAML whose aliases make it larger than :data:`MAX_CONFIG_VALUES` once expanded, or recursive.

    ``safe_load`` shares an aliased value instead of copying it, so a few hundred bytes of nested aliases
    load quickly; walking the result (validation, ``repr``) would visit it once per path to it. The expanded
    size is counted once per shared value."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise ConfigError(f"{where}: a YAML alias refers to a value that contains it (a recursive value)")
        open_ids.add(key)
        total = 1 + (len(node) if isinstance(node, dict) else 0)  # the keys
        for child in node.values() if isinstance(node, dict) else node:
            total += size(child)
            if total > MAX_CONFIG_VALUES:
                raise ConfigError(
                    f"{where}: holds more than {MAX_CONFIG_VALUES:,} values once its YAML aliases are expanded "
                    "(nested aliases, a 'billion laughs'?); a config holds a few hundred"
                )
        open_ids.discard(key)
        sizes[key] = total
        return total

    size(tree)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of ``tree`` with ``key.sub=value`` overrides applied (values parsed as YAML)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"override {_shown(item)}: expected key.sub=value, e.g. meta.inner_lr=5e-5")
        _set_dotted(tree, key.strip(), _load_yaml(raw, f"override {_shown(item)}"))
    return tree


def resolve_config_path(config: str | Path | None = None, config_name: str | None = None) -> Path | None:
    """A config file's path, or the name of one in recipes/configs/ (``qwen3_4b_math``) → path."""
    if config and config_name:
        raise ConfigError("give either a config file or a config name, not both")
    if config_name:
        path = CONFIG_DIR / (config_name if config_name.endswith(".yaml") else f"{config_name}.yaml")
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config name {config_name!r}: no {path} (known: {known})")
        return path
    return Path(config) if config else None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    settings: Mapping[str, Any] | None = None,
) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply the command line's ``key=value``
    ``overrides``, then ``settings`` (dotted key → value: what a program sets itself), validate.

    Both apply to the file's tree before validation, so defaults that depend on other keys (the inner
    loop's rate on ``meta.adapter``) follow them."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        tree = _load_yaml(text, str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    if overrides:
        tree = apply_overrides(tree, overrides)
        source += " + overrides"
    if settings:
        tree = copy.deepcopy(tree)
        for key, value in settings.items():
            _set_dotted(tree, key, value)
        source += " + settings"
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def with_absolute_paths(cfg: Config) -> Config:
    """A copy of ``cfg`` whose local paths are absolute, so that what a run saves (its config in every
    checkpoint, the adapter's ``base_model_name_or_path``) still works from another directory.

    ``model.partial_pretrain`` and ``data.source`` stay as they are when they name a hub id or
    ``synthetic`` (not an existing path, nor one that starts with ``.``, ``/`` or ``~``), except that a
    model built by ``model.build_tiny_if_missing`` is always local; the file of a ``records:`` source is made
    absolute inside it.
    """
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    def local(path: str) -> bool:
        return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()

    cfg = cfg.model_copy(deep=True)
    if cfg.model.build_tiny_if_missing or local(cfg.model.partial_pretrain):
        cfg.model.partial_pretrain = absolute(cfg.model.partial_pretrain)
    if is_records_source(cfg.data.source):
        cfg.data.source = absolute_source(cfg.data.source)
    elif local(cfg.data.source):
        cfg.data.source = absolute(cfg.data.source)
    cfg.data.data_dir = absolute(cfg.data.data_dir)
    cfg.trainer.default_local_dir = absolute(cfg.trainer.default_local_dir)
    for section, key in (("trainer", "resume_from_path"), ("sft", "match_tokens_of")):
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, absolute(value))
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain JSON/YAML-safe dict (tuples become lists) for checkpoints and loggers."""
    return cfg.model_dump(mode="json")
