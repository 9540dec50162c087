"""Reading conversation files: JSON (a list of objects), JSONL or Parquet, in any of the formats that
``clmtune.tasks.conversations`` normalises (Alpaca, ShareGPT, OpenAI ``messages``)."""

from __future__ import annotations

from pathlib import Path

from clmtune.data.readers import READERS, ReadOptions, read_records
from clmtune.data.sources import resolve_source, split_files
from clmtune.errors import ClmtuneError
from clmtune.tasks.conversations import ConversationSet, to_conversations


def load_conversations(path: str | Path, fmt: str | None = None, columns: dict[str, str] | None = None,
                       encoding: str = "utf-8") -> ConversationSet:
    """Read a JSON/JSONL/Parquet file of conversations in any of the three formats."""
    path = Path(path)
    if not path.is_file():
        raise ClmtuneError(f"{path}: no such file; give a .json, .jsonl or .parquet file of conversations")
    records, numbers = read_records(path, ReadOptions(encoding=encoding, nested=True))
    return to_conversations(records, fmt, columns, numbers, where=str(path))


def conversation_files(source: str) -> dict[str, Path]:
    """Split -> file of a conversation source: a file (``train``), a folder with ``train.*`` (+ ``dev.*``/
    ``validation.*``, ``test.*``) or ``builtin:chat/chatterbot-zh``."""
    path = resolve_source(source)
    if path.is_file():
        return {"train": path}
    suffixes = tuple(s for r in READERS.values() if r.read_nested is not None for s in r.suffixes)
    found = split_files(path, suffixes)
    if "train" not in found:
        names = ", ".join("train" + s for s in suffixes)
        raise ClmtuneError(f"data.source={source!r}: the folder has no train file ({names}); add one, or point "
                           "data.source at the conversation file")
    return found
