"""Loading the frozen base model, adding LoRA, and naming the meta-learned parameters.

``load_base`` → frozen (optionally nf4-quantised, optionally GGUF-dequantised) causal LM with
non-reentrant activation checkpointing and the ``model.loss_chunk_size`` of its loss; ``add_lora`` →
PeftModel with fp32 LoRA weights whatever the base dtype; ``adapted_parameters`` → the parameters the
meta-learner adapts and meta-learns; ``compile_decoder`` → ``model.compile`` (the training recipe);
``dequantize_gguf`` → a GGUF file saved once as a plain fp32 model directory.

Before any weight loads, ``load_base`` checks the files of a local (or locally cached) model directory
(:func:`check_model_files`: JSON files, ``tokenizer.json``, every ``*.safetensors`` header) and loads the
tokenizer (:func:`load_tokenizer`, which renders a prompt with its chat template), so a truncated or
corrupt file, or a chat template that fails (e.g. one refused by jinja2's sandbox), is an error naming
the file, not a library traceback after minutes of loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer
from torch import nn

from lora_maml.atomic import atomic_dir
from lora_maml.config import LoraConfig, ModelConfig
from lora_maml.data.tokenize import prompt_ids
from lora_maml.errors import LoraMamlError
from lora_maml.loss import decoder_body, set_loss_chunk_size

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
TOKENIZER_FILE = "tokenizer.json"
PROBE_PROMPT = "What is $1 + 1$?"  # a user turn every chat template must render


class ModelFileError(LoraMamlError, ValueError):
    """A file of a model directory that cannot be read (truncated or corrupt); the message names it."""


def torch_dtype(name: str) -> torch.dtype:
    """``model.dtype`` config value (bf16|fp16|fp32|fp64) → torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"model.dtype: expected one of {sorted(DTYPES)}, got {name!r}") from None


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether any submodule (e.g. a decoder layer) recomputes its forward in the backward."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (active in train mode only)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers/peft add a hook making the embedding output require grad; only reentrant
    # checkpointing needs it, and with .backward() it costs an input-gradient pass through layer 0.
    model.disable_input_require_grads()


def compile_decoder(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the decoder body of ``model`` in place (``nn.Module.compile``; ``model.compile``).

    The body (embeddings, decoder layers, final norm) is where the FLOPs are, and both losses of
    ``lora_maml.loss`` call it: the full-logits one through the causal LM's forward, the chunked one
    directly. The LM head and the loss stay eager. In place, so parameter names (fast weights,
    checkpoints) do not change; apply it after ``add_lora`` or before, compilation happens at the first
    call. Fast weights swapped in by ``functional_call`` are graph inputs (no recompilation per inner
    step; one more compile when the sequence length first changes, then dynamic shapes). Gradients match
    eager up to the rounding of ops transformers keeps in fp32 (RoPE angles, RMSNorm; ~1e-7 on a tiny
    fp64 model, 1e-15 when those are fp64 too). No double backward: not with ``meta.algorithm=maml``.
    """
    decoder_body(model, "model.compile").compile(**compile_kwargs)
    return model


def decoder_compiled(model: nn.Module) -> bool:
    """Whether :func:`compile_decoder` compiled ``model``'s decoder body."""
    try:
        return getattr(decoder_body(model), "_compiled_call_impl", None) is not None
    except TypeError:
        return False


def local_model_dir(source: str | Path) -> Path | None:
    """The local directory of a model: ``source`` itself, or a hub id's snapshot in the local cache
    (no network); None when neither exists (transformers then reports the missing model)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(source), "config.json")
    except ValueError:  # not a valid hub id
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def check_model_files(directory: str | Path) -> None:
    """Raise :class:`ModelFileError` naming the first file of a model directory that cannot be read: a
    ``*.json`` that is not JSON, a ``tokenizer.json`` that the tokenizers library refuses, a ``*.safetensors``
    whose header is corrupt or whose data the file does not hold (truncated). Reads the headers only
    (memory-mapped), not the weights."""
    directory = Path(directory)
    for path in sorted(directory.glob("*.json")):
        try:
            if path.name == TOKENIZER_FILE:
                Tokenizer.from_file(str(path))
            else:
                json.loads(path.read_text(encoding="utf-8"))
        except OSError:  # unreadable (permissions, a vanished file): it names the file itself
            raise
        except Exception as err:  # the tokenizers library raises a bare Exception for a bad file
            raise ModelFileError(f"{path}: not readable ({_one_line(err)}); is it truncated or corrupt? Replace it "
                                 "(e.g. download the model again)") from None
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as err:
            raise ModelFileError(f"{path}: not a valid safetensors file ({_one_line(err)}); is it truncated or "
                                 "corrupt? Replace it (e.g. download the model again)") from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_chat_template(tokenizer) -> None:
    """Render a user turn with ``tokenizer``'s chat template, if it has one: a template that fails (jinja2
    runs it sandboxed and refuses, e.g., one that reaches for ``__globals__``) raises ``ValueError`` naming
    its file (:func:`lora_maml.data.tokenize.prompt_ids`) before any weight loads."""
    if tokenizer.chat_template:
        prompt_ids(tokenizer, PROBE_PROMPT)


def load_tokenizer(source: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(source)`` after :func:`check_model_files` (local directories), with its
    chat template checked (:func:`check_chat_template`)."""
    from transformers import AutoTokenizer

    directory = local_model_dir(source)
    if directory is not None:
        check_model_files(directory)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    check_chat_template(tokenizer)
    return tokenizer


def load_base(model_cfg: ModelConfig, *, device_map=None):
    """Load ``model_cfg.partial_pretrain`` (hub id or local dir; ``gguf_file`` inside it) frozen.

    Returns ``(model, tokenizer)``. With ``quantization: nf4`` the linear layers are bitsandbytes
    4-bit NF4 with compute dtype ``model_cfg.dtype``. A GGUF file is dequantised to ``model_cfg.dtype``
    and then detached from its (non-trainable) quantizer so it is an ordinary dense model. The files
    and the tokenizer are checked first (:func:`load_tokenizer`): :class:`ModelFileError` names a bad one.
    """
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(model_cfg.dtype)
    source = model_cfg.partial_pretrain
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": model_cfg.attn_implementation,
        "trust_remote_code": model_cfg.trust_remote_code,
        "device_map": device_map,
    }
    if model_cfg.gguf_file and model_cfg.quantization:
        raise ValueError(
            f"model.gguf_file={model_cfg.gguf_file!r} with model.quantization={model_cfg.quantization!r}: "
            "a GGUF file is dequantised on load; re-quantising it to nf4 is not supported"
        )
    if model_cfg.gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = model_cfg.gguf_file
        kwargs["quantization_config"] = GgufConfig(gguf_file=model_cfg.gguf_file, dequantize=True)
    if model_cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    try:
        # The tokenizer first: seconds, where the weights can take minutes.
        tokenizer = load_tokenizer(source, gguf_file=model_cfg.gguf_file, trust_remote_code=model_cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"model.partial_pretrain={source!r} (gguf_file={model_cfg.gguf_file!r}) could not be loaded: "
            f"expected a local model directory or a hub id in the local cache (tests run offline). {err}"
        ) from err
    if model_cfg.gguf_file:
        # The weights are dense now; the GGUF quantizer would mark the model as not trainable.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.requires_grad_(False)
    model.config.use_cache = False
    if model_cfg.enable_gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_loss_chunk_size(model, model_cfg.loss_chunk_size)  # read by every lora_maml.loss call on the model
    return model, tokenizer


def dequantize_gguf(gguf_path: str | Path, output_dir: str | Path) -> Path:
    """Load the GGUF file ``gguf_path`` dequantised to fp32 and save it with its tokenizer as a plain Hugging
    Face model directory ``output_dir`` (written atomically): a base that later loads without dequantising.
    Raises ValueError when its tokenizer has no chat template (every example is chat-formatted)."""
    gguf_path = Path(gguf_path)
    model, tokenizer = load_base(ModelConfig(partial_pretrain=str(gguf_path.parent), gguf_file=gguf_path.name,
                                             dtype="fp32", enable_gradient_checkpointing=False))
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: its tokenizer has no chat template; every example is chat-formatted")
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(output_dir)


def _check_target_modules(model: nn.Module, targets: list[str]) -> None:
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ValueError(
            f"model.lora.target_modules: {missing} match no module of {type(model).__name__}; "
            f"its linear layers are named {linear}"
        )


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes Linear4bit subclasses nn.Linear; Conv1D (GPT-2 style) has the same role.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def add_lora(model: nn.Module, model_cfg: ModelConfig | LoraConfig):
    """Wrap ``model`` in a peft ``PeftModel`` with a LoRA adapter from ``model_cfg.lora`` (or a
    ``LoraConfig`` given directly). Every ``target_modules`` entry must match a module.

    LoRA weights are fp32 even on a bf16/fp16 base (peft ``autocast_adapter_dtype``): small outer
    steps (lr ~1e-5) on bf16 weights would mostly round to no change.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = model_cfg.lora if isinstance(model_cfg, ModelConfig) else model_cfg
    _check_target_modules(model, list(lora.target_modules))
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    if gradient_checkpointing_on(model):
        peft_model.get_base_model().disable_input_require_grads()  # see enable_gradient_checkpointing
    half = (torch.float16, torch.bfloat16)
    low = [n for n, p in peft_model.named_parameters() if ".lora_" in n and p.dtype in half]
    if low:
        raise RuntimeError(f"LoRA weights {low[:3]} were not upcast to fp32 by peft (autocast_adapter_dtype)")
    return peft_model


def adapted_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The meta-learned parameters, by their names in ``model`` (the names fast weights use).

    ``lora``: the LoRA matrices (base stays frozen). ``full``: every parameter, the base unfrozen
    (tied parameters appear once, under their first name).
    """
    if adapter == "lora":
        params = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        if not params:
            raise ValueError(
                f"meta.adapter=lora but {type(model).__name__} has no LoRA parameters: "
                "call add_lora(model, cfg.model) first"
            )
        for p in params.values():
            p.requires_grad_(True)
        return params
    if adapter == "full":
        names = [n for n, _ in model.named_parameters()]
        if any(".lora_" in n for n in names):
            raise ValueError("meta.adapter=full expects the bare base model, got one with LoRA layers (skip add_lora)")
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise ValueError("meta.adapter=full cannot train a quantised (nf4) base: use meta.adapter=lora")
        model.requires_grad_(True)
        return dict(model.named_parameters())
    raise ValueError(f"meta.adapter: expected 'lora' or 'full', got {adapter!r}")
