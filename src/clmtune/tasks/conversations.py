"""Conversation data: Alpaca, ShareGPT and OpenAI ``messages`` rows -> one normal form.

Every conversation becomes a list of ``{"role": "system"|"user"|"assistant", "content": str}`` dicts: an
optional system prompt first, then user and assistant turns alternating, starting with the user and containing at
least one assistant turn. The three shapes read here (JSON, JSONL or Parquet; auto-detected, or forced with
``data.format``):

    alpaca    {"instruction", "input" (optional), "output", "system" (optional), "history": [[q, a], ...]}
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
    openai    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

Column names (and the role/content keys inside messages) can be mapped: ``columns={"instruction": "prompt"}`` reads
the file's ``prompt`` column as the instruction. Broken rows are not skipped: ``to_conversations`` raises one
``ClmtuneError`` whose single line names the rows of each problem and the fix. The one thing dropped is a final
user message with no reply (nothing to learn from it); those are counted in ``ConversationSet.dropped``.
Reading files is ``clmtune.data.conversations``' job; this module only normalises records.

The shapes are a registry (``CONVERSATION_FORMATS``): a new one is a ``convert(record, columns) -> messages``
function plus one ``register_conversation_format(...)`` line naming the columns that identify it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from clmtune.config.task_rules import CHAT_COLUMNS, CHAT_FORMATS
from clmtune.errors import ClmtuneError

ROLES = ("system", "user", "assistant")
DEFAULT_COLUMNS = CHAT_COLUMNS
"""Our field -> the file's column (``config.task_rules.CHAT_COLUMNS``, which ``data.columns`` is checked against)."""
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
"""Role names accepted in ShareGPT (``human``, ``gpt``) and OpenAI (``user``, ``assistant``) messages."""
_SHOW_ROWS = 5  # rows named per problem in an error message


@dataclass
class ConversationSet:
    """Normalised conversations, the format they were read as, and what was dropped (counted, never silently)."""

    conversations: list[list[dict[str, str]]]
    format: str
    rows: int
    row_numbers: list[int] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def turns(self) -> int:
        """Number of messages (system prompts included), the unit chatterbot-corpus counts in."""
        return sum(len(c) for c in self.conversations)


def _columns(columns: dict[str, str] | None) -> dict[str, str | None]:
    unknown = sorted(set(columns or {}) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ClmtuneError(f"data.columns has unknown field(s) {unknown}; map any of {sorted(DEFAULT_COLUMNS)} to "
                           "your file's column names")
    return {**DEFAULT_COLUMNS, **(columns or {})}


@dataclass(frozen=True)
class ConversationFormat:
    name: str
    fields: tuple[str, ...]
    """Our fields (``DEFAULT_COLUMNS`` keys) that must be columns of a row of this shape; they identify it."""
    convert: Callable[[dict[str, Any], dict[str, Any]], list[dict[str, str]] | None]
    """(record, column map) -> messages (``None``: the messages are not a list)."""
    title: str
    """How users know the shape (messages name it)."""


CONVERSATION_FORMATS: dict[str, ConversationFormat] = {}
"""Name -> shape, in the order ``detect_format`` tries them (the first whose fields are all columns wins)."""


def register_conversation_format(fmt: ConversationFormat) -> ConversationFormat:
    unknown = sorted(set(fmt.fields) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"conversation format {fmt.name!r}: fields {unknown} are not among {sorted(DEFAULT_COLUMNS)}")
    CONVERSATION_FORMATS[fmt.name] = fmt
    if fmt.name not in CHAT_FORMATS:
        CHAT_FORMATS.append(fmt.name)  # data.format is checked in config, below this registry
    return fmt


def conversation_formats() -> tuple[str, ...]:
    return tuple(CONVERSATION_FORMATS)


def detect_format(records: list[dict[str, Any]], columns: dict[str, str] | None = None, where: str = "data") -> str:
    """The first registered shape (``openai``, ``sharegpt``, ``alpaca``) whose columns the first record has."""
    cols = _columns(columns)
    keys = set(records[0]) if records else set()
    for fmt in CONVERSATION_FORMATS.values():
        if all(cols[f] in keys for f in fmt.fields):
            return fmt.name
    wanted = ", ".join(f"{' + '.join(repr(cols[f]) for f in fmt.fields)} ({fmt.title})"
                       for fmt in CONVERSATION_FORMATS.values())
    raise ClmtuneError(f"{where}: cannot tell the conversation format from the columns {sorted(keys)}; give "
                       f"{wanted}, map yours with data.columns, or set data.format")


def _plain(value: Any) -> Any:
    """Lists as lists: pandas reads Parquet list columns as numpy arrays."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _text(value: Any) -> str:
    """Message content as a string: OpenAI content parts are joined; None is empty."""
    if value is None:
        return ""
    value = _plain(value)
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in value)
    return value if isinstance(value, str) else str(value)


def _from_alpaca(rec: dict[str, Any], cols: dict[str, Any]) -> list[dict[str, str]]:
    msgs = []
    system = _text(rec.get(cols["system"]))
    if system.strip():
        msgs.append({"role": "system", "content": system})
    history = _plain(rec.get(cols["history"]))
    history = [] if history is None or (isinstance(history, float) and history != history) else history
    for pair in history:
        pair = _plain(pair)
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            msgs.append({"role": "history entry", "content": str(pair)})  # reported as an unknown role
            continue
        msgs += [{"role": "user", "content": _text(pair[0])}, {"role": "assistant", "content": _text(pair[1])}]
    instruction, extra = _text(rec.get(cols["instruction"])), _text(rec.get(cols["input"]))
    # LLaMA-Factory's and Alpaca's own convention: the input follows the instruction on a new line.
    user = "\n".join(p for p in (instruction, extra) if p.strip())
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec.get(cols["output"]))}]
    return msgs


def _from_messages(rec: dict[str, Any], key: str, cols: dict[str, Any]) -> list[dict[str, str]] | None:
    """OpenAI/ShareGPT messages: role and content under ``role``/``content`` or ``from``/``value``."""
    raw = _plain(rec.get(key))
    if not isinstance(raw, (list, tuple)):
        return None
    msgs = []
    for m in raw:
        if not isinstance(m, dict):
            msgs.append({"role": repr(m)[:20], "content": ""})
            continue
        role_key = cols["role"] or ("role" if "role" in m else "from")
        content_key = cols["content"] or ("content" if "content" in m else "value")
        role = str(m.get(role_key, "")).strip().lower()
        msgs.append({"role": ROLE_NAMES.get(role, role or "(none)"), "content": _text(m.get(content_key))})
    return msgs


def _problem(msgs: list[dict[str, str]] | None) -> str | None:
    """The first thing wrong with a conversation (a key of ``_FIXES``), or None."""
    if msgs is None:
        return "not a list"
    if any(m["role"] not in ROLES for m in msgs):
        return "unknown role"
    if any(not m["content"].strip() for m in msgs):
        return "empty message"
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            return "roles out of order"
    if not any(m["role"] == "assistant" for m in body):
        return "no assistant turn"
    return None


_FIXES = {
    "not a list": "give the messages as a list of {role, content} (ShareGPT: {from, value}) objects",
    "unknown role": "use the roles system, user, assistant (ShareGPT: system, human, gpt); remove tool/function "
                    "messages",
    "empty message": "give every message some text, or remove the empty message",
    "roles out of order": "start with an optional system message, then alternate user and assistant, starting "
                          "with the user (merge consecutive messages of one role)",
    "no assistant turn": "give every conversation at least one assistant reply (nothing is learned without one)",
}


def _rows(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_SHOW_ROWS])
    more = f" and {len(numbers) - _SHOW_ROWS} more" if len(numbers) > _SHOW_ROWS else ""
    return f"row{'s' if len(numbers) > 1 else ''} {shown}{more}"


def to_conversations(records: list[dict[str, Any]], fmt: str | None = None, columns: dict[str, str] | None = None,
                     numbers: Iterable[int] | None = None, where: str = "data") -> ConversationSet:
    """Normalise records of one format (``fmt=None``: detected); one error line listing every broken row."""
    numbers = list(numbers) if numbers is not None else list(range(1, len(records) + 1))
    cols = _columns(columns)
    if fmt is None:
        fmt = detect_format(records, columns, where)
    elif fmt not in CONVERSATION_FORMATS:
        raise ClmtuneError(f"data.format={fmt!r} is not a conversation format; use one of "
                           f"{', '.join(conversation_formats())}")
    shape = CONVERSATION_FORMATS[fmt]
    needed = [cols[f] for f in shape.fields]
    conversations, kept_numbers, problems = [], [], defaultdict(list)
    dropped = {"final_user_message": 0}
    for rec, n in zip(records, numbers):
        missing = [c for c in needed if c not in rec]
        if missing:
            raise ClmtuneError(f"{where} row {n} has no column {missing[0]!r} (it has {sorted(rec)}); data.format="
                               f"{fmt} needs {needed}: map your column names with data.columns or fix the row")
        msgs = shape.convert(rec, cols)
        if msgs and msgs[-1]["role"] == "user" and len(msgs) > 1:
            msgs = msgs[:-1]  # a question nobody answered teaches nothing; dropped and counted
            dropped["final_user_message"] += 1
        problem = _problem(msgs)
        if problem:
            problems[problem].append(n)
            continue
        conversations.append(msgs)
        kept_numbers.append(n)
    if problems:
        parts = [f"{_rows(rows)}: {what} ({_FIXES[what]})" for what, rows in problems.items()]
        raise ClmtuneError(f"{where} ({fmt}): " + "; ".join(parts))
    if not conversations:
        raise ClmtuneError(f"{where} has no conversations; give at least one row")
    return ConversationSet(conversations, fmt, len(records), kept_numbers, dropped)


register_conversation_format(ConversationFormat("openai", ("messages",),
                                                lambda rec, cols: _from_messages(rec, cols["messages"], cols), "OpenAI"))
register_conversation_format(ConversationFormat("sharegpt", ("conversations",),
                                                lambda rec, cols: _from_messages(rec, cols["conversations"], cols),
                                                "ShareGPT"))
register_conversation_format(ConversationFormat("alpaca", ("instruction", "output"), _from_alpaca, "Alpaca"))
