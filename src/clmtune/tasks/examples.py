"""Rows as examples (a foundation of ``data`` and ``tasks``): the ``Example`` record, the label set helpers and
the checks of template placeholders against a file's columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from clmtune.errors import ClmtuneError
from clmtune.templates import template_fields as _template_fields
from clmtune.templates import template_problem

if TYPE_CHECKING:
    from clmtune.tasks.base import Task

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""

SPLIT_ORDER = ("train", "eval", "test")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: ``role`` is ``system``, ``user`` or ``assistant``."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Conversation:
    """A normalised conversation: an optional system prompt, then user and assistant turns alternating, ending
    with an assistant reply (``tasks.conversations`` builds and checks them). Frozen, so equal conversations
    hash alike (duplicates are dropped by it)."""

    messages: tuple[Message, ...]

    @classmethod
    def from_dicts(cls, messages: Sequence[dict[str, str]]) -> "Conversation":
        return cls(tuple(Message(m["role"], m["content"]) for m in messages))

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as chat templates take them."""
        return [m.as_dict() for m in self.messages]

    @property
    def assistant_turns(self) -> int:
        return sum(m.role == "assistant" for m in self.messages)

    @property
    def last_user(self) -> str:
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    def split_last_reply(self) -> tuple[list[dict[str, str]], str]:
        """(messages up to the last user message, the last assistant reply): a held-out reply's prompt and
        reference."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return [m.as_dict() for m in self.messages[:last]], self.messages[last].content


@dataclass
class Example:
    """One row after prompt rendering. ``label`` is None for unlabelled rows and for ``sft``/``lm``/``chat``."""

    id: str
    prompt: str
    label: str | None
    text: str
    target: str | None = None
    """Words learned after the prompt: the label (classify), the response (sft), the whole text (lm, prompt '')."""
    conversation: Conversation | None = None
    """The whole conversation (chat); ``prompt`` and ``text`` are then its last user message."""

    @property
    def dedup_key(self) -> tuple:
        """Rows with equal keys are duplicates (``data.dedup`` keeps the first)."""
        return self.prompt, self.target, self.conversation

    @property
    def learnable(self) -> bool:
        """Has something to learn from: a target, a label or a conversation (unlabelled test rows have none)."""
        return self.target is not None or self.label is not None or self.conversation is not None


R = TypeVar("R")


def drop_oldest_turns(messages: Sequence[dict[str, str]], render: Callable[[list[dict[str, str]]], R],
                      length: Callable[[R], int], room: int | None, keep: int = 1) -> tuple[R, int]:
    """The one rule for fitting a conversation into ``room`` tokens, used by training, reply evaluation and the
    chat REPL alike: while ``render(messages)`` is longer than ``room``, leave out the oldest complete
    user+assistant pair after the system prompt (which always stays), until only ``keep`` messages after it are
    left. Returns (the last rendering, pairs left out); the caller decides what a rendering still too long
    means (dropped, cut, or refused)."""
    system = list(messages[:1]) if messages and messages[0]["role"] == "system" else []
    body = list(messages[len(system):])
    dropped = 0
    while True:
        out = render(system + body)
        if room is None or length(out) <= room or len(body) <= keep:
            return out, dropped
        body = body[2:]
        dropped += 1


@dataclass
class TaskData:
    """Everything the stages need from the data: splits of examples, the label set, and what was filtered."""

    train: list[Example]
    eval: list[Example]
    test: list[Example]
    labels: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    shape: "Task | None" = None
    """The task shape (``data.task``) the rows were read and rendered for: the stages that receive these examples
    ask it instead of looking the task up again."""


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
