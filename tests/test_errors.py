"""run_main: user errors are one `error:` line (traceback on request), bugs keep their traceback, SIGTERM
unwinds so that half-written outputs are removed."""

import errno
import os
import signal

import pytest

from lora_maml.atomic import atomic_dir
from lora_maml.config import ConfigError
from lora_maml.errors import DEBUG_ENV, LoraMamlError, describe, reworded, run_main


def fail_with(err):
    def main(argv):
        raise err

    return main


def test_user_errors_are_one_line_with_their_exit_code(capsys, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored afterwards; --debug below sets it to 1
    assert run_main(fail_with(ConfigError("invalid config (x):\n  meta.outer_lr: bad\n  meta.inner_lr: bad")), []) == 2
    assert capsys.readouterr().err == "error: invalid config (x): meta.outer_lr: bad; meta.inner_lr: bad\n"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/run/step_2/trainer_state.json")
    assert run_main(fail_with(full), []) == 1
    assert capsys.readouterr().err == (
        "error: /run/step_2/trainer_state.json: No space left on device (disk full: free space or write elsewhere)\n")
    assert describe(FileNotFoundError("data/x.parquet: listed in the manifest but missing")) == (
        "data/x.parquet: listed in the manifest but missing")


def test_debug_shows_the_traceback_and_bugs_keep_theirs(capsys, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored afterwards; --debug below sets it to 1
    assert run_main(fail_with(ValueError("bad value")), ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad value\n") and os.environ[DEBUG_ENV] == "1"
    with pytest.raises(KeyError):  # not a user error: a bug, shown with its traceback by Python
        run_main(fail_with(KeyError("internal")), [])


def test_a_program_rewords_argument_names_as_its_options():
    """The library names its arguments; a program says its options instead, never inside a path or a longer
    name; the error keeps its type and exit code, and a system error (with an errno) is left as it is."""
    wording = {"output_dir": "--output", "overwrite=True": "--overwrite"}
    with pytest.raises(FileExistsError) as caught, reworded(wording):
        raise FileExistsError("output_dir /runs/output_dir/m: not empty (pass overwrite=True; see my_output_dir)")
    assert describe(caught.value) == "--output /runs/output_dir/m: not empty (pass --overwrite; see my_output_dir)"
    with pytest.raises(ConfigError) as caught, reworded(wording):
        raise ConfigError("output_dir: bad")
    assert str(caught.value) == "--output: bad" and caught.value.exit_code == 2
    system = OSError(errno.ENOENT, "No such file or directory", "output_dir")
    with pytest.raises(OSError) as caught, reworded(wording):
        raise system
    assert caught.value is system and describe(system) == "output_dir: No such file or directory"
    with pytest.raises(LoraMamlError, match="^output_dir$"), reworded({}):
        raise LoraMamlError("output_dir")


def test_sigterm_removes_a_half_written_output(tmp_path):
    """A SIGTERM in the middle of an atomic_dir write (e.g. `lora-maml merge` saving) exits with 143 and
    leaves neither the output nor its temporary directory; the previous SIGTERM handler is back."""
    before = signal.getsignal(signal.SIGTERM)

    def main(argv):
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "model.safetensors").write_bytes(b"\0" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)
        return 0

    with pytest.raises(SystemExit) as stop:
        run_main(main, [])
    assert stop.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before
