"""Prompt templates: plain ``{column}`` placeholders only (a foundation beside ``config``).

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


def template_problem(template: str, key: str = "data.template") -> str | None:
    """Why ``template`` is not a template of plain ``{column}`` placeholders, or None when it is one."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return (f"{key}={template!r} is not a valid template ({exc}); write placeholders as {{column}}, and literal "
                "braces as {{ }}")
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        raw = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if conversion or spec:
            return (f"{key}={template!r}: placeholder {raw} has a format spec or conversion; only plain "
                    f"{{column}} placeholders are allowed (write {{{name}}}, and literal braces as {{{{ }}}})")
        if not name.strip():
            return (f"{key}={template!r}: empty placeholder {{}}; name a column, e.g. {{text}} (literal braces: "
                    "{{ }})")
        if "{" in name or "}" in name:
            return (f"{key}={template!r}: nested braces in placeholder {raw}; only plain {{column}} placeholders "
                    "are allowed")
    return None


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
