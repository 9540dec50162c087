"""The ``Task`` protocol: what one task shape (``data.task``) means, in one object.

A task owns how a file row becomes an ``Example`` (which columns, what is dropped), how examples become token ids
and a loss mask (a ``datasets.map`` body), which evaluation a run of it gets by default, and how a prompt is
written for generation. The stages (prepare, train, evaluate, generate, export) ask the task; none of them
compares task names. Adding a shape is one module with a ``Task`` subclass plus one ``register_task`` line in
``clmtune.tasks``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from clmtune.config.task_rules import TASK_RULES
from clmtune.tasks.examples import Example, check_columns, is_missing, template_fields
from clmtune.templates import template_problem

if TYPE_CHECKING:
    from clmtune.config import DataConfig


class Task:
    name: str = ""
    has_labels: bool = False
    """Rows carry a label from a closed set (classification): a label set, stratified splits, label metrics."""
    eval_splits: tuple[str, ...] = ("eval",)
    """Splits ``clmtune eval --split`` accepts for this task."""
    nested_rows: bool = False
    """Rows hold nested lists/objects (conversations): JSON/JSONL/Parquet files are read as records whose optional
    keys may differ from row to row, lists kept as lists."""
    training: str = "next_token"
    """The training objective the train stage runs (``next_token``: cross-entropy on the supervised tokens;
    ``preference``: a loss on chosen/rejected pairs)."""

    # -- configuration: the facts config validates with are this task's row of ``config.TASK_RULES`` ------------
    @property
    def evaluation(self) -> str:
        """The default evaluation of a run: ``labels`` (predict a label per example, accuracy/F1), ``replies``,
        ``perplexity`` or ``preference``."""
        return TASK_RULES[self.name].evaluation

    @property
    def prompt_learning(self) -> bool:
        """peft's prompt-learning methods (prefix/prompt/p-tuning) can train this shape."""
        return TASK_RULES[self.name].prompt_learning

    def config_problems(self, d: "DataConfig") -> list[str]:
        """Problems of the ``data`` settings that only this task has (``RunConfig.validate`` reports them)."""
        return TASK_RULES[self.name].data_problems(d)

    def config_warnings(self, d: "DataConfig") -> list[str]:
        """Settings that work but are probably not what was meant (logged once when the data is loaded)."""
        return []

    def length_limit(self, d: "DataConfig") -> tuple[str, int]:
        """(key, value) of the setting that bounds a sequence's length, checked against the model's context."""
        return "data.max_length", d.max_length

    def prepare_tokenizer(self, tokenizer, d: "DataConfig") -> None:
        """Set up the tokenizer before anything is encoded (e.g. install a chat template); it is saved with the
        run, so generation later sees the same setup."""

    # -- rows -> examples --------------------------------------------------------------------------------------
    def check_columns(self, d: "DataConfig", columns: list[str], where: str) -> None:
        """Raise a ``ClmtuneError`` naming the setting when a column this task reads is missing."""

    def example(self, row: dict[str, Any], i: int, rid: str, d: "DataConfig", labels: list[str], where: str,
                labelled: bool) -> Example | None:
        """Row ``i`` as an example, or ``None`` when it has nothing to learn from (dropped and counted)."""
        raise NotImplementedError

    def render_examples(self, rows: list[dict[str, Any]], d: "DataConfig", labels: list[str] | None, where: str,
                        labelled: bool) -> tuple[list[Example], int]:
        """Each row as an example; rows with empty text dropped. Returns (examples, dropped)."""
        from clmtune.errors import ClmtuneError

        if not rows:
            return [], 0
        columns = list(rows[0].keys())
        self.check_columns(d, columns, where)
        if labelled and d.label_column not in columns:
            raise ClmtuneError(f"data.label_column={d.label_column!r} is not a column of {where} (columns: {columns})")
        out, dropped = [], 0
        for i, row in enumerate(rows):
            rid = row.get(d.id_column)
            rid = str(i) if is_missing(rid) else str(rid)
            ex = self.example(row, i, rid, d, labels or [], where, labelled)
            if ex is None:
                dropped += 1
            else:
                out.append(ex)
        return out, dropped

    # -- examples -> token ids ---------------------------------------------------------------------------------
    def example_columns(self, examples: list[Example]) -> dict[str, list]:
        """The columns ``encode`` receives (``datasets.map`` batches of them) for these examples."""
        return {"prompt": [e.prompt for e in examples],
                "target": [e.target if e.target is not None else e.label for e in examples]}

    def sequence_lengths(self, tokenizer, d: "DataConfig", examples: list[Example]) -> list[int]:
        """Tokens of each training row before any cut, as ``encode`` builds it: BOS (if the tokenizer adds one)
        + prompt + target + end token (``data.max_length: auto`` takes its 99th percentile)."""
        from clmtune.tasks.encoding import leading_special_ids, token_ids

        prefix = leading_special_ids(tokenizer)
        prompts = token_ids(tokenizer, [e.prompt for e in examples])
        targets = token_ids(tokenizer, [e.target or e.label or "" for e in examples])
        return [len(prefix) + len(p) + len(t) + 1 for p, t in zip(prompts, targets)]

    def encode(self, batch: dict[str, list], tokenizer, prefix: list[int], end_id: int, d: "DataConfig") -> dict:
        """``datasets.map(batched=True)`` body: columns ``prompt``/``target`` -> ``input_ids`` (+ ``labels``, the
        loss mask as -100) and the statistics columns ``truncated``, ``prompt_len``, ``target_len``."""
        raise NotImplementedError

    def finish_split(self, ds, stats: dict[str, Any], d: "DataConfig"):
        """Last step of a tokenized split (e.g. packing); returns the dataset with ``input_ids`` and ``labels``."""
        return ds

    # -- generation ------------------------------------------------------------------------------------------
    def format_prompt(self, text: str, d: "DataConfig", tokenizer=None) -> str:
        """The text a user's prompt is turned into before generation (as is for these shapes)."""
        return text

    def stop_strings(self, tokenizer) -> list[str]:
        """Text that ends a generated continuation besides the end token (none for these shapes)."""
        return []


@functools.lru_cache(maxsize=64)
def fields(template: str, key: str = "data.template") -> tuple[str, ...]:
    """The placeholders of a template, parsed once per template (not once per row)."""
    return tuple(template_fields(template, key))


def template_warnings(d: "DataConfig") -> list[str]:
    """A prompt template without placeholders gives every row the same prompt."""
    if d.template and not template_problem(d.template) and not fields(d.template):
        return [f"data.template={d.template!r} has no {{column}} placeholder: every prompt is the same text, so the "
                "model cannot tell rows apart; add one, e.g. 'Text : {text} label : '"]
    return []


def check_template_columns(d: "DataConfig", columns: list[str], where: str, response: bool = False) -> None:
    check_columns("data.template", list(fields(d.template)), columns, where)
    if response:
        check_columns("data.response_template", list(fields(d.response_template, "data.response_template")),
                      columns, where)
