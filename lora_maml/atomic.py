"""Writing files and directories so that a crash never leaves a half-written one under the real name.

Every file a user relies on (prepared data, checkpoints, merged models, reports) is written under a
temporary name in the same directory and renamed into place: ``rename(2)`` within one filesystem is
atomic, so a reader sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_maml.errors import LoraMamlError

logger = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An ``OSError`` raised inside without a file name (a failed write, flush or fsync: e.g. a full disk)
    is raised again naming ``path``, so its one ``error:`` line says which file."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a synced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(tmp), open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def replace_dir(tmp: Path, output_dir: Path) -> None:
    """Move the fully written directory ``tmp`` to ``output_dir``, replacing an existing one.

    rename(2) cannot replace a non-empty directory, so the old one is moved aside first and put
    back if the second rename fails.
    """
    if not output_dir.exists():
        os.replace(tmp, output_dir)
        fsync_dir(output_dir.parent)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-{os.getpid()}-", dir=output_dir.parent))
    os.replace(output_dir, old / output_dir.name)
    try:
        os.replace(tmp, output_dir)
    except OSError:
        os.replace(old / output_dir.name, output_dir)
        raise
    finally:
        fsync_dir(output_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_writable_dir(path: str | Path, what: str) -> None:
    """Check that directory ``path`` can be created (or exists) and written to, creating nothing: its
    nearest existing ancestor must be a directory that takes a temporary file. A bad output path then
    fails before any slow work. Raises :class:`LoraMamlError` naming ``what`` (a flag or config key)."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise LoraMamlError(f"{what}={path}: not a writable directory ({existing} is a file)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise LoraMamlError(f"{what}={path}: not a writable directory ({existing}: {err.strerror or err})") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def sweep_stale(output_dir: Path) -> None:
    """Remove what an earlier :func:`atomic_dir` for ``output_dir`` left behind when its process was
    killed (its pid is in the name and no longer runs): ``.{name}.tmp-{pid}-*`` directories, and
    ``.{name}.old-{pid}-*`` ones, whose content is put back first if the kill fell between
    :func:`replace_dir`'s two renames."""
    pattern = re.compile(rf"^\.{re.escape(output_dir.name)}\.(tmp|old)-(\d+)-")
    if not output_dir.parent.is_dir():
        return
    for entry in output_dir.parent.iterdir():
        m = pattern.match(entry.name)
        if not m or not entry.is_dir() or _pid_alive(int(m.group(2))):
            continue
        moved_aside = entry / output_dir.name
        if m.group(1) == "old" and moved_aside.exists() and not output_dir.exists():
            os.replace(moved_aside, output_dir)
        logger.warning("removing %s, left by an interrupted run (process %s)", entry, m.group(2))
        shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``output_dir``; on success it replaces ``output_dir``,
    on any exception it is deleted and ``output_dir`` is left as it was. Leftovers of an earlier
    killed run for the same ``output_dir`` are swept first (:func:`sweep_stale`)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-{os.getpid()}-", dir=output_dir.parent))
    try:
        yield tmp
        # mkdtemp makes the directory private (0700); published outputs get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
