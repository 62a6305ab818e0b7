"""What a checkpoint records of its inputs (the data and the base model), and the checks that they did not
change since: resuming refuses a change, evaluation warns.

Every checkpoint of a training run records :func:`fingerprint` in ``trainer_state["inputs"]``:

* ``data``: per prepared file of ``data.data_dir``, the sha256 of its rows that ``lora-maml prepare``
  recorded in the manifest. It is computed from the rows (not pyarrow's file layout) and ``validate``
  checks the files against it, so it is the contents: re-preparing with another seed, ratio or source
  changes it even when every split keeps its size (all that the episode sampler's own fingerprint covers).
* ``base``: per weight file of ``model.partial_pretrain`` (a directory, or a hub id's snapshot in the
  local cache): its size and, for safetensors, its header (every tensor's name, dtype, shape and offsets)
  and a sample of every tensor's bytes (4 KiB at its start, middle and end); other formats (a .bin, a
  GGUF file) 64 evenly spaced 4 KiB blocks. That reads about 5 MB of a 4B model's 8 GB (milliseconds)
  where a full hash takes a minute on every resume and evaluation, and still tells another model of the
  same shape apart: another initialisation or a fine-tune moves every tensor, so every sample (only an
  edit that spares every sampled block would pass). It does not depend on file times or on the
  directory's path: a copied or moved base is the same base.

Resuming with a changed data dir or base is refused (:func:`check_resume`: a :class:`ConfigError`
naming which changed) unless ``trainer.allow_changed_inputs=true`` (then it warns). Evaluation warns:
``load_trained`` when a checkpoint's base is not the one it was trained on (:func:`warn_if_base_changed`),
``lora-maml eval`` when the files of its data dir differ from those of the same name the checkpoint
trained on (:func:`warn_if_data_changed`: its test problems may then be training examples). A checkpoint
written before fingerprints were recorded still loads, with one warning that its inputs cannot be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Mapping
from pathlib import Path

from transformers.utils import cached_file

from lora_maml.config import Config, ConfigError
from lora_maml.data import prepare

log = logging.getLogger("lora_maml")

INPUTS_KEY = "inputs"  # the trainer_state key of a checkpoint's fingerprint
# Part of the fingerprint: bump when what is sampled changes, so that older fingerprints read as unknown,
# not as changed inputs.
SCHEME = "inputs-v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_BLOCK = 4096
_BLOCKS_PER_FILE = 64  # formats without a header to find the tensors by
_unchecked: set[str] = set()  # checkpoints already warned about (once per process)


def data_fingerprint(data_dir: str | Path) -> dict[str, str]:
    """``{prepared file (relative path): sha256 of its rows}`` of a prepared directory (its manifest)."""
    manifest = prepare.read_manifest(data_dir)
    return {relative: entry["rows_sha256"] for relative, entry in sorted(manifest["files"].items())}


def base_fingerprint(source: str, gguf_file: str | None = None) -> dict[str, str] | None:
    """``{weight file name: digest}`` of the base model ``source`` (a directory or a cached hub id; only
    ``gguf_file`` when given); None when it is neither (nothing local to read)."""
    directory = _local_dir(source)
    if directory is None:
        return None
    files = [directory / gguf_file] if gguf_file else sorted(
        p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return {p.name: _file_digest(p) for p in files if p.is_file()}


def fingerprint(cfg: Config) -> dict:
    """What a checkpoint of a run with ``cfg`` records of its inputs (see the module docstring)."""
    return {"scheme": SCHEME, "data_dir": cfg.data.data_dir, "data": data_fingerprint(cfg.data.data_dir),
            "base": cfg.model.partial_pretrain, "base_weights": base_fingerprint(cfg.model.partial_pretrain,
                                                                                 cfg.model.gguf_file)}


def recorded_inputs(trainer_state: Mapping, checkpoint: str | Path) -> dict | None:
    """The fingerprint a checkpoint recorded, or None (with one warning per checkpoint) when it has none
    this version can compare: written before fingerprints were recorded, or by another scheme."""
    recorded = trainer_state.get(INPUTS_KEY)
    if isinstance(recorded, dict) and recorded.get("scheme") == SCHEME:
        return recorded
    if str(checkpoint) not in _unchecked:
        _unchecked.add(str(checkpoint))
        log.warning("%s: written without a fingerprint of its data and base model (an older version): whether "
                    "they changed since cannot be checked", checkpoint)
    return None


def data_changes(recorded: Mapping[str, str], current: Mapping[str, str], *, common_only: bool = False) -> str | None:
    """What differs between two :func:`data_fingerprint` (``common_only``: among the files both have);
    None when nothing does."""
    names = sorted(set(recorded) & set(current)) if common_only else sorted(set(recorded) | set(current))
    changed = [n for n in names if n in recorded and n in current and recorded[n] != current[n]]
    added = [n for n in names if n not in recorded]
    removed = [n for n in names if n not in current]
    parts = [f"{len(items)} {what}, e.g. {', '.join(items[:2])}"
             for items, what in ((changed, "files with other rows"), (added, "files added"), (removed, "files removed"))
             if items]
    return "; ".join(parts) or None


def base_changes(recorded: Mapping[str, str] | None, current: Mapping[str, str] | None) -> str | None:
    """What differs between two :func:`base_fingerprint` (None: nothing, or one of them is unknown)."""
    if recorded is None or current is None or recorded == current:
        return None
    if set(recorded) != set(current):
        return f"weight files {sorted(current)}, trained on {sorted(recorded)}"
    return f"other weights in {', '.join(n for n in sorted(current) if current[n] != recorded[n])}"


def check_resume(checkpoint: str | Path, trainer_state: Mapping, cfg: Config, current: Mapping) -> None:
    """Refuse to resume ``checkpoint`` when its data or base changed since (``current``: :func:`fingerprint`
    of this run): :class:`ConfigError` naming which, unless ``trainer.allow_changed_inputs`` (a warning)."""
    recorded = recorded_inputs(trainer_state, checkpoint)
    if recorded is None:
        return
    problems = []
    data = data_changes(recorded["data"], current["data"])
    if data:
        problems.append(f"the data in data.data_dir={cfg.data.data_dir} changed since it was written ({data})")
    base = base_changes(recorded["base_weights"], current["base_weights"])
    if base:
        problems.append(f"the base model at model.partial_pretrain={cfg.model.partial_pretrain} is not the one it was "
                        f"trained on ({base})")
    if not problems:
        return
    if cfg.trainer.allow_changed_inputs:
        log.warning("%s: %s; resuming anyway (trainer.allow_changed_inputs=true)", checkpoint, "; ".join(problems))
        return
    raise ConfigError(f"cannot resume {checkpoint}: " + "; ".join(problems) + ". Set trainer.allow_changed_inputs=true "
                      "to resume on the new inputs anyway, or start a new run in another trainer.default_local_dir.")


def warn_if_base_changed(checkpoint: str | Path, recorded: Mapping | None, source: str, gguf_file: str | None) -> None:
    """Evaluation: warn when the base ``source`` a checkpoint is loaded onto is not the one it was trained on."""
    if recorded is None:
        return
    base = base_changes(recorded["base_weights"], base_fingerprint(source, gguf_file))
    if base:
        log.warning("%s: the base model %s is not the one it was trained on (%s): its scores are those of the "
                    "adapter on another base", checkpoint, source, base)


def warn_if_data_changed(checkpoint: str | Path, recorded: Mapping | None, data_dir: str | Path) -> None:
    """Evaluation: warn when prepared files of ``data_dir`` differ from the files of the same name the
    checkpoint trained on (re-prepared since: its test problems may have been training examples)."""
    if recorded is None:
        return
    data = data_changes(recorded["data"], data_fingerprint(data_dir), common_only=True)
    if data:
        log.warning("%s: the data dir %s is not the data it was trained on (%s): its test problems may have been "
                    "training examples", checkpoint, data_dir, data)


# --- the base's weight files ---------------------------------------------------------------------
def _local_dir(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:  # a hub id: its snapshot in the local cache (never the network)
        found = cached_file(source, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return None if found is None else Path(found).parent


def _file_digest(path: Path) -> str:
    """sha256 of the size and the sampled bytes of a weight file (see the module docstring)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        for offset in _sample_offsets(f, path.suffix, size):
            f.seek(offset)
            digest.update(f.read(_BLOCK))
    return digest.hexdigest()


def _sample_offsets(f, suffix: str, size: int) -> list[int]:
    if suffix == ".safetensors" and size >= 8:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length <= size:
            header = f.read(length)
            try:
                tensors = json.loads(header)
            except ValueError:
                tensors = None  # not a safetensors file after all: sampled like any other
            if isinstance(tensors, dict):
                offsets = list(range(0, 8 + length, _BLOCK))  # the header itself, whole
                for name in sorted(tensors):
                    span = tensors[name].get("data_offsets") if isinstance(tensors[name], dict) else None
                    if isinstance(span, list) and len(span) == 2:
                        start, end = (8 + length + int(o) for o in span)
                        offsets += sorted({start, max(start, (start + end - _BLOCK) // 2), max(start, end - _BLOCK)})
                return offsets
    return sorted({i * max(size - _BLOCK, 0) // (_BLOCKS_PER_FILE - 1) for i in range(_BLOCKS_PER_FILE)})
