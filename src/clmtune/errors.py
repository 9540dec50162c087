"""User-facing errors.

A ``ClmtuneError`` carries a message meant for the person at the terminal: it names the bad value and the fix.
Library code raises it; only the CLI decides to print it as one line and exit with status 2.
"""

from __future__ import annotations


class ClmtuneError(Exception):
    """An error caused by the user's input (config, files, arguments), not by a bug in clmtune."""


class ConfigError(ClmtuneError):
    """One or more invalid config values; every problem found is listed, not just the first."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = f"invalid config: {self.problems[0]}"
        else:
            msg = "invalid config (%d problems): %s" % (len(self.problems), "; ".join(self.problems))
        super().__init__(msg)
