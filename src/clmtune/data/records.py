"""Reading records that may differ in their optional keys and hold nested lists (conversations): JSON (a list of
objects), JSONL or Parquet. Below both ``sources`` (``read_table(nested=True)``) and ``conversations``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clmtune.errors import ClmtuneError


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
