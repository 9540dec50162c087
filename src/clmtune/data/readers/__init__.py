"""File readers by suffix (a registry): CSV/TSV, JSON/JSONL, Parquet, TXT.

``read_table(path, options)`` reads any registered format into rows; ``read_records`` reads the formats that can
hold conversations into records that may differ in their optional keys. A new format is one module with a
``read(path, options) -> rows`` function and one ``register_reader(Reader(name, suffixes, read))`` call, imported
below (or anywhere before the data is read: a plug-in module may register its own).
"""

from __future__ import annotations

from pathlib import Path

from clmtune.data.readers.registry import (READERS, Reader, ReadOptions, Rows, encoding_error, find_reader,
                                           known_suffixes, reader_for, register_reader)
from clmtune.data.readers import delimited, jsonrows, parquet, text  # noqa: F401  (each registers its reader)
from clmtune.errors import ClmtuneError


def check_not_empty(path: Path) -> None:
    size = path.stat().st_size if path.is_file() else None
    if size is not None and (size == 0 or (size < 4096 and not path.read_bytes().strip())):
        raise ClmtuneError(f"{path} is empty ({size} bytes); fill it or point to the right file")


def read_table(path: Path, options: ReadOptions | None = None) -> Rows:
    """A file of any registered format as a list of row dicts (values kept as written). With ``options.nested``
    a format that can hold conversations gives records (see ``read_records``)."""
    options = options or ReadOptions()
    path = Path(path)
    reader = reader_for(path)
    check_not_empty(path)
    if options.nested and reader.read_nested is not None:
        return reader.read_nested(path, options)[0]
    return reader.read(path, options)


def read_records(path: Path, options: ReadOptions | None = None) -> tuple[Rows, list[int]]:
    """(records, the row number of each: JSONL its line) of a file whose format can hold nested records
    (conversations: optional keys such as ``system``/``history`` differ from row to row, lists stay lists)."""
    path = Path(path)
    reader = find_reader(path)
    nested = [s for r in READERS.values() if r.read_nested is not None for s in r.suffixes]
    if reader is None or reader.read_nested is None:
        raise ClmtuneError(f"{path}: conversations are read from {', '.join(nested)} files, not "
                           f"{path.suffix.lower() or '(no suffix)'!r}; convert the file to one of them")
    check_not_empty(path)
    return reader.read_nested(path, options or ReadOptions(nested=True))


__all__ = ["READERS", "ReadOptions", "Reader", "Rows", "encoding_error", "find_reader", "known_suffixes",
           "read_records", "read_table", "reader_for", "register_reader"]
