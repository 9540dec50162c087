"""``classify``: a prompt from ``data.template``, then one label of a closed set the model learns to write.

    input_ids = prompt_ids + label_ids + [end]        labels: -100 on the prompt
Evaluated by predicting a label per example (``rank`` or ``generate``): accuracy, macro-F1, confusion matrix.
"""

from __future__ import annotations

from typing import Any

from clmtune.tasks.encoding import build_train_example, token_ids
from clmtune.tasks.examples import Example, cell_text, is_missing, map_label, row_name
from clmtune.errors import ClmtuneError
from clmtune.tasks.base import Task, check_template_columns, fields, template_warnings
from clmtune.templates import fill_template


class ClassifyTask(Task):
    name = "classify"
    has_labels = True
    eval_splits = ("eval", "test")

    def config_warnings(self, d) -> list[str]:
        return template_warnings(d)

    def check_columns(self, d, columns, where):
        check_template_columns(d, columns, where)

    def example(self, row: dict[str, Any], i, rid, d, labels, where, labelled) -> Example | None:
        p_fields = fields(d.template)
        values = {f: cell_text(row[f], f) for f in p_fields}
        if p_fields and not any(v.strip() for v in values.values()):
            return None
        label = None
        if labelled:
            cell = row[d.label_column]
            if is_missing(cell) or not str(cell).strip():
                raise ClmtuneError(f"{where} {row_name(where, i)}: empty label in column {d.label_column!r}; "
                                   "fill it in or remove the row")
            label = map_label(cell, labels, f"{where} {row_name(where, i)}")
        return Example(id=rid, prompt=fill_template(d.template, values), label=label, text=" ".join(values.values()),
                       target=label)

    def encode(self, batch, tokenizer, prefix, end_id, d) -> dict:
        return encode_pairs(batch, tokenizer, prefix, end_id, d, build_train_example, label_arg=True)


def encode_pairs(batch: dict[str, list], tokenizer, prefix: list[int], end_id: int, d, build,
                 label_arg: bool = False) -> dict:
    """datasets.map body for prompt -> target tasks: 1,000 prompts and targets per call, tokenized by the fast
    tokenizer, each row built by ``build`` (``build_train_example`` or ``build_sft_example``)."""
    prompts = token_ids(tokenizer, batch["prompt"])
    targets = token_ids(tokenizer, batch["target"])
    out = {"input_ids": [], "labels": [], "truncated": [], "prompt_len": [], "target_len": []}
    for p, t, label in zip(prompts, targets, batch["target"]):
        p = prefix + p
        if label_arg:
            ids, labels, cut = build(p, t, end_id, d.max_length, d.truncation_side, label, keep_prefix=len(prefix))
        else:
            ids, labels, cut = build(p, t, end_id, d.max_length, d.truncation_side, len(prefix))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(cut)
        out["prompt_len"].append(len(p))
        out["target_len"].append(len(t) + 1)
    return out
