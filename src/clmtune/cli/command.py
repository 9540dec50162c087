"""One subcommand of ``clmtune``: its name, the builder that adds its arguments, and the function that runs it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    name: str
    add: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
    """Adds the subcommand's parser (``sub.add_parser(name, ...)``) and its arguments."""
    run: Callable[[argparse.Namespace, list[str]], int]
    """Runs it: the parsed arguments and the ``--section.key VALUE`` overrides; returns the exit code."""
    overrides: bool = False
    """Takes ``--section.key VALUE`` config overrides (other commands refuse unknown arguments)."""
