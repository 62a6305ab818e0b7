"""lora_maml.atomic: one live owner per directory (DirectoryLock, with real processes) and the permissions
of what is published."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lora_maml import atomic
from lora_maml.atomic import LOCK_FILE, DirectoryLock, atomic_dir
from lora_maml.errors import LoraMamlError

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
# Takes the lock on argv[1] and holds it until killed.
_HOLDER = "import sys, time; from lora_maml.atomic import DirectoryLock; DirectoryLock(sys.argv[1], 'x'); " \
          "print('locked', flush=True); time.sleep(600)"


def start_holder(directory: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n", "the holder process did not take the lock"
    return proc


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def write_record(directory: Path, **record) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", **record}))


def test_a_live_owner_keeps_the_directory_and_a_killed_ones_lock_is_taken_over(tmp_path, caplog):
    """Held by a live process: refused, naming its pid and host. The same process SIGKILLed leaves its lock
    file behind (no chance to release it): taken over, with a warning naming the dead process."""
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        with pytest.raises(LoraMamlError) as refused:
            DirectoryLock(run, "trainer.default_local_dir")
        assert re.fullmatch(
            rf"trainer\.default_local_dir={re.escape(str(run))}: in use by process {holder.pid} on host "
            rf"{re.escape(HOST)}, started \S+ \(lock file {re.escape(str(run / LOCK_FILE))}\); one run writes a "
            "directory at a time: wait for it to finish, stop it, or choose another directory", str(refused.value))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="lora_maml.atomic"):
        lock = DirectoryLock(run, "trainer.default_local_dir")
    assert f"taking over the lock of process {holder.pid} on host {HOST}" in caplog.text
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_a_lock_recorded_on_another_host_is_not_presumed_released(tmp_path):
    write_record(tmp_path, pid=os.getpid(), host=f"not-{HOST}")
    with pytest.raises(LoraMamlError, match=f"locked by process {os.getpid()} on host not-{re.escape(HOST)}, .*not "
                       "presumed released: delete the file if that run is no longer running"):
        DirectoryLock(tmp_path, "--out")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == f"not-{HOST}"  # left as it was


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch, caplog):
    """A filesystem without flock (ENOLCK): a live pid recorded on this host holds the directory, a dead
    one's lock is taken over."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_record(tmp_path, pid=sleeper.pid, host=HOST)
        with pytest.raises(LoraMamlError, match=f"locked by process {sleeper.pid} on host"):
            DirectoryLock(tmp_path, "--out")
    finally:
        sleeper.kill()
        sleeper.wait()
    gone = dead_pid()
    write_record(tmp_path, pid=gone, host=HOST)
    with caplog.at_level(logging.WARNING, logger="lora_maml.atomic"), DirectoryLock(tmp_path, "--out"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "cannot flock it" in caplog.text and f"taking over the lock of process {gone} " in caplog.text


def test_one_process_cannot_take_a_directory_twice_and_a_release_leaves_nothing(tmp_path):
    run = tmp_path / "made" / "run"
    with DirectoryLock(run, "--out"):
        with pytest.raises(LoraMamlError, match=f"in use by process {os.getpid()} "):
            DirectoryLock(run, "--out")
    assert not run.exists(), "a directory made only for the lock is removed with it"
    with DirectoryLock(tmp_path, "--out"):
        (tmp_path / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["made", "metrics.jsonl"]


def test_a_waiting_process_takes_the_lock_once_it_is_released(tmp_path):
    """Released (the file deleted) while another process tries: that one gets a lock on the new file, never a
    lock on the deleted one that a third process could also get."""
    first = DirectoryLock(tmp_path, "--out")
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR)  # what a second process opened just before the release
    first.release()
    os.close(fd)
    with DirectoryLock(tmp_path, "--out"):
        assert (tmp_path / LOCK_FILE).is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_an_atomic_dir_is_published_with_the_umasks_modes(tmp_path, umask):
    """Temporaries are private (mkdtemp 0700, mkstemp 0600); what is published gets the umask's modes."""
    import tempfile

    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            fd, name = tempfile.mkstemp(dir=tmp / "sub")
            os.close(fd)
            (tmp / "plain.txt").write_text("x")
            (tmp / "tool.sh").write_text("#!/bin/sh\n")
            (tmp / "tool.sh").chmod(0o700)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    directory, file = 0o777 & ~umask, 0o666 & ~umask
    assert modes == {"out": directory, "out/sub": directory, f"out/sub/{Path(name).name}": file,
                     "out/plain.txt": file, "out/tool.sh": directory}
