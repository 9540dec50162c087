"""Parquet files: columns as written; struct columns flattened to ``column.field`` (nested: kept as records)."""

from __future__ import annotations

import logging
from pathlib import Path

from clmtune.data.readers.registry import Reader, ReadOptions, Rows, register_reader
from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")


def unreadable(path: Path, exc: Exception) -> ClmtuneError:
    return ClmtuneError(f"{path} is not a readable Parquet file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); check that the file is complete, or export it again")


def flatten_structs(df, path: Path):
    """Parquet struct columns as one column per field, named ``column.field`` (as ``pandas.json_normalize``):
    read as they are, a template would fill ``{column}`` with the Python repr of a dict and train on it."""
    import pandas as pd

    for col in list(df.columns):
        values = df[col].dropna()
        if not len(values) or not values.map(lambda v: isinstance(v, dict)).all():
            continue
        flat = pd.json_normalize([v if isinstance(v, dict) else {} for v in df[col]], sep=".").add_prefix(f"{col}.")
        flat.index = df.index
        at = df.columns.get_loc(col)
        df = pd.concat([df.iloc[:, :at], flat, df.iloc[:, at + 1:]], axis=1)
        log.info("%s: struct column %r read as %s", path, col, ", ".join(flat.columns))
    return df


def read_parquet(path: Path, options: ReadOptions) -> Rows:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise unreadable(path, exc) from None
    df.columns = [str(c) for c in df.columns]
    return flatten_structs(df, path).to_dict(orient="records")


def read_parquet_records(path: Path, options: ReadOptions) -> tuple[Rows, list[int]]:
    """Nested lists stay Python lists (pyarrow's ``to_pylist``), not the numpy arrays pandas makes of them."""
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise unreadable(path, exc) from None
    return records, list(range(1, len(records) + 1))


register_reader(Reader("parquet", (".parquet",), read_parquet, read_parquet_records))
