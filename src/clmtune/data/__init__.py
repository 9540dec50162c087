"""Data stage (a foundation): read rows, build prompts, split, tokenize, pad.

Three task shapes (``data.task``), all as "prompt, then a target the model learns to write":

    classify:  input_ids = [pad]*n + prompt_ids + label_ids + [end]       labels: -100 on pad and prompt
    sft:       input_ids = [pad]*n + prompt_ids + response_ids + [end]    labels: -100 on pad and prompt
    lm:        input_ids = text_1 + [end] + text_2 + [end] + ...  cut in block_size blocks   labels = input_ids
    attention = [0]*n + [1]*(real tokens)

Prompt and target are tokenized separately, without special tokens between them, so the target's ids are the
same at training time and at evaluation time (evaluation feeds the prompt ids alone and scores/generates the
target). Padding goes on the left, the decoder-only convention: the last position of every row is real text.

Modules: ``sources`` reads files/folders/datasets into rows; this module turns rows into examples and token ids;
``features`` is the one entry point the stages use (``prepare_data``: examples -> tokenized ``datasets`` splits
plus a report of what was read, dropped and truncated).
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from clmtune.config import DataConfig
from clmtune.data.sources import (BUILTIN_PREFIX, HF_PREFIX, RawData, assets_path, load_raw, read_table,  # noqa: F401
                                  resolve_source)
from clmtune.errors import ClmtuneError

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""

SPLIT_ORDER = ("train", "eval", "test")


@dataclass
class Example:
    """One row after prompt rendering. ``label`` is None for unlabelled rows and for ``sft``/``lm``."""

    id: str
    prompt: str
    label: str | None
    text: str
    target: str | None = None
    """Words learned after the prompt: the label (classify), the response (sft), the whole text (lm, prompt '')."""


@dataclass
class TaskData:
    """Everything the stages need from the data: splits of examples, the label set, and what was filtered."""

    train: list[Example]
    eval: list[Example]
    test: list[Example]
    labels: list[str]
    report: dict[str, Any] = field(default_factory=dict)


def normalize_label(value: Any) -> str:
    """RAFT writes label names with underscores; the model learns words (``no_complaint`` -> ``no complaint``)."""
    return str(value).replace("_", " ").strip()


def template_fields(template: str, key: str = "data.template") -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ClmtuneError(f"{key}={template!r} is not a valid template ({exc}); "
                           "write placeholders as {column}, and braces as {{ }}") from None


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _text(value: Any) -> str:
    return "" if _is_missing(value) else str(value)


def _row_name(where: str, i: int) -> str:
    """Human name of row i: the line number for CSV/TSV (header is line 1), else the record number."""
    return f"line {i + 2}" if where.lower().endswith((".csv", ".tsv")) else f"row {i + 1}"


def map_label(value: Any, labels: list[str], where: str) -> str:
    """A label cell -> a label name: the name itself, or (integers) the name at that position of ``labels``."""
    name = normalize_label(value)
    if name in labels:
        return name
    k = None
    if isinstance(value, int) and not isinstance(value, bool):
        k = value
    elif isinstance(value, float) and value.is_integer():
        k = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        k = int(value)
    if k is not None and 0 <= k < len(labels):
        return labels[k]
    raise ClmtuneError(f"{where}: label {value!r} is not in the label set {labels} (nor a position 0..{len(labels) - 1}"
                       f" in it); add it to data.labels or fix the row")


def _check_columns(key: str, names: list[str], columns: list[str], where: str, what: str = "placeholder(s)") -> None:
    missing = [f for f in dict.fromkeys(names) if f not in columns]
    if missing:
        raise ClmtuneError(f"{key} uses {what} {missing} that {where} does not have as column(s) "
                           f"(columns: {columns}); fix {key} or the file")


def render_examples(rows: list[dict[str, Any]], cfg: DataConfig, labels: list[str] | None, where: str,
                    labelled: bool) -> tuple[list[Example], int]:
    """Fill the templates of each row; drop rows with an empty text. Returns (examples, dropped).

    A row is empty when all its prompt placeholders are empty (classify, sft), its response is empty (sft), or
    its ``text_column`` is empty (lm) -- the tutorial's ``filter(review is not None)``.
    """
    if not rows:
        return [], 0
    columns = list(rows[0].keys())
    task = cfg.task
    p_fields = template_fields(cfg.template) if task != "lm" else []
    r_fields = template_fields(cfg.response_template, "data.response_template") if task == "sft" else []
    if task == "lm":
        _check_columns("data.text_column", [cfg.text_column], columns, where, "column")
    else:
        _check_columns("data.template", p_fields, columns, where)
        _check_columns("data.response_template", r_fields, columns, where)
    if labelled and cfg.label_column not in columns:
        raise ClmtuneError(f"data.label_column={cfg.label_column!r} is not a column of {where} (columns: {columns})")
    out, dropped = [], 0
    for i, row in enumerate(rows):
        rid = row.get(cfg.id_column)
        rid = str(i) if _is_missing(rid) else str(rid)
        if task == "lm":
            text = _text(row[cfg.text_column])
            if not text.strip():
                dropped += 1
                continue
            out.append(Example(id=rid, prompt="", label=None, text=text, target=text))
            continue
        values = {f: _text(row[f]) for f in p_fields}
        if p_fields and not any(v.strip() for v in values.values()):
            dropped += 1
            continue
        label = target = None
        if task == "sft":
            r_values = {f: _text(row[f]) for f in r_fields}
            if r_fields and not any(v.strip() for v in r_values.values()):
                dropped += 1
                continue
            target = cfg.response_template.format(**r_values)
        elif labelled:
            if _is_missing(row[cfg.label_column]) or not str(row[cfg.label_column]).strip():
                raise ClmtuneError(f"{where} {_row_name(where, i)}: empty label in column {cfg.label_column!r}; "
                                   "fill it in or remove the row")
            label = target = map_label(row[cfg.label_column], labels or [], f"{where} {_row_name(where, i)}")
        out.append(Example(id=rid, prompt=cfg.template.format(**values), label=label,
                           text=" ".join(values.values()), target=target))
    return out, dropped


def dedup_examples(examples: list[Example]) -> tuple[list[Example], int]:
    """Keep the first of rows with the same (prompt, target); returns (kept, removed)."""
    seen, out = set(), []
    for e in examples:
        key = (e.prompt, e.target)
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
    return bool(rows) and column in rows[0] and any(not _is_missing(r[column]) and str(r[column]).strip()
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
                   if not _is_missing(r[cfg.label_column]) and str(r[cfg.label_column]).strip()})


def sample_rows(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most ``limit`` of ``examples``, drawn with ``seed`` (the same rows every time), in their original order
    (``data.max_train_rows`` / ``data.max_eval_rows``)."""
    if limit is None or len(examples) <= limit:
        return examples
    import random

    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def load_task(cfg: DataConfig) -> TaskData:
    """Read the configured source into train/eval/test examples and the label set.

    Order, as in the tutorial: read -> drop empty texts (counted) -> optional dedup (counted) -> split. The
    source's own eval split (``dev.*``, ``validation``, ``data.eval_file``) is used when there is one; otherwise
    ``eval_fraction`` of train is held out.
    """
    raw = load_raw(cfg)
    classify = cfg.task == "classify"
    labels = label_set(cfg, raw) if classify else []
    examples, read, dropped, dups = {}, {}, {}, {}
    for split, rows in raw.splits.items():
        labelled = classify and (split != "test" or _has_labels(rows, cfg.label_column))
        examples[split], dropped[split] = render_examples(rows, cfg, labels, raw.where[split], labelled)
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
    return TaskData(train=train, eval=evals, test=test, labels=labels, report=report)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizing


def leading_special_ids(tokenizer) -> list[int]:
    """The BOS id when the tokenizer itself puts one in front of text (LLaMA, OPT), else nothing.

    We tokenize with ``add_special_tokens=False`` (a BERT tokenizer would otherwise wrap every piece in
    [CLS] ... [SEP], and those would end up in the middle of a sequence) and add the BOS back by hand.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    if with_special[:1] == [bos] and with_special[1:1 + len(without)] == without:
        return [bos]
    return []


class ClassificationEncoder:
    """Turns examples into token ids for training (prompt + label + end) and for evaluation (prompt only)."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.prefix = leading_special_ids(tokenizer)
        self.end_id = tokenizer.eos_token_id if cfg.end_token == "eos" else tokenizer.pad_token_id
        if self.end_id is None:
            raise ClmtuneError(f"data.end_token={cfg.end_token!r} but the tokenizer has no {cfg.end_token} token; "
                               "use the other end_token")
        self.pad_id = tokenizer.pad_token_id

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False).input_ids

    def label_ids(self, labels: Sequence[str]) -> list[list[int]]:
        """Token ids of each label's words, as they appear after the prompt during training."""
        return self.encode_texts(labels)

    def encode_train(self, examples: Sequence[Example]) -> tuple[list[dict[str, list[int]]], int]:
        """Unpadded training features and the number of rows whose prompt was cut to fit ``max_length``.

        The same row builder as ``prepare_data`` (``features._encode_pairs``), without ``datasets``.
        """
        from clmtune.data.features import _encode_pairs  # features imports this module: import at call time

        out = _encode_pairs({"prompt": [e.prompt for e in examples], "target": [e.target or e.label for e in examples]},
                            self.tokenizer, self.prefix, self.end_id, self.cfg)
        feats = [{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"])]
        return feats, sum(out["truncated"])

    def encode_prompts(self, examples: Sequence[Example], reserve: int = 0) -> tuple[list[list[int]], int]:
        """Prompt ids for evaluation, cut the same way as in training so that ``reserve`` tokens still fit."""
        out, truncated = [], 0
        for p in self.encode_texts([e.prompt for e in examples]):
            ids = self.prefix + p
            room = self.cfg.max_length - reserve
            if len(ids) > room:
                ids = _cut_prompt(ids, room, self.cfg.truncation_side, len(self.prefix))
                truncated += 1
            out.append(ids)
        return out, truncated


def _cut_prompt(ids: list[int], room: int, side: str, keep_prefix: int) -> list[int]:
    head, body = ids[:keep_prefix], ids[keep_prefix:]
    room -= len(head)
    body = body[len(body) - room:] if side == "left" else body[:room]
    return head + body


def build_train_example(prompt_ids: list[int], target_ids: list[int], end_id: int, max_length: int,
                        truncation_side: str = "left", label: str | None = None, keep_prefix: int = 0,
                        ) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, was_truncated) for one row, unpadded. The target and end token are never cut, nor the
    first ``keep_prefix`` prompt tokens (a BOS), so a cut prompt starts as in evaluation (``encode_prompts``)."""
    target = list(target_ids) + [end_id]
    if len(target) + keep_prefix + 1 > max_length:
        raise ClmtuneError(f"data.max_length={max_length} cannot hold the label {label!r} ({len(target) - 1} tokens) "
                           f"plus its end token and at least one prompt token; raise data.max_length to at least "
                           f"{len(target) + keep_prefix + 1}")
    cut = len(prompt_ids) + len(target) > max_length
    if cut:
        prompt_ids = _cut_prompt(list(prompt_ids), max_length - len(target), truncation_side, keep_prefix)
    ids = list(prompt_ids) + target
    labels = [IGNORE_INDEX] * len(prompt_ids) + target
    return ids, labels, cut


def left_pad(seqs: Sequence[Sequence[int]], pad_value: int, length: int | None = None) -> torch.Tensor:
    """Stack sequences into a (batch, length) tensor, padding on the left."""
    length = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def collate(features: Sequence[dict[str, list[int]]], pad_id: int, length: int | None = None,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded batch: input_ids, attention_mask and (if present) labels, each of shape (batch, length).
    Labels are -100 on padding and on each row's first real token (nothing before it to predict it from).

    ``length=None`` pads to the longest row of the batch (rounded up to ``pad_to_multiple_of``).
    """
    if length is None:
        length = max(len(f["input_ids"]) for f in features)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = [f["input_ids"] for f in features]
    batch = {"input_ids": left_pad(ids, pad_id, length),
             "attention_mask": left_pad([[1] * len(s) for s in ids], 0, length)}
    if "labels" in features[0]:
        labels = left_pad([f["labels"] for f in features], IGNORE_INDEX, length)
        # A row's first real token has no context: the position before it is padding (or there is none), so it
        # is never scored. Without this, an ``lm`` row's first token would be "predicted" from a pad position when
        # the row is padded but not when it is the longest of its batch: the loss would depend on the batching.
        labels[:, 0] = IGNORE_INDEX
        labels[:, 1:][batch["attention_mask"][:, :-1] == 0] = IGNORE_INDEX
        batch["labels"] = labels
    return batch


# The one entry point of the stages; imported last because it builds on everything above.
from clmtune.data.features import Prepared, context_check, load_prepared, prepare_data, save_prepared  # noqa: E402,F401
