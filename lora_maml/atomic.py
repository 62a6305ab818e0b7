"""Writing files and directories so that a crash never leaves a half-written one under the real name, and
so that one directory has one writer.

Every file a user relies on (prepared data, checkpoints, merged models, reports) is written under a
temporary name in the same directory and renamed into place: ``rename(2)`` within one filesystem is
atomic, so a reader sees the old version or the new one, never a mix. What is published gets the
permissions of a plain create under the process's umask (:func:`apply_umask`). A directory that a run
writes over time (a training run's ``trainer.default_local_dir``, an experiment's ``--out``) is owned by
one live process at a time (:class:`DirectoryLock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from lora_maml.errors import LoraMamlError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"


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


def _umask() -> int:
    # os.umask can only be read by setting it: set back at once. Meanwhile 0o077, so that a file another thread
    # creates in that instant is never more open than the user's umask allows.
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def apply_umask(root: Path) -> None:
    """Give directory ``root`` and everything under it the mode a plain create gets under the process's umask
    (directories and executables 0o777 & ~umask, other files 0o666 & ~umask), before it is published.
    Temporaries are made private (mkdtemp: 0700; mkstemp and safetensors' writer: 0600) and a rename
    keeps the mode, so without this a published weight file is 0600 beside 0644 siblings."""
    umask = _umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~umask)


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (the pid in a temporary's name, in a lock's record)."""
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
        if not m or not entry.is_dir() or pid_alive(int(m.group(2))):
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
        apply_umask(tmp)
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class DirectoryLock:
    """This process owns ``directory`` until :meth:`release` (or the end of a ``with`` block): one live
    process at a time writes it. Taken before anything in the directory is swept or written.

    The lock is ``flock(2)`` on ``directory/.lock``, a file that records its owner as JSON ``{"pid", "host",
    "started"}``. The kernel drops an flock when its process dies, even by SIGKILL, so on one host a lock
    left by a dead run is taken over (with a warning naming that process) and a live run's never is,
    whatever became of its pid. A record written on ANOTHER host is not presumed dead: an flock on a
    network filesystem need not reach other hosts, so that run may still be writing; the error says to
    delete the file once that run is known to be over. On a filesystem without flock the record alone
    decides: a live pid on this host holds the directory. :meth:`release` deletes the file, so a finished
    run leaves no lock for any host. Raises :class:`LoraMamlError` naming ``what`` (a config key or a flag),
    the directory and its owner.
    """

    def __init__(self, directory: str | Path, what: str) -> None:
        directory = Path(directory)
        self.path = directory / LOCK_FILE
        # A directory made only to hold the lock is removed with it if nothing else was written there.
        self._made = None if directory.exists() else directory
        directory.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                kernel_lock = True
            except BlockingIOError:
                owner = _lock_owner(fd)
                os.close(fd)
                raise LoraMamlError(
                    f"{what}={directory}: in use by {_describe_owner(owner)} (lock file {self.path}); one run writes a "
                    "directory at a time: wait for it to finish, stop it, or choose another directory") from None
            except OSError as err:  # e.g. ENOLCK, ENOSYS: a filesystem without flock
                logger.warning("%s: cannot flock it (%s): relying on the pid it records", self.path, err.strerror)
                kernel_lock = False
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the owner released (deleted) the file we opened: lock the one now at the path
        owner = _lock_owner(fd)
        if owner and (owner["host"] != host or (not kernel_lock and pid_alive(owner["pid"]))):
            os.close(fd)
            raise LoraMamlError(
                f"{what}={directory}: locked by {_describe_owner(owner)} (lock file {self.path}); "
                + ("a lock taken on another host is not presumed released: delete the file if that run is no "
                   "longer running" if owner["host"] != host else "one run writes a directory at a time: wait for "
                   "it to finish, stop it, or choose another directory"))
        if owner is not None:
            logger.warning("%s: taking over the lock of %s, which is no longer running", directory,
                           _describe_owner(owner))
        record = {"pid": os.getpid(), "host": host,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd: int | None = fd

    def release(self) -> None:
        """Delete the lock file and give up the lock (a no-op once released)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting opener then retries
        finally:
            os.close(self._fd)
            self._fd = None
        if self._made is not None:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                self._made.rmdir()

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_owner(fd: int) -> dict | None:
    """The owner recorded in an open lock file: None when it is empty (nobody has owned it), ``{}`` when
    unreadable (a write cut short), else ``{"pid": int, "host": str, "started": ...}``."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        owner = json.loads(data)
    except ValueError:
        return {}
    valid = isinstance(owner, dict) and isinstance(owner.get("pid"), int) and owner["pid"] > 0 \
        and isinstance(owner.get("host"), str)
    return owner if valid else {}


def _describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process" if owner is None else "a process whose record is unreadable"
    return f"process {owner['pid']} on host {owner['host']}, started {owner.get('started', '?')}"
