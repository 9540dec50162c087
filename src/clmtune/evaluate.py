"""Evaluate stage: accuracy and macro-F1 of classification as generation, and predictions files.

Two methods:
- ``rank``: append each label's tokens (+ end token) to the prompt, sum their log-probabilities, predict the
  label with the highest score. Always a valid label.
- ``generate``: greedy decoding of up to (longest label + 2) tokens, stop at the end token, strip whitespace and
  compare with the label names (peft's example); outputs that match no label are counted as ``invalid``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clmtune.config import EVAL_METHODS, RunConfig
from clmtune.data import ClassificationEncoder, Example, collate, left_pad, load_task, read_table, render_examples
from clmtune.errors import ClmtuneError
from clmtune.models import forward_inputs, load_run


@dataclass
class Predictions:
    predicted: list[str]
    invalid: int


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def label_scores(model, encoder: ClassificationEncoder, prompts: list[list[int]], labels: list[str],
                 batch_size: int, normalize: bool = False, progress: bool = False) -> torch.Tensor:
    """(n_examples, n_labels) log-likelihood of each label's tokens + end token after each prompt.

    Sequences are left-padded, so every continuation sits at the end of its row; the LM head runs only on the last
    (longest continuation + 1) positions via ``logits_to_keep`` instead of all T (saves a (B, T, V) matmul).
    """
    from tqdm.auto import tqdm

    conts = [ids + [encoder.end_id] for ids in encoder.label_ids(labels)]
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(labels))]
    scores = torch.empty(len(prompts), len(labels))
    keep = max(len(c) for c in conts) + 1
    for chunk in tqdm(list(_batches(pairs, batch_size)), desc="eval (rank)", disable=not progress, unit="batch"):
        feats = [{"input_ids": prompts[i] + conts[j]} for i, j in chunk]
        batch = collate(feats, encoder.pad_id)
        logits = model(**forward_inputs(model, batch), logits_to_keep=keep).logits  # (B, keep, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (i, j) in enumerate(chunk):
            c = torch.tensor(conts[j])
            # token at position T-len(c)+k is predicted by logits at position T-len(c)+k-1, i.e. keep-len(c)-1+k
            pos = torch.arange(keep - len(c) - 1, keep - 1)
            lp = logprobs[row, pos, c]
            scores[i, j] = lp.mean() if normalize else lp.sum()
    return scores


@torch.no_grad()
def predict_rank(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                 normalize: bool = False, progress: bool = False) -> Predictions:
    reserve = max(len(c) for c in encoder.label_ids(labels)) + 1
    prompts, _ = encoder.encode_prompts(examples, reserve=reserve)
    scores = label_scores(model, encoder, prompts, labels, batch_size, normalize, progress)
    return Predictions(predicted=[labels[k] for k in scores.argmax(dim=1).tolist()], invalid=0)


@torch.no_grad()
def predict_generate(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                     progress: bool = False) -> Predictions:
    from tqdm.auto import tqdm

    max_new = max(len(c) for c in encoder.label_ids(labels)) + 2
    prompts, _ = encoder.encode_prompts(examples, reserve=max_new)
    tok = encoder.tokenizer
    predicted, invalid = [], 0
    for chunk in tqdm(list(_batches(prompts, batch_size)), desc="eval (generate)", disable=not progress,
                      unit="batch"):
        ids = left_pad(chunk, encoder.pad_id)
        mask = left_pad([[1] * len(c) for c in chunk], 0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=encoder.end_id, pad_token_id=encoder.pad_id)
        for row in out[:, ids.shape[1]:].tolist():
            if encoder.end_id in row:
                row = row[:row.index(encoder.end_id)]
            text = tok.decode(row, skip_special_tokens=True).strip()
            invalid += text not in labels
            predicted.append(text)
    return Predictions(predicted=predicted, invalid=invalid)


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (RAFT's metric, over the label set), per-class P/R/F1 and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    acc = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    macro = f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    per_class = {lab: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
                 for k, lab in enumerate(labels)}
    cm = confusion_matrix(gold, predicted, labels=labels).tolist()
    return {"accuracy": acc, "macro_f1": float(macro), "per_class": per_class,
            "confusion_matrix": {"labels": labels, "rows_gold_cols_predicted": cm}}


def evaluate_examples(model, tokenizer, cfg: RunConfig, examples: list[Example], labels: list[str],
                      method: str, out_dir: Path, progress: bool = True) -> dict:
    """Predict ``examples``; write ``predictions.csv`` (and ``eval.json``) into ``out_dir``; return the metrics."""
    if method not in EVAL_METHODS:
        raise ClmtuneError(f"eval method {method!r} is not one of {', '.join(EVAL_METHODS)}")
    if not examples:
        raise ClmtuneError("the split to evaluate is empty; check the data file")
    encoder = ClassificationEncoder(tokenizer, cfg.data)
    t0 = time.perf_counter()
    if method == "rank":
        preds = predict_rank(model, encoder, examples, labels, cfg.eval.batch_size, cfg.eval.normalize_by_length,
                             progress)
    else:
        preds = predict_generate(model, encoder, examples, labels, cfg.eval.batch_size, progress)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    labelled = all(e.label is not None for e in examples)
    result = {"method": method, "n": len(examples), "invalid": preds.invalid, "seconds": round(seconds, 3),
              "examples_per_s": round(len(examples) / max(seconds, 1e-9), 2)}
    if labelled:
        result.update(classification_metrics([e.label for e in examples], preds.predicted, labels))
        with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "text", "gold", "predicted"])
            w.writerows([e.id, e.text, e.label, p] for e, p in zip(examples, preds.predicted))
    else:  # RAFT submission shape
        with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["ID", "Label"])
            w.writerows([e.id, p] for e, p in zip(examples, preds.predicted))
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def evaluate_run(run_dir: str | Path, split: str = "eval", data_file: str | None = None, method: str | None = None,
                 out_dir: str | Path | None = None, progress: bool = True) -> tuple[dict, Path]:
    """Evaluate a trained run on its held-out split (``eval``), its unlabelled ``test`` split, or ``data_file``.

    Returns (metrics, folder written to). Default folders: the run folder for ``eval``, ``RUN/test`` for ``test``,
    ``RUN/eval-<file stem>`` for a data file.
    """
    run_dir = Path(run_dir)
    model, tokenizer, cfg = load_run(run_dir)
    labels = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))["labels"]
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise ClmtuneError(f"--data {data_file!r}: no such file")
        rows = read_table(path)
        labelled = bool(rows) and cfg.data.label_column in rows[0]
        examples, _ = render_examples(rows, cfg.data, labels, str(path), labelled=labelled)
        default_out = run_dir / f"eval-{path.stem}"
    else:
        if split not in ("eval", "test"):
            raise ClmtuneError(f"--split {split!r} is not one of eval, test")
        task = load_task(cfg.data)
        examples = task.eval if split == "eval" else task.test
        if not examples:
            raise ClmtuneError(f"the run's {split!r} split is empty" + (
                "; set data.eval_fraction > 0 or pass --data FILE" if split == "eval" else
                "; set data.test_file or pass --data FILE"))
        default_out = run_dir if split == "eval" else run_dir / "test"
    out = Path(out_dir) if out_dir else default_out
    result = evaluate_examples(model, tokenizer, cfg, examples, labels, method or cfg.eval.method, out, progress)
    return result, out
