"""Plain text files: one example per line, paragraph or file (``data.text_sample_by``), in a ``text`` column."""

from __future__ import annotations

import re
from pathlib import Path

from clmtune.data.readers.registry import Reader, ReadOptions, Rows, read_text, register_reader


def read_txt(path: Path, options: ReadOptions) -> Rows:
    # The same three units as datasets' "text" builder, without its on-disk cache (a copy of every file).
    text = read_text(path, options)
    if options.sample_by == "line":
        pieces = text.splitlines()
    elif options.sample_by == "paragraph":
        pieces = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    else:
        pieces = [text]
    return [{"text": p, "file": path.name} for p in pieces]


register_reader(Reader("text", (".txt",), read_txt, text_column="text"))
