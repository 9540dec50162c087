"""Reading sources into rows: files, split folders, RAFT folders, ``.txt`` folders, Hugging Face datasets.

Everything here returns plain rows (``list[dict]``, one dict per example, values as written) per split; prompts,
labels and tokens are the business of ``clmtune.data``. A file is read by the reader its suffix names
(``clmtune.data.readers``); a source is recognised by its shape (``SOURCE_KINDS``: ``hf:NAME``, a folder of split
files, a folder of ``.txt`` files, one file), so a new kind of source is one ``load(cfg, options)`` function plus a
``register_source`` line. Every read error names the file, the line when one is known, and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from clmtune.config import DataConfig
from clmtune.data.readers import ReadOptions, known_suffixes, read_table
from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")

BUILTIN_PREFIX = "builtin:"
HF_PREFIX = "hf:"
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
        raise ClmtuneError(f"data.source={source!r}: no such file or folder (give a {'/'.join(known_suffixes())} "
                           "file, a folder of split files or .txt files, or hf:NAME for a Hugging Face dataset)")
    return path


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


def split_files(folder: Path, suffixes: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Split -> the first file of ``folder`` named by one of the split's stems (``SPLIT_STEMS``) and ``suffixes``
    (every registered reader's by default)."""
    suffixes = suffixes or known_suffixes()
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


def read_options(cfg: DataConfig, nested: bool = False) -> ReadOptions:
    """How ``cfg`` says to read its files; ``nested``: the task's rows are records (``Task.nested_rows``)."""
    return ReadOptions(delimiter=cfg.delimiter, encoding=cfg.encoding, sample_by=cfg.text_sample_by, nested=nested)


def load_hf(cfg: DataConfig, options: ReadOptions) -> RawData:
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


def load_split_folder(cfg: DataConfig, options: ReadOptions) -> RawData:
    """A folder with ``train.*`` (+ ``dev.*``, ``test.*``); a RAFT folder's ``task.json`` names the labels."""
    path = resolve_source(cfg.source)
    files = split_files(path)
    return RawData(splits={s: read_table(p, options) for s, p in files.items()},
                   where={s: str(p) for s, p in files.items()}, labels=_task_json_labels(path, cfg.label_column))


def load_text_folder(cfg: DataConfig, options: ReadOptions) -> RawData:
    """A folder of ``.txt`` files (searched recursively, read in name order) as one train split."""
    path = resolve_source(cfg.source)
    txts = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not txts:
        raise ClmtuneError(f"data.source={cfg.source!r} is a folder without train.* split files or .txt "
                           "files; give train.csv (+ dev.csv, test.csv), a RAFT task folder, or .txt files")
    rows = [r for p in txts for r in read_table(p, options)]
    return RawData(splits={"train": rows}, where={"train": f"{path} ({len(txts)} .txt files)"},
                   labels=_task_json_labels(path, cfg.label_column))


def load_file(cfg: DataConfig, options: ReadOptions) -> RawData:
    path = resolve_source(cfg.source)
    return RawData(splits={"train": read_table(path, options)}, where={"train": str(path)})


@dataclass(frozen=True)
class SourceKind:
    name: str
    detect: Callable[[str], bool]
    """``data.source`` -> whether this kind reads it (asked in registration order, the first yes wins)."""
    load: Callable[[DataConfig, ReadOptions], RawData]


SOURCE_KINDS: list[SourceKind] = []


def register_source(kind: SourceKind, first: bool = False) -> SourceKind:
    """Add a kind of source; ``first``: ask it before the shipped ones (a more specific shape)."""
    SOURCE_KINDS.insert(0, kind) if first else SOURCE_KINDS.append(kind)
    return kind


def _is_folder(source: str) -> bool:
    return not source.startswith(HF_PREFIX) and resolve_source(source).is_dir()


register_source(SourceKind("hf", lambda s: s.startswith(HF_PREFIX), load_hf))
register_source(SourceKind("split folder", lambda s: _is_folder(s) and "train" in split_files(resolve_source(s)),
                           load_split_folder))
register_source(SourceKind("text folder", _is_folder, load_text_folder))
register_source(SourceKind("file", lambda s: True, load_file))


def load_raw(cfg: DataConfig, nested: bool = False) -> RawData:
    """Read ``cfg.source`` (and ``eval_file``/``test_file``) into rows per split; ``nested``: the task's rows are
    records that may hold lists (``Task.nested_rows``)."""
    options = read_options(cfg, nested)
    kind = next(k for k in SOURCE_KINDS if k.detect(cfg.source))
    raw = kind.load(cfg, options)
    for split, name in (("eval", cfg.eval_file), ("test", cfg.test_file)):
        if name is not None:
            p = Path(name).expanduser()
            if not p.is_file():
                raise ClmtuneError(f"data.{split}_file={name!r} does not exist; give the path of a "
                                   f"{'/'.join(known_suffixes())} file, or remove data.{split}_file")
            raw.splits[split] = read_table(p, options)
            raw.where[split] = str(p)
    return raw
