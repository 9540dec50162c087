"""The one data entry point of the stages: examples -> tokenized splits + a report of what happened.

``prepare_data(tokenizer, cfg)`` returns train/eval/test features as ``datasets.Dataset`` objects with two columns,
``input_ids`` and ``labels`` (unpadded lists of ints; ``collate`` pads them on the left), whatever the task:

    classify / sft   labels = [-100]*len(prompt) + target_ids + [end]          (target: label words / response)
    lm, packing      input_ids = concat(prefix + text_i + [end]) cut into block_size blocks; labels = input_ids
    lm, no packing   input_ids = (prefix + text + [end])[:max_length];                     labels = input_ids

Tokenization runs in ``datasets.map(batched=True)`` (the fast tokenizer encodes 1,000 texts per call), so a 100k-row
table prepares in seconds (bench/bench_prepare.py). ``save_prepared``/``load_prepared`` keep the splits as Arrow
files, so ``train`` can reuse what ``clmtune prepare --save`` wrote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clmtune.config import DataConfig
from clmtune.data.encoder import Encoder, check_label_tokens
from clmtune.tasks.encoding import build_sft_example  # noqa: F401  (re-exported: tests import it from here)
from clmtune.tasks.examples import SPLIT_ORDER, Example, TaskData
from clmtune.data.load import load_task
from clmtune.text import plural
from clmtune.tasks import Task, get_task
from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")

META_FILE = "clmtune_prepared.json"
PREPARED_VERSION = 1


@dataclass
class Prepared:
    """Tokenized splits (``None`` when a split has no targets, e.g. an unlabelled RAFT test file) and their report."""

    train: Any
    eval: Any | None
    test: Any | None
    labels: list[str]
    end_id: int
    pad_id: int
    report: dict[str, Any] = field(default_factory=dict)
    examples: TaskData | None = None
    """The examples the splits were tokenized from (``None`` for splits read from a ``data.prepared`` folder):
    in-training evaluation predicts labels for them without reading the source again."""

    def summary_line(self) -> str:
        r = self.report
        parts = []
        for s in SPLIT_ORDER:
            if s in r["splits"]:
                x = r["splits"][s]
                parts.append(f"{s} {plural(x['rows'], 'row')} -> {plural(x['features'], 'sequence')} "
                             f"({x['truncated']} truncated)")
        d = r["data"]
        dropped = sum(d["dropped_empty"].values())
        dups = sum(d["dropped_duplicate"].values())
        sampled = ""
        if "sampled" in d:  # data.max_train_rows / max_eval_rows
            b, k = d["rows_before_sampling"], d["sampled"]
            sampled = (f"; sampled (seed {k['seed']}) train {k['train']} of {b['train']} rows, eval {k['eval']} of "
                       f"{b['eval']}")
        return (f"data ({r['task']}): " + "; ".join(parts) + f"; {plural(dropped, 'row')} dropped (empty text), "
                f"{plural(dups, 'duplicate')} dropped{sampled}; pad {r['pad_token']['token']!r} end {r['end_token']['token']!r}")


def context_check(cfg: DataConfig, context_length: int | None, shape: Task | None = None) -> None:
    """Sequences may not be longer than the model's position table (``None``: the model has no limit)."""
    if context_length is None:
        return
    key, value = (shape or get_task(cfg.task)).length_limit(cfg)
    if value is not None and value > context_length:
        raise ClmtuneError(f"{key}={value} is larger than the model's context ({context_length} positions); "
                           f"set {key} to at most {context_length}")


def _lengths(values) -> dict[str, int]:
    a = np.asarray(values)
    if a.size == 0:
        return {"p50": 0, "p95": 0, "max": 0}
    return {"p50": int(np.percentile(a, 50)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def _encode_split(examples: list[Example], split: str, tokenizer, prefix: list[int], end_id: int,
                  cfg: DataConfig, task: Task) -> tuple[Any, dict[str, Any]]:
    import datasets

    columns = task.example_columns(examples)
    ds = datasets.Dataset.from_dict(columns)
    # new_fingerprint: skip hashing the function (it would pickle the whole tokenizer); in-memory, nothing cached.
    common = dict(batched=True, batch_size=1000, remove_columns=list(columns), desc=f"tokenize {split}",
                  new_fingerprint=f"clmtune-{split}-{len(examples)}-{os.getpid()}")
    ds = ds.map(partial(task.encode, tokenizer=tokenizer, prefix=prefix, end_id=end_id, d=cfg), **common)
    column = lambda name: ds.data.column(name).to_numpy()  # noqa: E731  Arrow -> numpy, not row by row
    stats = {"rows": len(examples), "truncated": int(column("truncated").sum()),
             "prompt_tokens": _lengths(column("prompt_len")), "target_tokens": _lengths(column("target_len"))}
    ds = ds.remove_columns(["truncated", "prompt_len", "target_len"])
    ds = task.finish_split(ds, stats, cfg)
    stats["features"] = len(ds)
    return ds, stats


def prepare_data(tokenizer, cfg: DataConfig, task: TaskData | None = None, context_length: int | None = None,
                 progress: bool = False, splits: tuple[str, ...] = SPLIT_ORDER, shape: Task | None = None) -> Prepared:
    """Tokenized train/eval/test features of ``cfg`` (or the folder ``cfg.prepared`` names), with a report.

    ``task``: examples already loaded with ``load_task(cfg)`` (loaded here when None). ``context_length``: the
    model's position limit, checked against ``max_length``/``block_size``. ``splits``: the splits to tokenize
    (the others are ``None``; evaluation tokenizes only the split it scores). ``shape``: the task resolved by the
    caller (else the one ``task`` was read for, else looked up from ``cfg.task``).
    """
    import datasets

    shape = shape or (task.shape if task is not None else None) or get_task(cfg.task)
    context_check(cfg, context_length, shape)
    shape.prepare_tokenizer(tokenizer, cfg)
    if cfg.prepared:
        return load_prepared(cfg.prepared, tokenizer, cfg)
    task = task if task is not None else load_task(cfg, shape)
    if cfg.max_length is None:  # `auto` not resolved by the caller (clmtune.defaults does it for train/prepare)
        from clmtune.data.profile import auto_max_length, sequence_lengths

        lengths = sequence_lengths(tokenizer, cfg, task.train, shape)
        cfg = dataclasses.replace(cfg, max_length=auto_max_length(lengths, context_length)[0] if lengths else 64)
    enc = Encoder(tokenizer, cfg, shape)  # resolves the prefix (BOS), the end and the pad token
    if shape.has_labels and task.labels:
        check_label_tokens(enc, task.labels)
    was_enabled = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        feats, stats = {}, {}
        for split, examples in (("train", task.train), ("eval", task.eval), ("test", task.test)):
            if split not in splits or not examples or not all(e.learnable for e in examples):
                feats[split] = None  # nothing to learn from (e.g. unlabelled test rows)
                continue
            feats[split], stats[split] = _encode_split(examples, split, tokenizer, enc.prefix, enc.end_id, cfg, shape)
    finally:
        if not progress and was_enabled:
            datasets.enable_progress_bars()
    unk = tokenizer.unk_token_id  # GPT-2-style vocabularies have none of their own (unk = the end token): skipped
    special = {enc.end_id, enc.pad_id, tokenizer.eos_token_id, tokenizer.bos_token_id, *enc.prefix}
    if unk is not None and unk not in special and feats["train"] is not None:
        rows = sum(unk in ids for ids in feats["train"]["input_ids"])
        stats["train"]["rows_with_unknown_tokens"] = rows
        if rows:  # e.g. emoji in a vocabulary without them: the model sees the same unknown token for all of them
            log.warning("%d of %d training rows hold text the tokenizer does not know (tokenized as %r): the model "
                        "cannot tell those characters apart; clean them or use a model whose vocabulary has them",
                        rows, len(feats["train"]), tokenizer.unk_token)
    tok = tokenizer.convert_ids_to_tokens
    report = {"task": cfg.task, "splits": stats, "labels": task.labels, "data": task.report,
              "pad_token": {"token": tok(enc.pad_id), "id": enc.pad_id},
              "end_token": {"token": tok(enc.end_id), "id": enc.end_id},
              "prefix_tokens": [tok(i) for i in enc.prefix]}
    return Prepared(train=feats["train"], eval=feats["eval"], test=feats["test"], labels=task.labels,
                    end_id=enc.end_id, pad_id=enc.pad_id, report=report, examples=task)


# ----------------------------------------------------------------------------------------------------------------
# Saved splits (clmtune prepare --save DIR; data.prepared: DIR)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary and special tokens: a saved folder is only reused with the tokenizer that made it."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()[:16]


def _data_settings(cfg: DataConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("prepared")
    d.pop("pad_to_multiple_of")  # collation only: the saved token ids do not depend on it
    return d


def check_save_target(folder: str | Path, overwrite: bool, cfg: DataConfig | None = None) -> Path:
    """``--save`` may replace only an earlier ``prepare --save`` folder (never a file, a run or the data read)."""
    from clmtune.run import check_replace_target

    sources = [p for p in (cfg.source, cfg.eval_file, cfg.test_file) if p and Path(p).exists()] if cfg else []
    return check_replace_target(folder, overwrite, option="--save", marker=META_FILE, kind="`clmtune prepare --save`",
                                sources=sources)


def save_prepared(prep: Prepared, folder: str | Path, cfg: DataConfig, tokenizer, overwrite: bool = False) -> Path:
    """Write the splits (Arrow) and their report into ``folder`` atomically: a temporary sibling folder is
    filled, then renamed, so an interrupted run never leaves a half-written folder."""
    import datasets

    folder = check_save_target(folder, overwrite, cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        splits = {s: d for s, d in (("train", prep.train), ("eval", prep.eval), ("test", prep.test)) if d is not None}
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        meta = {"version": PREPARED_VERSION, "data": _data_settings(cfg), "tokenizer": tokenizer_fingerprint(tokenizer),
                "labels": prep.labels, "end_id": prep.end_id, "pad_id": prep.pad_id, "report": prep.report}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_prepared(folder: str | Path, tokenizer, cfg: DataConfig) -> Prepared:
    """Splits written by ``save_prepared``; refuses a folder made with other data settings or another tokenizer."""
    import datasets

    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ClmtuneError(f"data.prepared={str(folder)!r} is not a folder written by `clmtune prepare --save` "
                           f"(no {META_FILE}); run prepare first or unset data.prepared")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    saved, now = meta["data"], _data_settings(cfg)
    default = _data_settings(DataConfig())  # a setting newer than the folder (absent there) at its default is unchanged
    diff = [f"data.{k}={saved.get(k)!r} there, {v!r} here" for k, v in now.items() if saved.get(k) != v
            and not (k not in saved and v == default.get(k))]
    if diff:
        raise ClmtuneError(f"data.prepared={str(folder)!r} was prepared with other data settings ({'; '.join(diff)}); "
                           "prepare again with this config or use the same data settings")
    if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ClmtuneError(f"data.prepared={str(folder)!r} was tokenized with another tokenizer than model "
                           "(vocabulary or special tokens differ); prepare again with this model")
    dd = datasets.load_from_disk(str(folder))
    return Prepared(train=dd["train"], eval=dd.get("eval"), test=dd.get("test"), labels=meta["labels"],
                    end_id=meta["end_id"], pad_id=meta["pad_id"], report=meta["report"])
