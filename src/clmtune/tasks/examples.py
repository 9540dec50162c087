"""Rows as examples (a foundation of ``data`` and ``tasks``): the ``Example`` record, the label set helpers and
the checks of template placeholders against a file's columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clmtune.errors import ClmtuneError
from clmtune.templates import template_fields as _template_fields
from clmtune.templates import template_problem

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""

SPLIT_ORDER = ("train", "eval", "test")


@dataclass
class Example:
    """One row after prompt rendering. ``label`` is None for unlabelled rows and for ``sft``/``lm``."""

    id: str
    prompt: str
    label: str | None
    text: str
    target: str | None = None
    """Words learned after the prompt: the label (classify), the response (sft), the whole text (lm, prompt '')."""


@dataclass
class TaskData:
    """Everything the stages need from the data: splits of examples, the label set, and what was filtered."""

    train: list[Example]
    eval: list[Example]
    test: list[Example]
    labels: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def normalize_label(value: Any) -> str:
    """RAFT writes label names with underscores; the model learns words (``no_complaint`` -> ``no complaint``)."""
    return str(value).replace("_", " ").strip()


def template_fields(template: str, key: str = "data.template") -> list[str]:
    """Column names of a template of plain ``{column}`` placeholders (anything else is an error)."""
    if problem := template_problem(template, key):
        raise ClmtuneError(problem)
    return _template_fields(template)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"))  # zero-width, soft hyphen


def is_blank(text: str) -> bool:
    """Nothing visible: only whitespace and zero-width characters (U+200B..U+200D, U+2060, U+FEFF)."""
    return not text.translate(_INVISIBLE).strip()


def cell_text(value: Any, column: str = "") -> str:
    """A cell as text; a list or mapping (a Parquet/JSON column of structs or arrays) is refused, not turned into
    its Python repr."""
    if is_missing(value):
        return ""
    if isinstance(value, (dict, list, tuple)) or type(value).__name__ == "ndarray":
        kind = "mappings" if isinstance(value, dict) else "lists"
        raise ClmtuneError(f"column {column!r} holds {kind}, not text (e.g. {str(value)[:60]!r}); use a text column, "
                           "or one of its fields as its own column")
    text = str(value)
    return "" if is_blank(text) else text  # a cell of zero-width characters is empty: counted and dropped as such


def row_name(where: str, i: int) -> str:
    """Human name of row i: the line number for CSV/TSV (header is line 1), else the record number."""
    return f"line {i + 2}" if where.lower().endswith((".csv", ".tsv")) else f"row {i + 1}"


def map_label(value: Any, labels: list[str], where: str) -> str:
    """A label cell -> a label name: the name itself, or (integers) the name at that position of ``labels``."""
    name = normalize_label(value)
    if name in labels:
        return name
    k = None
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, float) and value.is_integer():
        k = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        k = int(value)
    if k is not None and 0 <= k < len(labels):
        return labels[k]
    shown = labels if len(labels) <= 12 else [*labels[:10], f"... {len(labels) - 10} more"]
    raise ClmtuneError(f"{where}: label {str(value)[:80]!r} is not in the label set of {len(labels)} label(s) "
                       f"{shown} (nor a position 0..{len(labels) - 1} in it); add it to data.labels or fix the row")


def check_columns(key: str, names: list[str], columns: list[str], where: str, what: str = "placeholder(s)") -> None:
    missing = [f for f in dict.fromkeys(names) if f not in columns]
    if missing:
        raise ClmtuneError(f"{key} uses {what} {missing} that {where} does not have as column(s) "
                           f"(columns: {columns}); fix {key} or the file")
