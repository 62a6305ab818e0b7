"""Every command the README and docs/ show still parses: its options exist and its config loads.

A documented command is a line of a fenced shell block (```` ```bash ````, ```` ```sh ````, ```` ```shell ````
or no language; ```` ```console ```` transcripts, ```` ```text ```` output and other languages are not
commands) that, after joining lines continued with a trailing backslash, dropping ``#`` comments and
leading ``VAR=value`` assignments, and splitting at ``&&``, ``||``, ``;`` and ``|``, starts with

* ``lora-maml COMMAND ...``: the recipe module of ``lora_maml.cli.COMMANDS[COMMAND]``;
* ``python recipes/X.py ...`` or ``python -m recipes.X ...`` (any ``python``/``python3``/``.../bin/python``);
* ``accelerate launch [launcher options] recipes/X.py ...`` or ``torchrun [launcher options] recipes/X.py ...``;
* ``python benchmarks/X.py ...``: parsed with the script's ``build_parser()`` when it has one, else skipped
  (tests/test_benchmarks_smoke.py runs the benchmarks).

Shell scripts (``bash recipes/run_*.sh``) are not commands here. A line holding a placeholder ``<...>`` is a
template and is skipped. Each command is parsed with its module's ``build_parser().parse_args(argv)``
(``--debug`` removed first, as ``lora_maml.errors.run_main`` does); a command with ``--config`` or
``--config-name`` also loads that config with its dotted overrides through ``lora_maml.config.load_config``,
which rejects unknown keys and impossible values. Nothing runs: paths need not exist.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_maml.cli import COMMANDS
from lora_maml.config import load_config, resolve_config_path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell"}
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "(", ")"}
RECIPE_SCRIPT = re.compile(r"^(?:\./)?recipes/(\w+)\.py$")
BENCHMARK_SCRIPT = re.compile(r"^(?:\./)?benchmarks/(\w+)\.py$")


@dataclass(frozen=True)
class Command:
    """One documented command: where it is, what it runs and the arguments its parser gets."""

    where: str  # "docs/training.md:42"
    text: str  # the (joined) line as documented
    kind: str  # "recipe" (a module with build_parser) or "benchmark" (a script path)
    target: str  # "recipes.fomaml_math", or "benchmarks/bench_meta_step.py"
    argv: tuple[str, ...]


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(1-based line number, logical line) of every shell fenced block, backslash continuations joined."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    language = ""
    pending: tuple[int, str] | None = None
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, language = match.group(1), match.group(2).lower()
            continue
        if match and match.group(1).startswith(fence[0]) and len(match.group(1)) >= len(fence) and not match.group(2):
            fence, pending = None, None
            continue
        if language not in SHELL_LANGUAGES:
            continue
        start, text = pending if pending else (number, "")
        text += line.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip() + " ")
            continue
        pending = None
        out.append((start, text))
    return out


def _segments(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;()")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    return [s for s in segments if s]


def _is_python(token: str) -> bool:
    return re.fullmatch(r"(?:.*/)?python(?:3(?:\.\d+)?)?", token) is not None


def _script_after_launcher(tokens: list[str]) -> int | None:
    """Index of the ``recipes/X.py`` a launcher (``accelerate launch``, ``torchrun``) runs."""
    for index, token in enumerate(tokens):
        if RECIPE_SCRIPT.match(token):
            return index
    return None


def parse_line(tokens: list[str]) -> tuple[str, str, list[str]] | None:
    """``(kind, target, argv)`` of one shell command's tokens, or None when it is not a documented program."""
    while tokens and ENV_ASSIGNMENT.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    head = tokens[0]
    if head == "lora-maml":
        if len(tokens) < 2 or tokens[1].startswith("-"):
            return None  # `lora-maml --help`
        command = tokens[1]
        if command not in COMMANDS:
            return ("unknown-command", command, tokens[2:])
        return ("recipe", COMMANDS[command][0], tokens[2:])
    if _is_python(head) and len(tokens) >= 2:
        if tokens[1] == "-m" and len(tokens) >= 3 and tokens[2].startswith("recipes."):
            return ("recipe", tokens[2], tokens[3:])
        if match := RECIPE_SCRIPT.match(tokens[1]):
            return ("recipe", f"recipes.{match.group(1)}", tokens[2:])
        if BENCHMARK_SCRIPT.match(tokens[1]):
            return ("benchmark", tokens[1].removeprefix("./"), tokens[2:])
        return None
    if (head == "accelerate" and tokens[1:2] == ["launch"]) or head == "torchrun":
        index = _script_after_launcher(tokens)
        if index is None:
            return None
        return ("recipe", f"recipes.{RECIPE_SCRIPT.match(tokens[index]).group(1)}", tokens[index + 1 :])
    return None


def extract_commands(markdown: str, name: str) -> list[Command]:
    """Every documented command of one markdown file (see the module docstring)."""
    commands = []
    for number, line in shell_lines(markdown):
        if PLACEHOLDER.search(line):
            continue
        for tokens in _segments(line):
            parsed = parse_line(tokens)
            if parsed is not None:
                kind, target, argv = parsed
                commands.append(Command(f"{name}:{number}", line, kind, target, tuple(argv)))
    return commands


def documented_commands() -> list[Command]:
    return [c for path in DOCS if path.exists() for c in extract_commands(path.read_text("utf-8"), path.relative_to(REPO).as_posix())]


class DocumentedCommandError(AssertionError):
    pass


def parse_with(parser: argparse.ArgumentParser, argv: list[str], what: str) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with argparse's exit turned into an error carrying its message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit as exit_:
        raise DocumentedCommandError(f"{what}: {stderr.getvalue().strip() or f'exit {exit_.code}'}") from None


def load_documented_config(args: argparse.Namespace) -> None:
    """Load the config a parsed command names (``--config`` / ``--config-name`` + overrides), as the
    program would: an unknown key or an impossible value raises ``ConfigError``."""
    config, config_name = getattr(args, "config", None), getattr(args, "config_name", None)
    if config is None and config_name is None:
        return
    path = resolve_config_path(config, config_name)
    if not path.is_absolute():
        path = REPO / path  # the docs' relative config paths are relative to the repository root
    load_config(path, list(getattr(args, "overrides", None) or []))


def recipe_parser(module_name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(module_name)
    build = getattr(module, "build_parser", None)
    if build is None:
        raise DocumentedCommandError(f"{module_name} has no build_parser()")
    return build()


def benchmark_parser(script: str) -> argparse.ArgumentParser | None:
    """The benchmark's ``build_parser()``, or None when it defines none (checked without importing)."""
    path = REPO / script
    if not path.is_file():
        raise DocumentedCommandError(f"{script}: no such script")
    tree = ast.parse(path.read_text("utf-8"))
    if not any(isinstance(node, ast.FunctionDef) and node.name == "build_parser" for node in tree.body):
        return None
    spec = importlib.util.spec_from_file_location(f"_documented_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def check_command(command: Command) -> None:
    """Parse ``command`` with its program's parser and load its config; raise on any mismatch."""
    what = f"{command.where}: `{command.text}`"
    argv = [a for a in command.argv if a != "--debug"]
    if command.kind == "unknown-command":
        raise DocumentedCommandError(f"{what}: lora-maml has no command {command.target!r} (known: {sorted(COMMANDS)})")
    if command.kind == "benchmark":
        parser = benchmark_parser(command.target)
        if parser is None:
            pytest.skip(f"{command.target} has no build_parser(); tests/test_benchmarks_smoke.py runs it")
    else:
        parser = recipe_parser(command.target)
    args = parse_with(parser, argv, what)
    try:
        load_documented_config(args)
    except ValueError as err:  # ConfigError is a ValueError
        raise DocumentedCommandError(f"{what}: {err}") from None


COMMANDS_IN_DOCS = documented_commands()


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text("utf-8")
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    assert [p for p in pages if f"(docs/{p}" not in readme] == []


def test_the_docs_document_every_command():
    found = {c.target for c in COMMANDS_IN_DOCS if c.kind == "recipe"}
    assert {module for module, _ in COMMANDS.values()} <= found


@pytest.mark.parametrize("command", COMMANDS_IN_DOCS, ids=[c.where for c in COMMANDS_IN_DOCS])
def test_documented_command_parses(command):
    check_command(command)


# --- the extractor and the checker themselves ---------------------------------------------------

SAMPLE = """
Text with `lora-maml eval --inline` is not a command.

```bash
# a comment
lora-maml prepare --source synthetic \\
    --output-dir ./data/synthetic   # trailing comment
OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 recipes/fomaml_math.py --config-name tiny_cpu trainer.total_steps=2
accelerate launch --config_file recipes/accelerate/4gpu.yaml recipes/sft_math.py --config x.yaml
python -m recipes.meta_vs_sft --tiny && python benchmarks/bench_padding.py --out p.json
lora-maml merge --model-path <run> --output <dir>
bash recipes/run_tiny_demo.sh
```

```console
$ lora-maml train --config-name qwen3_4b_math meta.inner_lrr=1e-4
```

```python
print("lora-maml eval --not-a-command")
```
"""


def test_extractor_joins_continuations_and_skips_placeholders_transcripts_and_scripts():
    commands = extract_commands(SAMPLE, "sample.md")
    assert [(c.where, c.kind, c.target, c.argv) for c in commands] == [
        ("sample.md:6", "recipe", COMMANDS["prepare"][0], ("--source", "synthetic", "--output-dir", "./data/synthetic")),
        ("sample.md:8", "recipe", "recipes.fomaml_math", ("--config-name", "tiny_cpu", "trainer.total_steps=2")),
        ("sample.md:9", "recipe", "recipes.sft_math", ("--config", "x.yaml")),
        ("sample.md:10", "recipe", "recipes.meta_vs_sft", ("--tiny",)),
        ("sample.md:10", "benchmark", "benchmarks/bench_padding.py", ("--out", "p.json")),
    ]


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    return parser


def test_a_bogus_option_fails_and_names_it():
    command = extract_commands("```bash\nlora-maml eval --model-path m --bogus-flag 3\n```\n", "bogus.md")[0]
    with pytest.raises(DocumentedCommandError, match="(?s)bogus.md:2: .*unrecognized arguments: --bogus-flag"):
        parse_with(_toy_parser(), list(command.argv), command.where)
    assert parse_with(_toy_parser(), ["--model-path", "m"], "ok").model_path == "m"
    # the same through a real program's parser
    real = extract_commands("```bash\nlora-maml eval --model-path m --data-dir d --output-dir o --bogus-flag\n```\n",
                            "real.md")[0]
    with pytest.raises(DocumentedCommandError, match="unrecognized arguments: --bogus-flag"):
        check_command(real)
    check_command(Command(real.where, real.text, real.kind, real.target, real.argv[:-1]))


def test_an_unknown_command_or_config_key_fails():
    unknown = extract_commands("```bash\nlora-maml no-such-command --x\n```\n", "unknown.md")[0]
    with pytest.raises(DocumentedCommandError, match="no command 'no-such-command'"):
        check_command(unknown)
    args = parse_with(_toy_parser(), ["--model-path", "m", "--config", "recipes/configs/tiny_cpu.yaml",
                                      "meta.inner_lrr=1e-4"], "typo")
    with pytest.raises(ValueError, match=r"meta\.inner_lrr: unknown key"):
        load_documented_config(args)
    load_documented_config(parse_with(_toy_parser(), ["--model-path", "m", "--config", "recipes/configs/tiny_cpu.yaml",
                                                      "trainer.total_steps=2"], "ok"))
