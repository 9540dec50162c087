"""The registry of file readers: a suffix (``.csv``) -> the ``Reader`` that turns such a file into rows.

A reader is one function ``read(path, options) -> list[dict]`` (one dict per example, values as written) and,
for formats that can hold conversations, ``read_nested(path, options) -> (records, row numbers)`` (records that may
differ in their optional keys and hold lists). Adding a format is one module with that function plus one
``register_reader(...)`` call (``clmtune.data.readers`` imports the shipped ones). Every read error is one
``ClmtuneError`` line naming the file, the line when one is known, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clmtune.errors import ClmtuneError

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class ReadOptions:
    """How to read a file (the ``data`` settings that concern reading)."""

    delimiter: str | None = None
    encoding: str = "utf-8"
    sample_by: str = "line"
    """``.txt``: one example per ``line``, ``paragraph`` or ``document``."""
    nested: bool = False
    """Read records that may hold lists and differ in optional keys (conversations), where the format can."""
    encoding_key: str | None = "data.encoding"
    """The setting that names the encoding, for messages (``None``: there is none to set, e.g. a prompts file)."""


@dataclass(frozen=True)
class Reader:
    name: str
    suffixes: tuple[str, ...]
    read: Callable[[Path, ReadOptions], Rows]
    read_nested: Callable[[Path, ReadOptions], tuple[Rows, list[int]]] | None = None
    text_column: str | None = None
    """The column that holds the text when the user names none (``.txt``: ``text``); ``None`` for tables."""


READERS: dict[str, Reader] = {}
"""Reader name -> reader, in registration order (a later registration of a suffix wins)."""


def register_reader(reader: Reader) -> Reader:
    if not reader.suffixes or not all(s.startswith(".") and s == s.lower() for s in reader.suffixes):
        raise ValueError(f"reader {reader.name!r}: suffixes must be lower-case and start with '.' ({reader.suffixes})")
    READERS[reader.name] = reader
    return reader


def known_suffixes() -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for r in READERS.values() for s in r.suffixes))


def find_reader(path: Path) -> Reader | None:
    suffix = path.suffix.lower()
    hits = [r for r in READERS.values() if suffix in r.suffixes]
    return hits[-1] if hits else None


def reader_for(path: Path, what: str = "a data file") -> Reader:
    reader = find_reader(path)
    if reader is None:
        raise ClmtuneError(f"{path}: unsupported file type {path.suffix.lower() or '(no suffix)'!r} for {what}; use "
                           f"{', '.join(known_suffixes())}")
    return reader


# ----------------------------------------------------------------------------------------------------------------
# Pieces the readers share


def first_undecodable_line(path: Path, encoding: str) -> tuple[int, int] | None:
    """(1-based line, 0-based byte offset in the file) of the first byte that does not decode (lines split on
    b'\\n', safe for UTF-8 and GBK)."""
    offset = 0
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                return n, offset + exc.start
            offset += len(line)
    return None


def encoding_error(path: Path, options: ReadOptions) -> ClmtuneError:
    """One line: where the file stops being ``options.encoding`` and how to fix it."""
    encoding, key = options.encoding, options.encoding_key
    with open(path, "rb") as fh:
        head = fh.read(4)
    for bom, name in ((b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)")):
        if head.startswith(bom) and not head.startswith(b"\xff\xfe\x00\x00"):
            fix = f"set {key}: utf-16, or save it as UTF-8" if key else "save it as UTF-8"
            return ClmtuneError(f"{path} is {name} text (it starts with a byte-order mark), not {encoding}; {fix}")
    found = first_undecodable_line(path, encoding)
    where = f"line {found[0]} (byte offset {found[1]})" if found else "somewhere"
    fix = f" or set {key} to its encoding (e.g. gbk)" if key else ""
    return ClmtuneError(f"{path} is not {encoding}: {where} has bytes that are not valid {encoding}; convert the file "
                        f"(e.g. `iconv -f gbk -t utf-8`){fix}")


def read_text(path: Path, options: ReadOptions) -> str:
    try:
        return path.read_text(encoding=options.encoding)
    except UnicodeDecodeError:
        raise encoding_error(path, options) from None


def check_records(records: list, path: Path, unit: str) -> None:
    """Every record is an object (a JSON list of strings is not a table)."""
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise ClmtuneError(f"{path} {unit} {n} is a {type(rec).__name__}, not an object; write one "
                               '{"column": value, ...} object per example')
