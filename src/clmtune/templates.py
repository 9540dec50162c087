"""Prompt templates: plain ``{column}`` placeholders only (a foundation beside ``config``, which checks them:
``config.task_rules.template_problem``).

``str.format`` would evaluate format specs, conversions and field access: ``{text:>99999999}`` builds gigabytes of
padding, ``{text:{label}}`` and ``{review.text}`` crash. clmtune's templates only substitute columns, so they are
parsed with ``string.Formatter().parse`` (which also turns ``{{``/``}}`` into literal braces) and filled by
concatenation; everything between the braces is the column's name, spaces and dots included (``{review.text}``
is the column named ``review.text``).
"""

from __future__ import annotations

import functools
import string
from typing import Mapping

from clmtune.config.task_rules import template_problem  # noqa: F401  (checked where config is validated)


def template_fields(template: str) -> list[str]:
    """Column names used by ``template``, in order (check it first with ``template_problem``)."""
    return [name for _, name in _parts(template) if name is not None]


@functools.lru_cache(maxsize=64)
def _parts(template: str) -> tuple[tuple[str, str | None], ...]:
    return tuple((literal, name) for literal, name, _, _ in string.Formatter().parse(template))


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """``template`` with every ``{column}`` replaced by ``values[column]``; nothing is evaluated."""
    out = []
    for literal, name in _parts(template):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)
