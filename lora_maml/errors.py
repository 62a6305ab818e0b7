"""User errors and how every command reports them: one ``error: ...`` line, exit code 1 or 2, no traceback.

The library raises :class:`LoraMamlError` (or one of its subclasses: ``ConfigError``, ``CheckpointError``,
``DataError``, ``ExportError``, ``LoadTrainedError``) for a bad config, data, checkpoint or output path,
with a message that names the file, config key or function argument and what was expected (never a
command-line option: a program rewords argument names as its options with :func:`reworded`).
:func:`run_main` is the one place
that turns these, and the standard library's kinds of user error (``OSError``: missing or unwritable files,
a full disk; ``ValueError``; ``FloatingPointError``: a diverged run), into that line. Anything else is a bug
and keeps its traceback. ``--debug`` (any position on the ``lora-maml`` command line) or
``LORA_MAML_DEBUG=1`` prints the traceback of user errors too. SIGTERM exits with code 143 after
unwinding, so temporary outputs are cleaned up as on Ctrl-C.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

DEBUG_ENV = "LORA_MAML_DEBUG"


class LoraMamlError(Exception):
    """A user error: the message names the file or config key and what was expected.

    ``exit_code`` is 2 for errors in how the command was called (config, arguments), else 1.
    """

    exit_code = 1


USER_ERRORS = (LoraMamlError, OSError, ValueError, FloatingPointError)


def describe(err: BaseException) -> str:
    """The one-line message of a user error; an ``OSError`` names its file, a full disk says so."""
    if isinstance(err, OSError) and err.strerror:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        text = f"{where}: {err.strerror}" if where else err.strerror
        if err.errno == errno.ENOSPC:
            text += " (disk full: free space or write elsewhere)"
        return text
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # e.g. one line per config key
    return " ".join([lines[0], "; ".join(lines[1:])]).strip() if lines else type(err).__name__


def write_failure(path: str | Path, err: BaseException) -> str:
    """The message for a failed write of ``path`` (a full disk, a vanished directory), with the free space
    there: torch and safetensors report a full disk as their own errors, without the file's name."""
    try:
        free = f"; {shutil.disk_usage(Path(path).parent).free:,} bytes free on its filesystem"
    except OSError:
        free = ""
    return f"{path}: cannot write it: {describe(err)}{free}"


@contextmanager
def reworded(wording: Mapping[str, str]) -> Iterator[None]:
    """Reword the user errors raised inside in a program's terms: ``wording`` maps a phrase of the library's
    messages (an argument: ``output_dir``, ``overwrite=True``) to the program's (its option: ``--output``).

    A phrase is replaced only where it stands alone (not inside a path or a longer name). The error keeps
    its type and exit code; errors raised by the system (an ``OSError`` with an errno) name files and are
    left as they are.
    """
    phrases = sorted(wording, key=len, reverse=True)
    pattern = re.compile("|".join(rf"(?<![\w./-]){re.escape(p)}(?![\w/])" for p in phrases))
    try:
        yield
    except USER_ERRORS as err:
        if phrases and len(err.args) == 1 and isinstance(err.args[0], str):
            err.args = (pattern.sub(lambda m: wording[m.group(0)], err.args[0]),)
        raise


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "False")


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """``main(argv)`` with user errors reported as one ``error:`` line on stderr; returns the exit code.

    A ``--debug`` in ``argv`` is taken out and sets ``LORA_MAML_DEBUG=1``.
    """
    argv = list(argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    # SIGTERM (a cluster's stop, `kill`) unwinds like Ctrl-C, so half-written outputs are removed on the
    # way out (atomic_dir); training replaces this handler with its own finish-the-step-and-save one.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
    try:
        return int(main(argv) or 0)
    except USER_ERRORS as err:
        if debug_requested():
            traceback.print_exc()
        print(f"error: {describe(err)}", file=sys.stderr)
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:
        if debug_requested():
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
