"""Reading sources into rows: files, split folders, RAFT folders, ``.txt`` folders, Hugging Face datasets.

Everything here returns plain rows (``list[dict]``, one dict per example, values as written) per split; prompts,
labels and tokens are the business of ``clmtune.data``. Every read error names the file, the line when one is
known, and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from clmtune.config import DataConfig
from clmtune.data.records import read_records
from clmtune.errors import ClmtuneError
from clmtune.tasks import get_task

log = logging.getLogger("clmtune")

BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf:"
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
# File stems that name a split inside a folder source, in order of preference.
SPLIT_STEMS = {"train": ("train",), "eval": ("dev", "validation", "valid", "eval"), "test": ("test", "test_unlabeled")}
# HF DatasetDict split names -> ours.
HF_SPLITS = {"train": "train", "validation": "eval", "dev": "eval", "valid": "eval", "test": "test"}


def assets_path(relative: str) -> Path:
    """Path of a file or folder shipped inside the package (``src/clmtune/assets``)."""
    return Path(str(resources.files("clmtune") / "assets" / relative))


def resolve_source(source: str) -> Path:
    """``builtin:raft/twitter_complaints`` -> the shipped folder; anything else is a local path."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        path = assets_path(name)
        if not name or not path.exists():
            raise ClmtuneError(f"data.source={source!r}: clmtune ships no data set named {name!r} (shipped: "
                               "builtin:raft/twitter_complaints, builtin:raft/banking_77, "
                               "builtin:chnsenticorp/ChnSentiCorp_htl_all.csv, builtin:chat/chatterbot-zh)")
        return path
    path = Path(source).expanduser()
    if not path.exists() and path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13
            raise ClmtuneError(f"data.source={source!r} is a symbolic link that loops (it points back to itself); "
                               "point it at the data file") from None
        except OSError as exc:
            why = "loops (it points back to itself)" if exc.errno == errno.ELOOP else \
                f"points to {os.readlink(path)!r}, which does not exist"
            raise ClmtuneError(f"data.source={source!r} is a symbolic link that {why}; point it at the data "
                               "file") from None
    if not path.exists():
        raise ClmtuneError(f"data.source={source!r}: no such file or folder (give a CSV/TSV/JSON/JSONL/Parquet/TXT "
                           "file, a folder of split files or .txt files, or hf:NAME for a Hugging Face dataset)")
    return path


# ----------------------------------------------------------------------------------------------------------------
# One file -> rows


def _first_undecodable_line(path: Path, encoding: str) -> tuple[int, int] | None:
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


def _encoding_error(path: Path, encoding: str) -> ClmtuneError:
    with open(path, "rb") as fh:
        head = fh.read(4)
    for bom, name in ((b"\xff\xfe", "UTF-16 (little-endian)"), (b"\xfe\xff", "UTF-16 (big-endian)")):
        if head.startswith(bom) and not head.startswith(b"\xff\xfe\x00\x00"):
            return ClmtuneError(f"{path} is {name} text (it starts with a byte-order mark), not {encoding}; set "
                                "data.encoding: utf-16, or save it as UTF-8")
    found = _first_undecodable_line(path, encoding)
    where = f"line {found[0]} (byte offset {found[1]})" if found else "somewhere"
    return ClmtuneError(f"{path} is not {encoding}: {where} has bytes that are not valid {encoding}; convert the file "
                        f"(e.g. `iconv -f gbk -t utf-8`) or set data.encoding to its encoding (e.g. gbk)")


def _delimiter_hint(path: Path, sep: str, encoding: str) -> str:
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


def _read_csv(path: Path, delimiter: str | None, encoding: str) -> list[dict[str, Any]]:
    import pandas as pd  # imported here: pandas costs ~0.3 s and only file reading needs it

    sep = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    # Tab-separated files are read without quoting (the GLUE/CLUE convention; CLUE's ChnSentiCorp train.tsv has
    # texts with unbalanced '"' that would otherwise swallow the next lines: 9,146 rows read instead of 9,600).
    quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    try:
        # dtype=str + keep_default_na=False: values stay exactly as written ("" for an empty cell, "NA" is text).
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding=encoding, quoting=quoting)
    except UnicodeDecodeError:
        raise _encoding_error(path, encoding) from None
    except (ValueError, pd.errors.ParserError) as exc:
        if "EOF inside string" in str(exc):
            _check_quotes(path, sep, encoding)
        msg = str(exc).strip().splitlines()[-1]
        hint = _delimiter_hint(path, sep, encoding) or "; check data.delimiter (quote fields that contain it)"
        raise ClmtuneError(f"{path} could not be parsed with delimiter {sep!r} ({msg}){hint}") from None
    df.columns = [str(c) for c in df.columns]
    _check_header(path, sep, encoding, quoting)
    multiline = len(df) and df.apply(lambda col: col.str.contains("\n", regex=False)).any(axis=None)
    if quoting != csv.QUOTE_NONE and multiline:
        _check_quotes(path, sep, encoding, _categories(df))  # only a quoted cell spans lines: check the quotes
    if df.empty:
        raise ClmtuneError(f"{path} has a header line ({', '.join(df.columns)}) but no rows; add rows or fix the path")
    if len(df.columns) == 1:
        hint = _delimiter_hint(path, sep, encoding)
        if hint:
            raise ClmtuneError(f"{path}: read a single column {df.columns[0]!r} with delimiter {sep!r}{hint}")
    return df.to_dict(orient="records")


def _check_header(path: Path, sep: str, encoding: str, quoting: int) -> None:
    """pandas renames a repeated column to ``name.1``: a template would silently read the first one."""
    with open(path, encoding=encoding, newline="") as fh:
        header = next(csv.reader(fh, delimiter=sep, quoting=quoting), [])
    dups = sorted({c for c in header if header.count(c) > 1})
    if dups:
        raise ClmtuneError(f"{path}: column name(s) {dups} appear more than once in the header line; give every "
                           "column its own name")


def _categories(df) -> tuple[int, dict[int, set[str]]]:
    """(number of columns, {column index: its values}) for the columns with few distinct values (labels)."""
    cats = {}
    for j, c in enumerate(df.columns):
        values = set(df[c])
        if len(values) <= 20 and len(values) * 2 <= len(df):
            cats[j] = values
    return len(df.columns), cats


def _looks_like_row(line: str, sep: str, shape: tuple[int, dict[int, set[str]]] | None) -> bool:
    """A line inside a cell that splits into as many fields as the file has columns, with every label-like field
    holding one of that column's values: most likely a row swallowed by an unclosed quote."""
    if shape is None or not shape[1]:
        return False
    fields = line.split(sep)
    return len(fields) == shape[0] and all(fields[j] in values for j, values in shape[1].items())


def _check_quotes(path: Path, sep: str, encoding: str, shape: tuple[int, dict[int, set[str]]] | None = None) -> None:
    """An unbalanced ``"`` makes a CSV reader swallow the following lines into one cell (rows merged silently).
    The file is read again with the standard library's strict reader, which stops at malformed quoting; a cell
    that still holds whole lines looking like rows (``_looks_like_row``) is reported too."""
    with open(path, encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=sep, strict=True)
        start = 1
        try:
            for record in reader:
                for cell in record:
                    inner = [line for line in cell.split("\n")[1:] if _looks_like_row(line, sep, shape)]
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


def _check_same_keys(records: list, path: Path, unit: str) -> list[dict[str, Any]]:
    """Every record must be an object with the keys of the first one (pandas would fill the gaps with NaN)."""
    if not records:
        return []
    first = None
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise ClmtuneError(f"{path} {unit} {n} is a {type(rec).__name__}, not an object; write one "
                               '{"column": value, ...} object per example')
        if first is None:
            first = set(rec)
        elif set(rec) != first:
            extra, missing = sorted(set(rec) - first), sorted(first - set(rec))
            raise ClmtuneError(f"{path} {unit} {n} has keys {sorted(rec)}, {unit} 1 has {sorted(first)} "
                               f"(extra {extra}, missing {missing}); give every record the same keys")
    return records


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` keeps the last of two equal keys silently; a repeated column name is an error here."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_json(path: Path, encoding: str) -> list[dict[str, Any]]:
    # Hand-written rather than pandas.read_json: we want line numbers for bad lines and mixed keys.
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise _encoding_error(path, encoding) from None
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line, object_pairs_hook=_no_duplicate_keys))
            except _DuplicateKey as exc:
                raise ClmtuneError(f"{path} line {n}: key {exc.args[0]!r} appears twice in one object; give every "
                                   "column its own name") from None
            except json.JSONDecodeError as exc:
                raise ClmtuneError(f"{path} line {n} is not valid JSON ({exc.msg}); a .jsonl file holds one JSON "
                                   "object per line") from None
        return _check_same_keys(records, path, "line")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        raise ClmtuneError(f"{path}: key {exc.args[0]!r} appears twice in one object; give every column its own "
                           "name") from None
    except json.JSONDecodeError as exc:
        raise ClmtuneError(f"{path} line {exc.lineno} is not valid JSON ({exc.msg}); if it holds one object per "
                           "line, name it .jsonl") from None
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # columnar {"col": [...]}
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise ClmtuneError(f"{path}: columns have different lengths {lengths}; give every column one value "
                               "per example")
        keys = list(data)
        return [dict(zip(keys, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise ClmtuneError(f"{path} holds a JSON {type(data).__name__}; give a list of objects, one per example")
    return _check_same_keys(data, path, "record")


def _read_txt(path: Path, encoding: str, sample_by: str) -> list[dict[str, Any]]:
    # The same three units as datasets' "text" builder, without its on-disk cache (a copy of every file).
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise _encoding_error(path, encoding) from None
    if sample_by == "line":
        pieces = text.splitlines()
    elif sample_by == "paragraph":
        pieces = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    else:
        pieces = [text]
    return [{"text": p, "file": path.name} for p in pieces]


def _flatten_structs(df, path: Path):
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


def read_table(path: Path, delimiter: str | None = None, encoding: str = "utf-8",
               sample_by: str = "line", nested: bool = False) -> list[dict[str, Any]]:
    """Read a CSV/TSV/JSON/JSONL/Parquet/TXT file into a list of row dicts (values kept as written).

    ``nested``: JSON/JSONL/Parquet rows are records that may hold lists and differ in optional keys
    (conversations; see ``clmtune.data.records.read_records``)."""
    suffix = path.suffix.lower()
    if path.is_file() and (path.stat().st_size == 0 or (path.stat().st_size < 4096 and not path.read_bytes().strip())):
        raise ClmtuneError(f"{path} is empty ({path.stat().st_size} bytes); fill it or point to the right file")
    if nested and suffix in (".json", ".jsonl", ".parquet"):
        return read_records(path, encoding)[0]
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, delimiter, encoding)
    if suffix in (".json", ".jsonl"):
        return _read_json(path, encoding)
    if suffix == ".txt":
        return _read_txt(path, encoding, sample_by)
    if suffix == ".parquet":
        import pandas as pd

        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise ClmtuneError(f"{path} is not a readable Parquet file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200]})") from None
        df.columns = [str(c) for c in df.columns]
        return _flatten_structs(df, path).to_dict(orient="records")
    raise ClmtuneError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl, .parquet or .txt")


# ----------------------------------------------------------------------------------------------------------------
# A source -> rows per split


@dataclass
class RawData:
    """Rows per split as read. ``splits`` has ``train`` and, when the source has them, ``eval`` and ``test``."""

    splits: dict[str, list[dict[str, Any]]]
    where: dict[str, str]
    """Per split, the file (or dataset) it came from, for messages."""
    labels: list[str] | None = None
    """Label names declared by the source (RAFT ``task.json``, a HF ClassLabel), if any."""


def split_files(folder: Path, suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> dict[str, Path]:
    """Split -> the first file of ``folder`` named by one of the split's stems (``SPLIT_STEMS``) and ``suffixes``."""
    found: dict[str, Path] = {}
    for split, stems in SPLIT_STEMS.items():
        for stem in stems:
            hits = [folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()]
            if hits:
                found[split] = hits[0]
                break
    return found


def _task_json_labels(folder: Path, label_column: str) -> list[str] | None:
    task_json = folder / "task.json"
    if not task_json.is_file():
        return None
    try:
        meta = json.loads(task_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClmtuneError(f"{task_json} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return meta.get("label_columns", {}).get(label_column) or None


@contextlib.contextmanager
def _offline_when_unreachable(host: str = "huggingface.co", timeout: float = 3.0):
    """Offline mode for ``datasets``/``huggingface_hub`` while the Hub cannot be reached (one quick probe): the
    cached copy is used when there is one, and a missing one fails at once, instead of ~10 logged retries over
    ~30 s before the same error."""
    import socket

    import datasets.config
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        yield
        return
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        reachable = True
    except OSError:
        reachable = False
    if reachable:
        yield
        return
    log.info("%s cannot be reached: loading the data set from the local cache only", host)
    before = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before


def _load_hf(cfg: DataConfig) -> RawData:
    import datasets

    name, _, subset = cfg.source[len(HF_PREFIX):].partition(":")
    try:
        with _offline_when_unreachable():
            dd = datasets.load_dataset(name, subset or None)
    except Exception as exc:  # network, missing dataset, offline mode: all mean "cannot get it from here"
        raise ClmtuneError(f"data.source={cfg.source!r}: could not load {name!r} with datasets.load_dataset "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); Hugging Face datasets need "
                           "network the first time: download it elsewhere (e.g. save each split to CSV/Parquet) and "
                           "point data.source at the local folder") from None
    splits, where, labels = {}, {}, None
    for hf_split, ds in dd.items():
        ours = HF_SPLITS.get(hf_split)
        if ours is None or ours in splits:
            continue
        feat = ds.features.get(cfg.label_column)
        if labels is None and getattr(feat, "names", None):
            labels = list(feat.names)  # ClassLabel: rows hold indices, names are the words
        splits[ours] = ds.to_list()
        where[ours] = f"{cfg.source} [{hf_split}]"
    if "train" not in splits:
        raise ClmtuneError(f"data.source={cfg.source!r} has no train split (splits: {list(dd)})")
    return RawData(splits=splits, where=where, labels=labels)


def load_raw(cfg: DataConfig) -> RawData:
    """Read ``cfg.source`` (and ``eval_file``/``test_file``) into rows per split."""
    if cfg.source.startswith(HF_PREFIX):
        raw = _load_hf(cfg)
    else:
        path = resolve_source(cfg.source)
        read = dict(delimiter=cfg.delimiter, encoding=cfg.encoding, sample_by=cfg.text_sample_by,
                    nested=get_task(cfg.task).nested_rows)
        labels = None
        if path.is_dir():
            files = split_files(path)
            labels = _task_json_labels(path, cfg.label_column)
            if "train" in files:
                splits = {s: read_table(p, **read) for s, p in files.items()}
                where = {s: str(p) for s, p in files.items()}
            else:
                txts = sorted(p for p in path.rglob("*.txt") if p.is_file())
                if not txts:
                    raise ClmtuneError(f"data.source={cfg.source!r} is a folder without train.* split files or .txt "
                                       "files; give train.csv (+ dev.csv, test.csv), a RAFT task folder, or .txt files")
                rows = [r for p in txts for r in read_table(p, **read)]
                splits, where = {"train": rows}, {"train": f"{path} ({len(txts)} .txt files)"}
        else:
            splits, where = {"train": read_table(path, **read)}, {"train": str(path)}
        raw = RawData(splits=splits, where=where, labels=labels)
    for split, name in (("eval", cfg.eval_file), ("test", cfg.test_file)):
        if name is not None:
            p = Path(name).expanduser()
            if not p.is_file():
                raise ClmtuneError(f"data.{split}_file={name!r} does not exist")
            raw.splits[split] = read_table(p, cfg.delimiter, cfg.encoding, cfg.text_sample_by,
                                           get_task(cfg.task).nested_rows)
            raw.where[split] = str(p)
    return raw
