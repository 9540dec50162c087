"""Command line: a thin map from arguments to the stage functions. Only this package parses arguments and
decides exit codes: 0 success, 2 a user error (one line on stderr; ``--debug`` shows the traceback).

Each subcommand is a ``Command`` (``command``): its name, a builder that adds its parser and arguments, and the
function that runs it; ``training`` (train, prepare, eval), ``generation`` (generate, chat) and ``delivery``
(export, serve, report, ui) hold them, and ``COMMANDS`` lists them in the order ``--help`` shows."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from clmtune.cli import delivery, generation, training
from clmtune.cli.command import Command
from clmtune.cli.training import memory_line  # noqa: F401  (re-exported)
from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")

COMMANDS: dict[str, Command] = {c.name: c for c in (*training.COMMANDS, *generation.COMMANDS, *delivery.COMMANDS)}
"""The subcommands, in the order ``clmtune --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clmtune", description="Fine-tune decoder-only language models with LoRA and other PEFT methods, then "
        "evaluate, generate, chat, serve (OpenAI-compatible), export and report. Start with `clmtune train` (a "
        "built-in example) or `clmtune prepare --data.source FILE` to check your data; `clmtune COMMAND --help` "
        "for each command.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not COMMANDS[args.command].overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "prepare":  # tokenizing is all prepare does: let the fast tokenizer use every core
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from clmtune.console import setup_console

    setup_console(args.debug)
    try:
        return COMMANDS[args.command].run(args, extra)
    except ClmtuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"clmtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clmtune: interrupted", file=sys.stderr)
        return 130
