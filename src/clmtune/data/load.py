"""Reading a configured source into train/eval/test examples: render (by the task), drop empty rows, dedup,
split. ``load_task`` is the entry point."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from clmtune.config import DataConfig
from clmtune.tasks.examples import Example, TaskData, is_missing, normalize_label
from clmtune.data.sources import RawData, load_raw
from clmtune.errors import ClmtuneError
from clmtune.tasks import Task, get_task

log = logging.getLogger("clmtune")


def render_examples(rows: list[dict[str, Any]], cfg: DataConfig, labels: list[str] | None, where: str,
                    labelled: bool, shape: Task | None = None) -> tuple[list[Example], int]:
    """Each row as an example of ``cfg.task``; rows with empty text dropped. Returns (examples, dropped).

    A row is empty when all its prompt placeholders are empty (classify, sft), its response is empty (sft), or
    its ``text_column`` is empty (lm) -- the tutorial's ``filter(review is not None)``. ``shape``: the task
    resolved by the caller (looked up from ``cfg.task`` when not given).
    """
    return (shape or get_task(cfg.task)).render_examples(rows, cfg, labels, where, labelled)


def dedup_examples(examples: list[Example]) -> tuple[list[Example], int]:
    """Keep the first of rows with the same ``Example.dedup_key`` (prompt, target, conversation; a preference pair's
    rejected answer too); returns (kept, removed)."""
    seen, out = set(), []
    for e in examples:
        key = e.dedup_key
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out, len(examples) - len(out)


def split_indices(n: int, fraction: float, seed: int, strata: list[int] | None = None,
                  n_classes: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split with ``datasets``' own ``train_test_split`` (the tutorial's call), optionally
    stratified by class index."""
    if fraction == 0:
        return list(range(n)), []
    import datasets

    ds = datasets.Dataset.from_dict({"_i": list(range(n))})
    kwargs = {}
    if strata is not None:
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a "Casting the dataset" bar for an instant cast of row numbers
        try:
            ds = ds.add_column("_y", strata).cast_column("_y", datasets.ClassLabel(num_classes=n_classes))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        kwargs["stratify_by_column"] = "_y"
    try:
        parts = ds.train_test_split(test_size=fraction, seed=seed, **kwargs)
    except ValueError as exc:
        raise ClmtuneError(f"data.eval_fraction={fraction} cannot split {n} rows into train and eval "
                           f"({str(exc).splitlines()[0][:160]}); use more rows, another eval_fraction"
                           + (", or data.stratify: false" if strata is not None else "")) from None
    return parts["train"]["_i"], parts["test"]["_i"]


def _has_labels(rows: list[dict[str, Any]], column: str) -> bool:
    return bool(rows) and column in rows[0] and any(not is_missing(r[column]) and str(r[column]).strip()
                                                    for r in rows)


def label_set(cfg: DataConfig, raw: RawData) -> list[str]:
    """``data.labels``, else the source's declared names, else the sorted distinct values of the train labels."""
    if cfg.labels:
        return [normalize_label(x) for x in cfg.labels]
    if raw.labels:
        return [normalize_label(x) for x in raw.labels]
    rows = raw.splits["train"]
    if rows and cfg.label_column not in rows[0]:
        raise ClmtuneError(f"data.label_column={cfg.label_column!r} is not a column of {raw.where['train']} "
                           f"(columns: {list(rows[0])})")
    return sorted({normalize_label(r[cfg.label_column]) for r in rows
                   if not is_missing(r[cfg.label_column]) and str(r[cfg.label_column]).strip()})


def sample_rows(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most ``limit`` of ``examples``, drawn with ``seed`` (the same rows every time), in their original order
    (``data.max_train_rows`` / ``data.max_eval_rows``)."""
    if limit is None or len(examples) <= limit:
        return examples
    import random

    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def load_task(cfg: DataConfig, shape: Task | None = None) -> TaskData:
    """Read the configured source into train/eval/test examples and the label set.

    Order, as in the tutorial: read -> drop empty texts (counted) -> optional dedup (counted) -> split. The
    source's own eval split (``dev.*``, ``validation``, ``data.eval_file``) is used when there is one; otherwise
    ``eval_fraction`` of train is held out. ``shape``: the task resolved by the caller (looked up from
    ``cfg.task`` when not given); the examples carry it (``TaskData.shape``) to the stages.
    """
    shape = shape or get_task(cfg.task)
    raw = load_raw(cfg, shape.nested_rows)
    for warning in shape.config_warnings(cfg):
        log.warning(warning)
    classify = shape.has_labels
    labels = label_set(cfg, raw) if classify else []
    examples, read, dropped, dups = {}, {}, {}, {}
    for split, rows in raw.splits.items():
        labelled = classify and (split != "test" or _has_labels(rows, cfg.label_column))
        examples[split], dropped[split] = shape.render_examples(rows, cfg, labels, raw.where[split], labelled)
        read[split] = len(rows)
        dups[split] = 0
        if cfg.dedup:
            examples[split], dups[split] = dedup_examples(examples[split])
        if split != "train" and rows and not examples[split]:
            raise ClmtuneError(f"the {split} split ({raw.where[split]}) is empty after dropping {dropped[split]} "
                               "rows with empty text; fix the file or the template")
    train = examples["train"]
    if not train:
        raise ClmtuneError(f"no training rows left in {raw.where['train']} ({read['train']} read, {dropped['train']} "
                           f"with empty text, {dups['train']} duplicates); check the data.template / "
                           "data.text_column and the file")
    if "eval" in examples:
        evals, eval_from = examples["eval"], raw.where["eval"]
    elif cfg.eval_fraction > 0:
        strata = [labels.index(e.label) for e in train] if classify and cfg.stratify else None
        tr, ev = split_indices(len(train), cfg.eval_fraction, cfg.seed, strata, len(labels))
        train, evals = [train[i] for i in tr], [train[i] for i in ev]
        eval_from = f"{cfg.eval_fraction:g} of train, seed {cfg.seed}" + (", stratified" if strata else "")
    else:
        evals, eval_from = [], "none (data.eval_fraction=0)"
    test = examples.get("test", [])
    before = {"train": len(train), "eval": len(evals)}
    train = sample_rows(train, cfg.max_train_rows, cfg.seed)
    evals = sample_rows(evals, cfg.max_eval_rows, cfg.seed)
    report = {"task": cfg.task, "rows_read": sum(read.values()), "train": len(train), "eval": len(evals),
              "test": len(test), "read": read, "sources": dict(raw.where), "eval_from": eval_from,
              "dropped_empty": {s: dropped.get(s, 0) for s in ("train", "eval", "test")},
              "dropped_duplicate": {s: dups.get(s, 0) for s in ("train", "eval", "test")}}
    if cfg.max_train_rows is not None or cfg.max_eval_rows is not None:
        report["rows_before_sampling"] = before
        report["sampled"] = {"train": len(train), "eval": len(evals), "seed": cfg.seed}
    if classify:
        report["label_counts"] = {s: dict(Counter(e.label for e in ex if e.label is not None))
                                  for s, ex in (("train", train), ("eval", evals), ("test", test))}
        seen = report["label_counts"]["train"]
        if len(seen) == 1:
            only = next(iter(seen))
            others = [lab for lab in labels if lab != only]
            log.warning("the training rows hold one class only (%r, %d rows): the model learns to answer it always, "
                        "and macro-F1 averages over %d label(s) never seen in training%s; add rows of the other "
                        "labels", only, seen[only], max(len(others), 1),
                        f" ({', '.join(map(repr, others[:5]))})" if others else "")
    return TaskData(train=train, eval=evals, test=test, labels=labels, report=report, shape=shape)
