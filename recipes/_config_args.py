"""The command line the training recipes share: ``--config PATH | --config-name NAME`` and dotted overrides.

Not a program: ``recipes/fomaml_math.py`` and ``recipes/sft_math.py`` build their parsers with it.
"""

from __future__ import annotations

import argparse

from lora_maml.config import Config, load_config, resolve_config_path


def config_parser(description: str) -> argparse.ArgumentParser:
    """A parser of ``--config PATH | --config-name NAME`` followed by ``key.sub=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", help="YAML config file")
    group.add_argument("--config-name", help="a config in recipes/configs/, e.g. qwen3_4b_math")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.total_steps=10")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config of parsed :func:`config_parser` arguments; raises ``ConfigError`` (the
    command line prints it as one ``error:`` line, exit code 2)."""
    return load_config(resolve_config_path(args.config, args.config_name), args.overrides)
