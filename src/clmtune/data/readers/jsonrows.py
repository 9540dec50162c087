"""JSON (a list of objects, or columns ``{"col": [...]}``) and JSONL (one object per line) files.

Hand-written rather than ``pandas.read_json``: errors name the line of a bad record and the keys that differ, and
a repeated key is an error (``json.loads`` would keep the last one silently)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clmtune.data.readers.registry import Reader, ReadOptions, Rows, check_records, read_text, register_reader
from clmtune.errors import ClmtuneError


class DuplicateKey(Exception):
    pass


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def check_same_keys(records: list, path: Path, unit: str) -> Rows:
    """Every record must be an object with the keys of the first one (pandas would fill the gaps with NaN)."""
    check_records(records, path, unit)
    first = set(records[0]) if records else set()
    for n, rec in enumerate(records, 1):
        if set(rec) != first:
            extra, missing = sorted(set(rec) - first), sorted(first - set(rec))
            raise ClmtuneError(f"{path} {unit} {n} has keys {sorted(rec)}, {unit} 1 has {sorted(first)} "
                               f"(extra {extra}, missing {missing}); give every record the same keys")
    return records


def json_lines(path: Path, options: ReadOptions, strict_keys: bool) -> tuple[list, list[int]]:
    """(records, line numbers) of a ``.jsonl`` file; blank lines are skipped."""
    records, numbers = [], []
    hook = no_duplicate_keys if strict_keys else None
    for n, line in enumerate(read_text(path, options).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line, object_pairs_hook=hook))
        except DuplicateKey as exc:
            raise ClmtuneError(f"{path} line {n}: key {exc.args[0]!r} appears twice in one object; give every "
                               "column its own name") from None
        except json.JSONDecodeError as exc:
            raise ClmtuneError(f"{path} line {n} is not valid JSON ({exc.msg}); a .jsonl file holds one JSON "
                               "object per line") from None
        numbers.append(n)
    return records, numbers


def json_document(path: Path, options: ReadOptions, strict_keys: bool) -> Any:
    try:
        return json.loads(read_text(path, options), object_pairs_hook=no_duplicate_keys if strict_keys else None)
    except DuplicateKey as exc:
        raise ClmtuneError(f"{path}: key {exc.args[0]!r} appears twice in one object; give every column its own "
                           "name") from None
    except json.JSONDecodeError as exc:
        raise ClmtuneError(f"{path} line {exc.lineno} is not valid JSON ({exc.msg}); if it holds one object per "
                           "line, name it .jsonl") from None


def read_json(path: Path, options: ReadOptions) -> Rows:
    if path.suffix.lower() == ".jsonl":
        return check_same_keys(json_lines(path, options, True)[0], path, "line")
    data = json_document(path, options, True)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):  # columnar {"col": [...]}
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) > 1:
            raise ClmtuneError(f"{path}: columns have different lengths {lengths}; give every column one value "
                               "per example")
        keys = list(data)
        return [dict(zip(keys, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise ClmtuneError(f"{path} holds a JSON {type(data).__name__}; give a list of objects, one per example")
    return check_same_keys(data, path, "record")


def read_json_records(path: Path, options: ReadOptions) -> tuple[Rows, list[int]]:
    """Records whose optional keys may differ (conversations); JSONL rows are numbered by their line."""
    if path.suffix.lower() == ".jsonl":
        records, numbers = json_lines(path, options, False)
    else:
        records = json_document(path, options, False)
        if not isinstance(records, list):
            raise ClmtuneError(f"{path} holds a JSON {type(records).__name__}; give a list of objects, one per "
                               "example")
        numbers = list(range(1, len(records) + 1))
    check_records(records, path, "row")
    return records, numbers


register_reader(Reader("json", (".json", ".jsonl"), read_json, read_json_records))
