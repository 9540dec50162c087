"""Reading conversation files: JSON (a list of objects), JSONL or Parquet, in any of the formats that
``clmtune.tasks.conversations`` normalises (Alpaca, ShareGPT, OpenAI ``messages``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clmtune.data.sources import resolve_source, split_files
from clmtune.errors import ClmtuneError
from clmtune.tasks.conversations import ConversationSet, to_conversations

CONVERSATION_SUFFIXES = (".json", ".jsonl", ".parquet")


def read_records(path: Path, encoding: str = "utf-8") -> tuple[list[dict[str, Any]], list[int]]:
    """Records of a JSON (list of objects), JSONL or Parquet file and the row number of each (JSONL: its line).

    Hand-written rather than ``sources.read_table``: conversation records legitimately differ in their optional
    keys (``system``, ``history``), which read_table refuses, and Parquet's nested lists must stay Python lists
    (pyarrow's ``to_pylist``), not the numpy arrays pandas makes of them.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise ClmtuneError(f"{path} is not a readable Parquet file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]})") from None
        numbers = list(range(1, len(records) + 1))
    elif suffix in (".json", ".jsonl"):
        try:
            text = path.read_text(encoding=encoding)
        except UnicodeDecodeError:
            raise ClmtuneError(f"{path} is not {encoding}; convert it to UTF-8 or set data.encoding") from None
        if suffix == ".jsonl":
            records, numbers = [], []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ClmtuneError(f"{path} line {n} is not valid JSON ({exc.msg}); a .jsonl file holds one "
                                       "JSON object per line") from None
                numbers.append(n)
        else:
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ClmtuneError(f"{path} line {exc.lineno} is not valid JSON ({exc.msg}); if it holds one "
                                   "object per line, name it .jsonl") from None
            if not isinstance(records, list):
                raise ClmtuneError(f"{path} holds a JSON {type(records).__name__}; give a list of conversation "
                                   "objects")
            numbers = list(range(1, len(records) + 1))
    else:
        raise ClmtuneError(f"{path}: conversations are read from .json, .jsonl or .parquet files, not {suffix!r}")
    for rec, n in zip(records, numbers):
        if not isinstance(rec, dict):
            raise ClmtuneError(f"{path} row {n} is a {type(rec).__name__}, not an object; write one object per "
                               "conversation")
    return records, numbers


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
