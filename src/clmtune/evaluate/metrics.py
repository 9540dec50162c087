"""Metrics: accuracy / macro-F1 / per-class / confusion matrix of label predictions, and token-weighted perplexity."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from clmtune.errors import ClmtuneError
from clmtune.rank.scoring import batches
from clmtune.models import forward_inputs, model_device
from clmtune.tasks.encoding import collate
from clmtune.tasks.examples import IGNORE_INDEX


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (RAFT's metric, over the label set), per-class P/R/F1 and the confusion matrix.

    A prediction outside the label set (an invalid ``generate`` output) counts as wrong: a miss for its gold class,
    a false positive for none; the confusion matrix counts it in ``invalid_per_gold``.
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    acc = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    macro = f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    per_class = {lab: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
                 for k, lab in enumerate(labels)}
    cm = confusion_matrix(gold, predicted, labels=labels).tolist()
    invalid = [sum(g == lab and pr not in labels for g, pr in zip(gold, predicted)) for lab in labels]
    return {"accuracy": acc, "macro_f1": float(macro), "per_class": per_class,
            "confusion_matrix": {"labels": labels, "rows_gold_cols_predicted": cm, "invalid_per_gold": invalid}}


@torch.no_grad()
def perplexity(model, features: Sequence[dict[str, list[int]]], pad_id: int, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Perplexity of tokenized features ``{"input_ids", "labels"}`` (labels = -100 where not scored).

    Token-weighted: exp(sum of NLL over every scored token / number of scored tokens), so a long row counts more
    than a short one and padding (label -100) never counts. Rows are left-padded per batch.
    Hidden cost: the LM head runs on all (B, T) positions -> a (B, T, V) fp32 tensor per batch.
    """
    from tqdm.auto import tqdm

    if not features:
        raise ClmtuneError("the split for perplexity is empty; check the data file")
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for chunk in tqdm(list(batches(features, batch_size)), desc="eval (perplexity)", disable=not progress,
                      unit="batch"):
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
