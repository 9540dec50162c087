"""The names of a run folder's files (the layout in ``clmtune.run``'s docstring), and atomic writes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from clmtune.fsutil import atomic_write_bytes

ADAPTER = "adapter"
MODEL = "model"
TOKENIZER = "tokenizer"
CONFIG = "config.yaml"
SUMMARY = "train_summary.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"  # the best weights so far while training with train.save_best (checkpoint format)
TENSORBOARD = "tensorboard"  # event files of train.report_to: [tensorboard]
LOSS_PNG = "loss.png"
REPORT_HTML = "report.html"
# Evaluation outputs, inside ``RunDir.eval_output_dir(...)`` or a folder the user names (``eval --out``).
EVAL_JSON = "eval.json"
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSONL = "predictions.jsonl"
PREDICTIONS_TEXT_CSV = "predictions_text.csv"  # unlabelled rows: id, text, predicted (predictions.csv: ID,Label)
CONFUSION_PNG = "confusion_matrix.png"
EVALS = "eval"
EVAL_INDEX = "index.json"


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes: a temporary sibling, then os.replace, so a reader never sees half a file (clmtune.fsutil: the
# data is flushed to disk first, and a full disk is one line naming the file).


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, data)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_csv_atomic(path: str | Path, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return write_text_atomic(path, buf.getvalue())
