"""Metrics (a foundation: the evaluate and train stages both score with them) and their registry.

A metric is a ``Metric`` record in ``METRICS``: its key in ``eval.json`` (``eval_<name>`` in training logs), the
words reports use for it, and which way is better. Label metrics also carry ``compute(gold, predicted, labels)``
and are computed for every labelled evaluation; the others (perplexity, reward accuracy) are computed by their
evaluation and only described here. Adding a label metric is one function plus a registration::

    @label_metric("balanced_accuracy", "balanced accuracy")
    def balanced_accuracy(gold, predicted, labels): ...

and it is in ``eval.json``, ``eval/index.json``, the HTML report (final metrics, the evaluations table, the
comparison of runs, best in bold) and ``clmtune report --list``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from clmtune.errors import ClmtuneError


@dataclass(frozen=True)
class Metric:
    name: str
    """The key in ``eval.json`` and ``eval/index.json``."""
    label: str
    """How reports name it."""
    better: str = "max"
    """``max`` or ``min``: which value is best (the report's comparison of runs)."""
    compute: Callable[[list[str], list[str], list[str]], float] | None = None
    """(gold labels, predicted labels, the label set) -> the value, for label metrics; ``None``: computed by its
    evaluation."""


METRICS: dict[str, Metric] = {}
"""Name -> metric, in the order reports list them."""


def register_metric(metric: Metric) -> Metric:
    if metric.better not in ("max", "min"):
        raise ValueError(f"metric {metric.name!r}: better must be 'max' or 'min', not {metric.better!r}")
    METRICS[metric.name] = metric
    return metric


def label_metric(name: str, label: str, better: str = "max"):
    """Decorator: register ``fn(gold, predicted, labels) -> float`` as a label metric."""
    def register(fn):
        register_metric(Metric(name, label, better, fn))
        return fn
    return register


def label_metrics() -> list[Metric]:
    return [m for m in METRICS.values() if m.compute is not None]


@label_metric("accuracy", "accuracy")
def accuracy(gold: list[str], predicted: list[str], labels: list[str]) -> float:
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


@label_metric("macro_f1", "macro-F1")
def macro_f1(gold: list[str], predicted: list[str], labels: list[str]) -> float:
    """RAFT's metric: the mean F1 over the label set (a label never predicted nor gold counts as 0)."""
    from sklearn.metrics import f1_score

    return float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0))


register_metric(Metric("perplexity", "perplexity", "min"))
register_metric(Metric("reward_accuracy", "reward accuracy"))
register_metric(Metric("reward_margin", "reward margin"))


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Every registered label metric (accuracy, macro-F1, ...), per-class P/R/F1 and the confusion matrix.

    A prediction outside the label set (an invalid ``generate`` output) counts as wrong: a miss for its gold class,
    a false positive for none; the confusion matrix counts it in ``invalid_per_gold``.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    out = {m.name: m.compute(gold, predicted, labels) for m in label_metrics()}
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    per_class = {lab: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
                 for k, lab in enumerate(labels)}
    cm = confusion_matrix(gold, predicted, labels=labels).tolist()
    invalid = [sum(g == lab and pr not in labels for g, pr in zip(gold, predicted)) for lab in labels]
    return {**out, "per_class": per_class,
            "confusion_matrix": {"labels": labels, "rows_gold_cols_predicted": cm, "invalid_per_gold": invalid}}


def perplexity(model, features: Sequence[dict[str, list[int]]], pad_id: int, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Perplexity of tokenized features ``{"input_ids", "labels"}`` (labels = -100 where not scored).

    Token-weighted: exp(sum of NLL over every scored token / number of scored tokens), so a long row counts more
    than a short one and padding (label -100) never counts. Rows are left-padded per batch.
    Hidden cost: the LM head runs on all (B, T) positions -> a (B, T, V) fp32 tensor per batch.
    """
    import torch  # here: the registry above is read by reports, which need no torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from clmtune.models import forward_inputs, model_device
    from clmtune.tasks.encoding import collate
    from clmtune.tasks.examples import IGNORE_INDEX

    if not features:
        raise ClmtuneError("the split for perplexity is empty; check the data file")
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    chunks = [features[i:i + batch_size] for i in range(0, len(features), batch_size)]
    with torch.no_grad():
        for chunk in tqdm(chunks, desc="eval (perplexity)", disable=not progress, unit="batch"):
            batch = {k: v.to(model_device(model)) for k, v in collate(chunk, pad_id).items()}
            logits = model(**forward_inputs(model, batch)).logits  # (B, T', V); T' > T with prompt-learning prefixes
            logits = logits[:, -batch["input_ids"].shape[1]:].float()  # (B, T, V)
            # Position t predicts token t+1. A row's first real token follows padding (left padding) and has no
            # context: it is never scored, as in an unpadded row. (B, T-1)
            labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, IGNORE_INDEX)
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if tokens == 0:
        raise ClmtuneError("no scored tokens for perplexity (every label is -100); check the data")
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": tokens, "n": len(features)}
