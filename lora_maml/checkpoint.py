"""Crash-safe checkpoints of the training recipes, exact resumption and the policy of what may resume.

Layout under ``trainer.default_local_dir`` (one checkpoint = one step ``N``)::

    maml_checkpoint_step_{N}.pt      torch.save dict: step, model_state_dict, optimizer_state_dict, config
    step_{N}/adapter/                PEFT adapter (adapter_config.json + adapter_model.safetensors)
    step_{N}/model/                  ... or, for full-parameter training, save_pretrained with safetensors
    step_{N}/<adapter|model>/inner_lrs.json  Meta-SGD only: the learned inner rates {parameter name: rate}
    step_{N}/trainer_state.json      {"step", "trainer_state", "rng_states"} (scheduler, sampler, counters,
                                     metrics history, ... and one RNG state per rank)
    step_{N}/trainer_state.safetensors  tensors found inside trainer_state (only when there are any)
    step_{N}/checkpoint_manifest.json   size of every file above; written last inside step_{N}
    latest                           text "step_{N}": the newest committed checkpoint; written last of all

The ``.pt`` file holds only tensors (on CPU), numbers, strings, None, bools, lists, tuples and dicts, so
it loads with ``torch.load(path, weights_only=True)``; :func:`save_checkpoint` proves this on the
temporary file before publishing it. ``model_state_dict`` holds the meta-learned weights under
their parameter names in the model (``lora_maml.models.adapted_parameters``: the LoRA matrices of the
PeftModel, e.g. ``...q_proj.lora_A.default.weight``, or every weight in full mode).

Crash safety: every file is written under a temporary name in its final directory, flushed, fsynced
and ``os.replace``-d into place; ``step_{N}`` is assembled as ``step_{N}.tmp-<pid>`` and renamed as a
whole. The order is: ``.pt`` renamed, ``step_{N}`` renamed, ``latest`` replaced. A checkpoint is
*complete* when both its ``.pt`` and its ``step_{N}/`` exist and every file has the size its manifest
records, so a process killed at any point leaves the previous checkpoint complete and ``latest``
naming it. Sizes catch truncation, not bit rot: a checkpoint that passes the check but whose bytes are
damaged fails in :func:`load_checkpoint` with an error naming the file.

Multi-process runs: :func:`save_checkpoint` writes shared files and must be called on rank 0 only.
Every rank calls :func:`gather_rng_states` (a collective) just before, so rank 0 receives the RNG
state of every process; on resume each rank loads the checkpoint and calls
``restore_rng_state(ckpt["rng_states"][rank])``.

Meta-SGD's learned inner learning rates have one encoding, the log-rates it learns (float64, one
per adapted tensor, by parameter name), which :func:`save_checkpoint` receives. It keeps them in
``trainer_state["log_inner_lrs"]`` (a resume continues bitwise: :func:`load_log_inner_lrs`) and
writes the rates themselves to ``inner_lrs.json`` beside the adapter / model files (what a user
reads and evaluation adapts with: :func:`load_inner_lrs`); it is the one place that converts.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors import SafetensorError

from lora_maml.atomic import apply_umask, fsync_dir, pid_alive, write_text_atomic
from lora_maml.config import Config, ConfigError, config_to_dict
from lora_maml.errors import LoraMamlError, write_failure

logger = logging.getLogger(__name__)

PT_PATTERN = re.compile(r"^maml_checkpoint_step_(\d+)\.pt$")
DIR_PATTERN = re.compile(r"^step_(\d+)$")
LATEST_FILE = "latest"
MANIFEST_FILE = "checkpoint_manifest.json"
TRAINER_STATE_FILE = "trainer_state.json"
TRAINER_TENSORS_FILE = "trainer_state.safetensors"
# Meta-SGD's learned inner learning rates: {parameter name: rate} beside the adapter / model files,
# {parameter name: log rate} in the trainer state.
INNER_LRS_FILE = "inner_lrs.json"
LOG_INNER_LRS_KEY = "log_inner_lrs"
# Only names this module creates; other files in the run directory are never touched.
_TEMP_PATTERN = re.compile(r"^(maml_checkpoint_step_\d+\.pt|step_\d+|latest)\.tmp-(\d+)(-old)?$")
_TENSOR_REF = "__tensor__"
_REQUIRED_PRETRAINED_FILES = {
    "adapter": [("adapter_config.json",), ("adapter_model.safetensors",)],
    "model": [("config.json",), ("model.safetensors", "model.safetensors.index.json")],
}
FORMAT_VERSION = 1


class CheckpointError(LoraMamlError, RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or cannot be written; the message names it."""


def nonfinite_weights(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or an infinity."""
    return [n for n, t in state_dict.items() if t.is_floating_point() and not bool(t.isfinite().all())]


def pt_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"maml_checkpoint_step_{step}.pt"


def step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step_{step}"


# ----------------------------------------------------------------------------------------------
# RNG state


def _bytes_to_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _text_to_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng_state() -> dict:
    """This process's RNG states as a JSON-serialisable dict.

    Covers python ``random``, numpy's global generator, torch's CPU generator and, when CUDA is
    available, the generator of the current CUDA device (each rank drives one device). Generators
    owned by samplers/dataloaders are not global: put their state in ``trainer_state``.
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "torch_cpu": _bytes_to_text(torch.get_rng_state()),
    }
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch; nothing to capture without it
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available():
        state["torch_cuda"] = {
            "device": torch.cuda.current_device(),
            "state": _bytes_to_text(torch.cuda.get_rng_state()),
        }
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of :func:`capture_rng_state`: later random draws equal those of the captured process."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(_text_to_bytes(state["torch_cpu"]))
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch_cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(_text_to_bytes(state["torch_cuda"]["state"]))
        else:
            logger.warning("checkpoint has a CUDA RNG state but CUDA is not available: not restored")


def gather_rng_states() -> list[dict]:
    """RNG states of every rank, in rank order (``[capture_rng_state()]`` without torch.distributed).

    A collective: call it on every rank at the same point, before rank 0 calls :func:`save_checkpoint`.
    """
    import torch.distributed as dist

    state = capture_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# ----------------------------------------------------------------------------------------------
# Atomic file helpers


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in sorted(p for p in root.rglob("*") if p.is_dir()):
        fsync_dir(path)
    fsync_dir(root)


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temporary file or directory to its final name."""
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _remove(path: Path) -> None:
    """Delete a file or directory; a directory is first renamed so a kill mid-delete leaves a temp name."""
    if path.is_dir() and not path.is_symlink():
        if not _TEMP_PATTERN.match(path.name):
            trash = path.with_name(f"{path.name}.tmp-{os.getpid()}-old")
            os.replace(path, trash)
            path = trash
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------------
# Payload conversion


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _split_tensors(obj: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready copy of ``obj`` with tensors moved to ``tensors`` (placeholder: {"__tensor__": key})."""
    if isinstance(obj, torch.Tensor):
        tensors[where] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR_REF: where}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise CheckpointError(
                    f"trainer_state{where}: key {k!r} is a {type(k).__name__}; JSON needs str keys"
                )
            out[k] = _split_tensors(v, f"{where}.{k}", tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{where}[{i}]", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(
        f"trainer_state{where}: {type(obj).__name__} is not JSON-serialisable "
        "(use int/float/str/bool/None/list/dict or torch.Tensor)"
    )


def _join_tensors(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR_REF}:
            return tensors[obj[_TENSOR_REF]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Inspection


def _scan_steps(out_dir: Path) -> set[int]:
    """Steps that have a ``.pt`` or a ``step_N`` directory, complete or not."""
    steps: set[int] = set()
    if not out_dir.is_dir():
        return steps
    for entry in out_dir.iterdir():
        m = PT_PATTERN.match(entry.name) or DIR_PATTERN.match(entry.name)
        if m:
            steps.add(int(m.group(1)))
    return steps


def checkpoint_entries(out_dir: str | Path) -> list[Path]:
    """``latest`` and every checkpoint ``.pt`` and ``step_N`` directory in ``out_dir``, complete or not."""
    out_dir = Path(out_dir)
    latest = out_dir / LATEST_FILE
    steps = [p for s in sorted(_scan_steps(out_dir)) for p in (pt_path(out_dir, s), step_dir(out_dir, s)) if p.exists()]
    return ([latest] if latest.exists() else []) + steps


def checkpoint_problems(out_dir: str | Path, step: int) -> list[str]:
    """Why checkpoint ``step`` in ``out_dir`` is not complete (an empty list when it is)."""
    out_dir = Path(out_dir)
    pt, sdir = pt_path(out_dir, step), step_dir(out_dir, step)
    problems = []
    if not pt.is_file():
        problems.append(f"{pt} is missing")
    manifest_path = sdir / MANIFEST_FILE
    if not manifest_path.is_file():
        problems.append(f"{manifest_path} is missing (step directory not fully written)")
        return problems
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        expected = dict(manifest["files"])
        pt_size = int(manifest["pt_size"])
        manifest_step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return problems + [f"{manifest_path} is unreadable: {err}"]
    if manifest_step != step:
        problems.append(f"{manifest_path} is for step {manifest_step}, expected {step}")
    if pt.is_file() and pt.stat().st_size != pt_size:
        problems.append(f"{pt} has {pt.stat().st_size} bytes, manifest records {pt_size}")
    for rel, size in expected.items():
        path = sdir / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, manifest records {size}")
    if not problems:
        try:
            json.loads((sdir / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            problems.append(f"{sdir / TRAINER_STATE_FILE} is not valid JSON: {err}")
    return problems


def complete_steps(out_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in ``out_dir``, ascending."""
    return sorted(s for s in _scan_steps(Path(out_dir)) if not checkpoint_problems(out_dir, s))


def read_latest(out_dir: str | Path) -> int | None:
    """The step named by ``out_dir/latest``, or None when the file is absent or unreadable."""
    path = Path(out_dir) / LATEST_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as err:
        logger.warning("cannot read %s (%s): ignoring it", path, err)
        return None
    m = DIR_PATTERN.match(text)
    if not m:
        logger.warning("%s contains %r, expected 'step_<N>': ignoring it", path, text[:80])
        return None
    return int(m.group(1))


# ----------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model_state_dict: Mapping[str, torch.Tensor],
    optimizer_state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    trainer_state: Mapping[str, Any],
    rng_states: list[dict],
    save_pretrained: Callable[[Path], None] | None = None,
    pretrained_kind: Literal["adapter", "model"] = "adapter",
    max_to_keep: int | None = None,
    log_inner_lrs: Mapping[str, float] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, prune old ones; return the ``.pt``.

    Call on rank 0 only. ``rng_states`` is one :func:`capture_rng_state` dict per rank (from
    :func:`gather_rng_states`). ``trainer_state`` is JSON data (str keys) whose tensors, if any, go to
    ``trainer_state.safetensors``; tuples come back as lists. ``save_pretrained(dir)`` writes the
    Hugging Face export into ``step_N/<pretrained_kind>/``, e.g.
    ``lambda d: peft_model.save_pretrained(d, safe_serialization=True)``. ``log_inner_lrs``: Meta-SGD's
    learned log inner rates by parameter name, kept in ``trainer_state`` and, as rates, in the export's
    ``inner_lrs.json`` (see the module docstring).

    Before writing, temporary leftovers of killed saves (their process no longer runs) are deleted. An
    existing checkpoint for the same step (e.g. left by an abandoned run after resuming an older one) is
    replaced once the new one is fully written. Errors (bad payload, failed export, full disk) leave the
    directory as it was, apart from the cleaned leftovers. Published files get the umask's modes
    (``atomic.apply_umask``). After
    ``latest`` is updated, ``max_to_keep`` (None = keep all) keeps the newest complete checkpoints
    with step <= ``step`` (the new one included) and deletes the other checkpoint files of those
    steps; checkpoints of later steps are left alone.
    """
    out_dir = Path(out_dir)
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    if pretrained_kind not in _REQUIRED_PRETRAINED_FILES:
        raise ValueError(f"pretrained_kind must be 'adapter' or 'model', got {pretrained_kind!r}")
    if not isinstance(config, Mapping):
        raise CheckpointError(f"config must be a plain dict, got {type(config).__name__}")
    nonfinite = nonfinite_weights(model_state_dict)
    if nonfinite:
        raise CheckpointError(
            f"{pt_path(out_dir, step)}: refusing to save non-finite weights ({len(nonfinite)} tensors, e.g. "
            f"{nonfinite[:3]}); the previous checkpoints are kept"
        )
    rates = None
    if log_inner_lrs is not None:
        trainer_state = {**trainer_state, LOG_INNER_LRS_KEY: {n: float(v) for n, v in log_inner_lrs.items()}}
        exp = torch.tensor(list(log_inner_lrs.values()), dtype=torch.float64).exp().tolist()
        rates = dict(zip(log_inner_lrs, exp))
    # Fail on bad trainer_state before touching the directory.
    tensors: dict[str, torch.Tensor] = {}
    state_json = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "trainer_state": _split_tensors(trainer_state, "", tensors),
        "rng_states": list(rng_states),
    }
    try:
        state_text = json.dumps(state_json, indent=1, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"trainer_state / rng_states are not JSON-serialisable: {err}") from None

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out_dir)
    pid = os.getpid()
    final_pt, final_dir = pt_path(out_dir, step), step_dir(out_dir, step)
    tmp_pt = final_pt.with_name(f"{final_pt.name}.tmp-{pid}")
    tmp_dir = final_dir.with_name(f"{final_dir.name}.tmp-{pid}")
    replaced_dir = final_dir.with_name(f"{final_dir.name}.tmp-{pid}-old")
    try:
        payload = {
            "step": int(step),
            "model_state_dict": _to_cpu(dict(model_state_dict)),
            "optimizer_state_dict": _to_cpu(dict(optimizer_state_dict)),
            "config": _to_cpu(dict(config)),
        }
        allowed = "keep only tensors, numbers, str, bool, None, list, tuple and dict in it"
        try:
            with open(tmp_pt, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise CheckpointError(
                f"{final_pt}: the payload cannot be pickled ({err}); {allowed} so it loads with "
                "torch.load(weights_only=True)"
            ) from None
        except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as a RuntimeError
            raise CheckpointError(write_failure(tmp_pt, err) + "; the previous checkpoints are kept") from None
        del payload
        try:  # mmap reads only the pickle: this proves loadability without reading the tensors
            torch.load(tmp_pt, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError) as err:
            raise CheckpointError(
                f"{final_pt}: the payload would not load with torch.load(weights_only=True); {allowed}: {err}"
            ) from None

        try:
            _write_step_dir(tmp_dir, save_pretrained, pretrained_kind, final_dir, state_text, tensors, rates)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, SafetensorError) as err:  # e.g. a full disk
            raise CheckpointError(write_failure(tmp_dir, err) + "; the previous checkpoints are kept") from None
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "pretrained_kind": pretrained_kind if save_pretrained is not None else None,
            "pt_file": final_pt.name,
            "pt_size": tmp_pt.stat().st_size,
            "files": {
                p.relative_to(tmp_dir).as_posix(): p.stat().st_size
                for p in sorted(tmp_dir.rglob("*"))
                if p.is_file()
            },
        }
        (tmp_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        apply_umask(tmp_dir)  # safetensors writes its files 0600
        _fsync_tree(tmp_dir)

        if final_dir.exists():
            # Same step saved again (e.g. by a run resumed from an older checkpoint). Moving the old
            # directory aside only now keeps the window in which step N is incomplete to two renames.
            logger.warning("replacing the existing checkpoint for step %d in %s", step, out_dir)
            os.replace(final_dir, replaced_dir)
        _publish(tmp_pt, final_pt)
        _publish(tmp_dir, final_dir)
    except BaseException:
        if replaced_dir.exists() and not final_dir.exists():
            os.replace(replaced_dir, final_dir)
        for leftover in (tmp_pt, tmp_dir):
            if leftover.exists():
                _remove(leftover)
        raise
    write_text_atomic(out_dir / LATEST_FILE, f"step_{step}\n")
    if replaced_dir.exists():
        shutil.rmtree(replaced_dir)

    if max_to_keep is not None:
        _prune(out_dir, step, max_to_keep)
    return final_pt


def _write_step_dir(tmp_dir: Path, save_pretrained, kind: str, final_dir: Path, state_text: str,
                    tensors: dict[str, torch.Tensor], inner_lrs: dict[str, float] | None) -> None:
    tmp_dir.mkdir()
    if save_pretrained is not None:
        export_dir = tmp_dir / kind
        save_pretrained(export_dir)
        _check_pretrained_export(export_dir, kind, final_dir / kind)
        if inner_lrs is not None:
            (export_dir / INNER_LRS_FILE).write_text(json.dumps(inner_lrs, indent=1), encoding="utf-8")
    (tmp_dir / TRAINER_STATE_FILE).write_text(state_text, encoding="utf-8")
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp_dir / TRAINER_TENSORS_FILE))


def _check_pretrained_export(export_dir: Path, kind: str, shown_as: Path) -> None:
    missing = [
        " or ".join(names)
        for names in _REQUIRED_PRETRAINED_FILES[kind]
        if not any((export_dir / n).is_file() for n in names)
    ]
    if missing:
        raise CheckpointError(
            f"{shown_as}: save_pretrained did not write {', '.join(missing)} "
            "(expected save_pretrained(dir, safe_serialization=True) with the default adapter name)"
        )


def _remove_temporaries(out_dir: Path) -> None:
    """Delete the temporaries of this process's and of dead processes' saves; another live process's are
    its save under way (the run directory's lock keeps a second run out; this keeps its files if not)."""
    for entry in out_dir.iterdir():
        m = _TEMP_PATTERN.match(entry.name)
        if m and (int(m.group(2)) == os.getpid() or not pid_alive(int(m.group(2)))):
            logger.info("removing leftover of an interrupted checkpoint save: %s", entry)
            _remove(entry)


def remove_checkpoints(out_dir: str | Path) -> None:
    """Delete every checkpoint in ``out_dir``: ``latest`` first, so that it never names a deleted step, then
    each step as :func:`_prune` does (a kill part-way leaves no complete-looking step without its files)."""
    out_dir = Path(out_dir)
    _remove(out_dir / LATEST_FILE)
    for s in sorted(_scan_steps(out_dir)):
        _remove(step_dir(out_dir, s))
        _remove(pt_path(out_dir, s))


def _prune(out_dir: Path, newest: int, max_to_keep: int) -> None:
    candidates = sorted((s for s in _scan_steps(out_dir) if s <= newest), reverse=True)
    complete = [s for s in candidates if not checkpoint_problems(out_dir, s)]
    keep = set(complete[:max_to_keep]) | {newest}
    for s in candidates:
        if s not in keep:
            # The directory goes first: a kill between the two leaves an incomplete step, never a
            # complete-looking one with a missing .pt.
            _remove(step_dir(out_dir, s))
            _remove(pt_path(out_dir, s))


# ----------------------------------------------------------------------------------------------
# Resume


def _resolve_explicit(path_text: str) -> Path:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"trainer.resume_from_path={path_text}: no such file or directory "
            "(expected a maml_checkpoint_step_N.pt file or a step_N directory)"
        )
    m = PT_PATTERN.match(path.name) if path.is_file() else DIR_PATTERN.match(path.name)
    if not m:
        raise CheckpointError(
            f"trainer.resume_from_path={path_text}: expected a maml_checkpoint_step_N.pt file or a "
            f"step_N directory written by lora_maml, got {path.name!r}"
        )
    out_dir, step = path.parent, int(m.group(1))
    problems = checkpoint_problems(out_dir, step)
    if problems:
        raise CheckpointError(
            f"trainer.resume_from_path={path_text}: checkpoint step {step} is incomplete: "
            + "; ".join(problems)
        )
    return pt_path(out_dir, step)


def find_resume_checkpoint(trainer_cfg: Any) -> Path | None:
    """The ``.pt`` of the checkpoint to resume from, or None to start fresh.

    ``trainer_cfg.resume_mode``:
      * ``disable`` - None.
      * ``path`` - ``trainer_cfg.resume_from_path`` (a ``.pt`` or a ``step_N`` dir); raises
        :class:`CheckpointError` when it is missing, misnamed or incomplete.
      * ``auto`` - in ``trainer_cfg.default_local_dir``: the checkpoint named by ``latest`` when it
        is complete; checkpoints newer than it were never committed (killed before ``latest`` was
        written, or left by a run that resumed an older checkpoint) and are skipped. When ``latest``
        is absent, unreadable or names a step that is not complete, it is not trusted: the newest
        complete checkpoint (with a warning naming what was wrong). None only when the directory
        holds no complete checkpoint, so a fresh start never overwrites one.
    """
    mode = trainer_cfg.resume_mode
    if mode == "disable":
        return None
    if mode == "path":
        if not trainer_cfg.resume_from_path:
            raise CheckpointError("trainer.resume_mode=path needs trainer.resume_from_path")
        return _resolve_explicit(trainer_cfg.resume_from_path)
    if mode != "auto":
        raise CheckpointError(f"trainer.resume_mode: expected auto|disable|path, got {mode!r}")

    out_dir = Path(trainer_cfg.default_local_dir)
    steps = sorted(_scan_steps(out_dir), reverse=True)
    latest = read_latest(out_dir)
    if latest is not None and not checkpoint_problems(out_dir, latest):
        newer = [s for s in steps if s > latest]
        if newer:
            logger.warning(
                "%s: ignoring checkpoint steps %s newer than 'latest' (step_%d): never committed",
                out_dir, sorted(newer), latest,
            )
        return pt_path(out_dir, latest)
    if latest is not None:
        problems = checkpoint_problems(out_dir, latest)
        logger.warning("%s/latest names step_%d, which is not a complete checkpoint (%s): not trusting it",
                       out_dir, latest, "; ".join(problems))
    for s in steps:
        problems = checkpoint_problems(out_dir, s)
        if not problems:
            if latest is not None:
                logger.warning("%s: resuming from the newest complete checkpoint, step %d", out_dir, s)
            return pt_path(out_dir, s)
        logger.warning("skipping incomplete checkpoint step %d: %s", s, "; ".join(problems))
    if steps or latest is not None:
        logger.warning("%s: no complete checkpoint found; starting from scratch", out_dir)
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Load a complete checkpoint from its ``.pt`` file or its ``step_N`` directory.

    Returns ``{"step", "model_state_dict", "optimizer_state_dict", "config", "trainer_state",
    "rng_states", "path" (the .pt), "step_dir", "pretrained_dir" (step_N/adapter or step_N/model,
    None when not exported)}``. Tensors are on CPU and memory-mapped copy-on-write from the file:
    ``load_state_dict`` copies them. Raises :class:`CheckpointError` naming the file when anything is
    missing or corrupt.
    """
    path = Path(path)
    m = PT_PATTERN.match(path.name) or DIR_PATTERN.match(path.name)
    if not m:
        raise CheckpointError(
            f"{path}: expected a maml_checkpoint_step_N.pt file or a step_N directory"
        )
    out_dir, step = path.parent, int(m.group(1))
    problems = checkpoint_problems(out_dir, step)
    if problems:
        raise CheckpointError(f"checkpoint step {step} in {out_dir} is incomplete: " + "; ".join(problems))
    pt, sdir = pt_path(out_dir, step), step_dir(out_dir, step)

    try:
        payload = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{pt}: corrupt or not loadable with torch.load(weights_only=True): {err}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{pt}: expected a dict, got {type(payload).__name__}")
    missing = {"step", "model_state_dict", "optimizer_state_dict", "config"} - set(payload)
    if missing:
        raise CheckpointError(f"{pt}: missing keys {sorted(missing)}")
    if payload["step"] != step:
        raise CheckpointError(f"{pt}: contains step {payload['step']}, its name says {step}")

    state_path = sdir / TRAINER_STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_path}: unreadable: {err}") from None
    tensors: dict[str, torch.Tensor] = {}
    tensors_path = sdir / TRAINER_TENSORS_FILE
    if tensors_path.exists():
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensors_path))
        except Exception as err:
            raise CheckpointError(f"{tensors_path}: corrupt: {err}") from None
    try:
        trainer_state = _join_tensors(state["trainer_state"], tensors)
    except KeyError as err:
        raise CheckpointError(f"{state_path}: refers to tensor {err} missing from {tensors_path}") from None

    manifest = json.loads((sdir / MANIFEST_FILE).read_text(encoding="utf-8"))
    kind = manifest.get("pretrained_kind")
    return {
        "step": step,
        "model_state_dict": payload["model_state_dict"],
        "optimizer_state_dict": payload["optimizer_state_dict"],
        "config": payload["config"],
        "trainer_state": trainer_state,
        "rng_states": state["rng_states"],
        "path": pt,
        "step_dir": sdir,
        "pretrained_dir": sdir / kind if kind else None,
    }


# ----------------------------------------------------------------------------------------------
# Meta-SGD's learned inner learning rates (see the module docstring)


def load_log_inner_lrs(checkpoint: Mapping[str, Any], names: Iterable[str]) -> dict[str, float] | None:
    """The learned log inner rates of a :func:`load_checkpoint` result, one per name in ``names`` (in
    that order), exactly as saved; None when the run did not learn them."""
    log_rates = checkpoint["trainer_state"].get(LOG_INNER_LRS_KEY)
    if log_rates is None:
        return None
    where = f"{checkpoint['step_dir'] / TRAINER_STATE_FILE} trainer_state.{LOG_INNER_LRS_KEY}"
    return _one_per_parameter(log_rates, names, where, "log inner learning rate", math.isfinite)


def load_inner_lrs(directory: str | Path | None, names: Iterable[str]) -> dict[str, float] | None:
    """The learned inner rates in ``directory/inner_lrs.json`` (an adapter or model directory, e.g. a
    checkpoint's ``pretrained_dir``), one positive rate per name in ``names``; None without the file."""
    if directory is None or not (Path(directory) / INNER_LRS_FILE).is_file():
        return None
    path = Path(directory) / INNER_LRS_FILE
    try:
        rates = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable: {err}") from None
    return _one_per_parameter(rates, names, str(path), "positive inner learning rate", lambda v: v > 0)


def _one_per_parameter(values: Any, names: Iterable[str], where: str, what: str,
                       valid: Callable[[float], bool]) -> dict[str, float]:
    names = list(names)
    values = values if isinstance(values, dict) else {}
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and valid(v) for v in values.values())
    if set(values) != set(names) or not numbers:
        raise CheckpointError(
            f"{where}: expected one {what} per adapted parameter ({len(names)}), got {len(values)} "
            f"(e.g. unmatched names {sorted(set(values) ^ set(names))[:3]})"
        )
    return {name: float(values[name]) for name in names}


# ----------------------------------------------------------------------------------------------
# Resume policy: which checkpoint, and whether a config may continue it

# Config keys that fix the shape or the meaning of the saved weights: a resume must keep them.
MUST_MATCH_KEYS = ("meta.adapter", "meta.learn_inner_lr")
LORA_KEYS = ("model.lora.r", "model.lora.alpha", "model.lora.target_modules")
# Config keys of the schedule and the optimizer: a resume continues with the new values (with a warning).
SCHEDULE_KEYS = ("optim.lr_scheduler", "optim.lr_warmup_steps_ratio", "optim.betas", "optim.eps",
                 "optim.weight_decay", "meta.outer_lr", "meta.inner_lr_lr", "sft.lr")


def checkpoint_to_resume(cfg: Config) -> dict | None:
    """The checkpoint ``trainer.resume_mode`` picks (:func:`find_resume_checkpoint`), loaded memory-mapped
    (:func:`load_checkpoint`), or None to start fresh. Raises :class:`ConfigError` when ``cfg`` cannot
    continue it (:func:`check_resumable`; the weights are checked once the model is built), and
    :class:`CheckpointError` when its weights are not finite (every step from them would be skipped),
    naming the newest checkpoint beside it whose weights are."""
    path = find_resume_checkpoint(cfg.trainer)
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    check_resumable(path, checkpoint["config"], cfg)
    nonfinite = nonfinite_weights(checkpoint["model_state_dict"])
    if nonfinite:
        out_dir, step = path.parent, checkpoint["step"]
        good = next((pt_path(out_dir, s) for s in reversed(complete_steps(out_dir))
                     if s != step and not nonfinite_weights(load_checkpoint(pt_path(out_dir, s))["model_state_dict"])),
                    None)
        remedy = (f"the newest checkpoint with finite weights is {good}: resume it with trainer.resume_mode=path "
                  f"trainer.resume_from_path={good}") if good else (
                  f"no other checkpoint in {out_dir} has finite weights: start a new run in another "
                  "trainer.default_local_dir")
        raise CheckpointError(
            f"cannot resume {path}: its weights are not finite ({len(nonfinite)} tensors hold NaN or inf, e.g. "
            f"{nonfinite[:3]}), so every step from them would be skipped; {remedy}"
        )
    return checkpoint


def _as_read_now(saved_cfg: dict) -> dict:
    """A checkpoint's config as this version reads it: the keys it lacks get the defaults that keep its
    meaning (e.g. ``sft.lr``: ``meta.outer_lr``); as saved when it no longer fits the schema."""
    try:
        return config_to_dict(Config.model_validate(saved_cfg))
    except ValidationError:
        return saved_cfg


def config_differences(saved: dict, cfg: Config, keys: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this config's value)`` of the dotted ``keys`` that differ."""
    old_tree, new_tree = _as_read_now(saved), config_to_dict(cfg)
    out = []
    for key in keys:
        old, new = old_tree, new_tree
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
            new = new.get(part) if isinstance(new, dict) else None
        if old != new:
            out.append((key, old, new))
    return out


def check_resumable(path: Path, saved_cfg: dict, cfg: Config, saved: dict[str, torch.Tensor] | None = None,
                    params: dict[str, torch.Tensor] | None = None) -> None:
    """Raise :class:`ConfigError` naming every config key to set when checkpoint ``path`` cannot be
    resumed by this run: adapter type, LoRA rank/alpha/targets, Meta-SGD and, once the model is built
    (``saved`` weights vs the model's ``params``), every parameter's name and shape."""
    keys = MUST_MATCH_KEYS + (LORA_KEYS if cfg.meta.adapter == "lora" else ())
    problems = [f"{key}={json.dumps(new)} here, {json.dumps(old)} in the checkpoint (set {key}={json.dumps(old)})"
                for key, old, new in config_differences(saved_cfg, cfg, keys)]
    if not problems and params is not None:
        names = sorted(set(saved) ^ set(params))
        if names:
            problems.append(f"{len(saved)} saved weights vs {len(params)} in this model, e.g. {names[:3]} (was "
                            f"model.partial_pretrain changed? it is {cfg.model.partial_pretrain!r} here)")
        shapes = [f"{n}: {tuple(saved[n].shape)} saved, {tuple(p.shape)} here" for n, p in params.items()
                  if n in saved and saved[n].shape != p.shape]
        if shapes:
            problems.append(f"{len(shapes)} weights differ in shape (was model.partial_pretrain changed?), e.g. "
                            + "; ".join(shapes[:2]))
    if problems:
        raise ConfigError(
            f"cannot resume {path}: " + "; ".join(problems) + ". Or start a new run in another "
            "trainer.default_local_dir."
        )
