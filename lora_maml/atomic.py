"""Writing files and directories so that a crash never leaves a half-written one under the real name.

Every file a user relies on (prepared data, checkpoints, merged models, reports) is written under a
temporary name in the same directory and renamed into place: ``rename(2)`` within one filesystem is
atomic, so a reader sees the old version or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a synced temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None:  # a failed flush / fsync (e.g. a full disk) does not name the file
            raise OSError(err.errno, err.strerror, str(tmp)) from err
        raise
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
    old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    os.replace(output_dir, old / output_dir.name)
    try:
        os.replace(tmp, output_dir)
    except OSError:
        os.replace(old / output_dir.name, output_dir)
        raise
    finally:
        fsync_dir(output_dir.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``output_dir``; on success it replaces ``output_dir``,
    on any exception it is deleted and ``output_dir`` is left as it was."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
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
