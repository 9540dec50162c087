"""CSV and TSV files: one row per line (a quoted cell may span lines), a header line naming the columns."""

from __future__ import annotations

import csv
from pathlib import Path

from clmtune.data.readers.registry import Reader, ReadOptions, Rows, encoding_error, register_reader
from clmtune.errors import ClmtuneError


def delimiter_hint(path: Path, sep: str, encoding: str) -> str:
    """' ; line 1 has no ',' but 2 '\\t': set data.delimiter ...' when the header suggests another delimiter."""
    try:
        with open(path, encoding=encoding, errors="replace") as fh:
            header = fh.readline()
    except OSError:
        return ""
    counts = {d: header.count(d) for d in ("\t", ",", ";", "|") if d != sep}
    best = max(counts, key=counts.get)
    if header.count(sep) == 0 and counts[best] > 0:
        return (f"; line 1 has no {sep!r} but {counts[best]} {best!r}: set data.delimiter: {best!r}"
                + (" (or name a tab-separated file .tsv)" if best == "\t" else ""))
    return ""


def read_delimited(path: Path, options: ReadOptions) -> Rows:
    import pandas as pd  # imported here: pandas costs ~0.3 s and only file reading needs it

    encoding = options.encoding
    sep = options.delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    # Tab-separated files are read without quoting (the GLUE/CLUE convention; CLUE's ChnSentiCorp train.tsv has
    # texts with unbalanced '"' that would otherwise swallow the next lines: 9,146 rows read instead of 9,600).
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    try:
        # dtype=str + keep_default_na=False: values stay exactly as written ("" for an empty cell, "NA" is text).
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding=encoding, quoting=quoting)
    except UnicodeDecodeError:
        raise encoding_error(path, options) from None
    except (ValueError, pd.errors.ParserError) as exc:
        if "EOF inside string" in str(exc):
            check_quotes(path, sep, encoding)
        msg = str(exc).strip().splitlines()[-1]
        hint = delimiter_hint(path, sep, encoding) or "; check data.delimiter (quote fields that contain it)"
        raise ClmtuneError(f"{path} could not be parsed with delimiter {sep!r} ({msg}){hint}") from None
    df.columns = [str(c) for c in df.columns]
    check_header(path, sep, encoding, quoting)
    multiline = len(df) and df.apply(lambda col: col.str.contains("\n", regex=False)).any(axis=None)
    if quoting != csv.QUOTE_NONE and multiline:
        check_quotes(path, sep, encoding, categories(df))  # only a quoted cell spans lines: check the quotes
    if df.empty:
        raise ClmtuneError(f"{path} has a header line ({', '.join(df.columns)}) but no rows; add rows or fix the path")
    if len(df.columns) == 1:
        hint = delimiter_hint(path, sep, encoding)
        if hint:
            raise ClmtuneError(f"{path}: read a single column {df.columns[0]!r} with delimiter {sep!r}{hint}")
    return df.to_dict(orient="records")


def check_header(path: Path, sep: str, encoding: str, quoting: int) -> None:
    """pandas renames a repeated column to ``name.1``: a template would silently read the first one."""
    with open(path, encoding=encoding, newline="") as fh:
        header = next(csv.reader(fh, delimiter=sep, quoting=quoting), [])
    dups = sorted({c for c in header if header.count(c) > 1})
    if dups:
        raise ClmtuneError(f"{path}: column name(s) {dups} appear more than once in the header line; give every "
                           "column its own name")


def categories(df) -> tuple[int, dict[int, set[str]]]:
    """(number of columns, {column index: its values}) for the columns with few distinct values (labels)."""
    cats = {}
    for j, c in enumerate(df.columns):
        values = set(df[c])
        if len(values) <= 20 and len(values) * 2 <= len(df):
            cats[j] = values
    return len(df.columns), cats


def looks_like_row(line: str, sep: str, shape: tuple[int, dict[int, set[str]]] | None) -> bool:
    """A line inside a cell that splits into as many fields as the file has columns, with every label-like field
    holding one of that column's values: most likely a row swallowed by an unclosed quote."""
    if shape is None or not shape[1]:
        return False
    fields = line.split(sep)
    return len(fields) == shape[0] and all(fields[j] in values for j, values in shape[1].items())


def check_quotes(path: Path, sep: str, encoding: str, shape: tuple[int, dict[int, set[str]]] | None = None) -> None:
    """An unbalanced ``"`` makes a CSV reader swallow the following lines into one cell (rows merged silently).
    The file is read again with the standard library's strict reader, which stops at malformed quoting; a cell
    that still holds whole lines looking like rows (``looks_like_row``) is reported too."""
    with open(path, encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=sep, strict=True)
        start = 1
        try:
            for record in reader:
                for cell in record:
                    inner = [line for line in cell.split("\n")[1:] if looks_like_row(line, sep, shape)]
                    if inner:
                        raise ClmtuneError(
                            f"{path} line {start}: a quoted cell runs over lines {start}-{reader.line_num} and "
                            f"holds lines that look like rows ({inner[0][:40]!r}): a '\"' is probably not closed, "
                            "so rows were merged into one cell; close the quote or double it (\"\") inside a cell")
                start = reader.line_num + 1
        except csv.Error as exc:
            raise ClmtuneError(f"{path} line {start}: a quote ('\"') opened here is not closed properly ({exc}, "
                               f"line {reader.line_num}), so the following rows would be merged into one cell; "
                               "close the quote, or double a quote inside a quoted cell (\"\")") from None


register_reader(Reader("csv", (".csv", ".tsv"), read_delimited))
