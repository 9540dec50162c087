"""Reading conversation files: JSON (a list of objects), JSONL or Parquet, in any of the formats that
``clmtune.tasks.conversations`` normalises (Alpaca, ShareGPT, OpenAI ``messages``)."""

from __future__ import annotations

from pathlib import Path

from clmtune.data.records import read_records
from clmtune.data.sources import resolve_source, split_files
from clmtune.errors import ClmtuneError
from clmtune.tasks.conversations import ConversationSet, to_conversations

CONVERSATION_SUFFIXES = (".json", ".jsonl", ".parquet")


def load_conversations(path: str | Path, fmt: str | None = None, columns: dict[str, str] | None = None,
                       encoding: str = "utf-8") -> ConversationSet:
    """Read a JSON/JSONL/Parquet file of conversations in any of the three formats."""
    path = Path(path)
    if not path.is_file():
        raise ClmtuneError(f"{path}: no such file; give a .json, .jsonl or .parquet file of conversations")
    records, numbers = read_records(path, encoding)
    return to_conversations(records, fmt, columns, numbers, where=str(path))


def conversation_files(source: str) -> dict[str, Path]:
    """Split -> file of a conversation source: a file (``train``), a folder with ``train.*`` (+ ``dev.*``/
    ``validation.*``, ``test.*``) or ``builtin:chat/chatterbot-zh``."""
    path = resolve_source(source)
    if path.is_file():
        return {"train": path}
    found = split_files(path, CONVERSATION_SUFFIXES)
    if "train" not in found:
        raise ClmtuneError(f"data.source={source!r}: the folder has no train.json, train.jsonl or train.parquet")
    return found
