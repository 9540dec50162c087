"""Data stage (a foundation): read rows, build prompts, split, tokenize, pad.

Classification as generation, the recipe of peft's causal-LM example done carefully:

    input_ids = [pad]*n + prompt_ids + target_ids + [end]
    labels    = [-100]*n + [-100]*len(prompt_ids) + target_ids + [end]     # loss on the label words + end only
    attention = [0]*n + [1]*(len(prompt_ids) + len(target_ids) + 1)

Prompt and target are tokenized separately, without special tokens between them, so the target's ids are the
same at training time and at evaluation time (evaluation feeds the prompt ids alone and scores/generates the
target). Padding goes on the left, the decoder-only convention: the last position of every row is real text.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from clmtune.config import DataConfig
from clmtune.errors import ClmtuneError

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` skips."""

BUILTIN_PREFIX = "builtin:"


def assets_path(relative: str) -> Path:
    """Path of a file or folder shipped inside the package (``src/clmtune/assets``)."""
    return Path(str(resources.files("clmtune") / "assets" / relative))


def resolve_source(source: str) -> Path:
    """``builtin:raft/twitter_complaints`` -> the shipped folder; anything else is a local path."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        path = assets_path(name)
        if not path.exists():
            raise ClmtuneError(f"data.source={source!r}: clmtune ships no data set named {name!r}")
        return path
    path = Path(source).expanduser()
    if not path.exists():
        raise ClmtuneError(f"data.source={source!r}: no such file or folder (give a CSV/TSV/JSON/JSONL/Parquet "
                           "file or a RAFT task folder)")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reading tables


def read_table(path: Path) -> list[dict[str, Any]]:
    """Read a CSV/TSV/JSON/JSONL/Parquet file into a list of row dicts (values kept as written, text as str)."""
    import pandas as pd  # imported here: pandas costs ~0.3 s and only this function needs it

    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                             encoding="utf-8")
        elif suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".json":
            df = pd.read_json(path, dtype=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise ClmtuneError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json, .jsonl or .parquet")
    except UnicodeDecodeError as exc:
        raise ClmtuneError(f"{path} is not UTF-8 (byte offset {exc.start}); convert it, e.g. "
                           f"`iconv -f gbk -t utf-8`") from None
    except (ValueError, pd.errors.ParserError) as exc:
        raise ClmtuneError(f"{path} could not be parsed: {str(exc).strip().splitlines()[-1]}") from None
    df.columns = [str(c) for c in df.columns]
    return df.to_dict(orient="records")


@dataclass
class Example:
    """One row after prompt rendering. ``label`` is None for unlabelled rows."""

    id: str
    prompt: str
    label: str | None
    text: str


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


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ClmtuneError(f"data.template={template!r} is not a valid template ({exc}); "
                           "write placeholders as {column}, and braces as {{ }}") from None


def render_examples(rows: list[dict[str, Any]], cfg: DataConfig, labels: list[str] | None, where: str,
                    labelled: bool) -> tuple[list[Example], int]:
    """Fill the template for each row; drop rows whose template fields are all empty. Returns (examples, dropped)."""
    fields = template_fields(cfg.template)
    columns = list(rows[0].keys()) if rows else []
    missing = [f for f in fields if f not in columns]
    if rows and missing:
        raise ClmtuneError(f"data.template uses column(s) {missing} that {where} does not have "
                           f"(columns: {columns}); fix the template or the file")
    if labelled and rows and cfg.label_column not in columns:
        raise ClmtuneError(f"data.label_column={cfg.label_column!r} is not a column of {where} (columns: {columns})")
    out, dropped = [], 0
    for i, row in enumerate(rows):
        values = {f: "" if _is_missing(row[f]) else str(row[f]) for f in fields}
        if fields and not any(v.strip() for v in values.values()):
            dropped += 1
            continue
        label = None
        if labelled:
            label = normalize_label(row[cfg.label_column])
            if labels is not None and label not in labels:
                raise ClmtuneError(f"{where} row {i + 2}: label {row[cfg.label_column]!r} is not in the label set "
                                   f"{labels}; add it to data.labels or fix the row")
        rid = row.get(cfg.id_column)
        out.append(Example(id=str(i) if _is_missing(rid) else str(rid), prompt=cfg.template.format(**values),
                           label=label, text=" ".join(values.values())))
    return out, dropped


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split with ``datasets``' own ``train_test_split`` (same rows as the tutorial's call)."""
    if fraction == 0:
        return rows, []
    import datasets

    ds = datasets.Dataset.from_dict({"_i": list(range(len(rows)))})
    parts = ds.train_test_split(test_size=fraction, seed=seed)
    return [rows[i] for i in parts["train"]["_i"]], [rows[i] for i in parts["test"]["_i"]]


def load_task(cfg: DataConfig) -> TaskData:
    """Read the configured source into train/eval/test examples and the label set."""
    path = resolve_source(cfg.source)
    task_labels: list[str] | None = None
    test_path = Path(cfg.test_file) if cfg.test_file else None
    if path.is_dir():
        train_path = path / "train.csv"
        if not train_path.is_file():
            raise ClmtuneError(f"data.source={cfg.source!r} is a folder without train.csv; a RAFT task folder holds "
                               "train.csv, test_unlabeled.csv and task.json")
        task_json = path / "task.json"
        if task_json.is_file():
            meta = json.loads(task_json.read_text(encoding="utf-8"))
            names = meta.get("label_columns", {}).get(cfg.label_column)
            if names:
                task_labels = [normalize_label(n) for n in names]
        if test_path is None and (path / "test_unlabeled.csv").is_file():
            test_path = path / "test_unlabeled.csv"
    else:
        train_path = path
    rows = read_table(train_path)
    labels = [normalize_label(x) for x in cfg.labels] if cfg.labels else task_labels
    if labels is None:
        if rows and cfg.label_column not in rows[0]:
            raise ClmtuneError(f"data.label_column={cfg.label_column!r} is not a column of {train_path} "
                               f"(columns: {list(rows[0])})")
        labels = sorted({normalize_label(r[cfg.label_column]) for r in rows if not _is_missing(r[cfg.label_column])})
    # Filter first, then split (the tutorial drops empty reviews before train_test_split).
    examples, dropped = render_examples(rows, cfg, labels, str(train_path), labelled=True)
    if not examples:
        raise ClmtuneError(f"no training rows left in {train_path} after dropping {dropped} rows with empty "
                           "text; check data.template and the file")
    train, evals = split_rows(examples, cfg.eval_fraction, cfg.seed)
    if not train:
        raise ClmtuneError(f"data.eval_fraction={cfg.eval_fraction} leaves no training rows out of {len(examples)}; "
                           "lower it")
    test: list[Example] = []
    dropped_test = 0
    if test_path is not None:
        if not test_path.is_file():
            raise ClmtuneError(f"data.test_file={str(test_path)!r} does not exist")
        test, dropped_test = render_examples(read_table(test_path), cfg, labels, str(test_path), labelled=False)
    report = {"rows_read": len(rows), "train": len(train), "eval": len(evals), "test": len(test),
              "dropped_empty": {"labelled": dropped, "test": dropped_test}}
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
        """Unpadded training features and the number of rows whose prompt was cut to fit ``max_length``."""
        prompts = self.encode_texts([e.prompt for e in examples])
        targets = self.encode_texts([e.label for e in examples])
        feats, truncated = [], 0
        for ex, p, t in zip(examples, prompts, targets):
            ids, labels, cut = build_train_example(self.prefix + p, t, self.end_id, self.cfg.max_length,
                                                   self.cfg.truncation_side, ex.label)
            truncated += cut
            feats.append({"input_ids": ids, "labels": labels})
        return feats, truncated

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
                        truncation_side: str = "left", label: str | None = None,
                        ) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, was_truncated) for one row, unpadded. The target and end token are never cut."""
    target = list(target_ids) + [end_id]
    if len(target) + 1 > max_length:
        raise ClmtuneError(f"data.max_length={max_length} cannot hold the label {label!r} ({len(target) - 1} tokens) "
                           f"plus its end token and at least one prompt token; raise data.max_length to at least "
                           f"{len(target) + 1}")
    cut = len(prompt_ids) + len(target) > max_length
    if cut:
        prompt_ids = _cut_prompt(list(prompt_ids), max_length - len(target), truncation_side, 0)
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
        batch["labels"] = left_pad([f["labels"] for f in features], IGNORE_INDEX, length)
    return batch
