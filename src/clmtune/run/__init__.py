"""The run folder (a foundation): the one package that knows where each file of a run lives.

A run folder is what ``clmtune train`` writes into ``train.output_dir``::

    config.yaml          the resolved config the run was trained with
    adapter/             peft adapter (adapter methods)        | model/   every weight (peft.method: full)
    tokenizer/           the tokenizer, pad token included
    train_log.jsonl      one line per logged optimizer step
    train_summary.json   written last: steps, losses, label set, data report
    checkpoints/         step-NNNNNN folders while (or after) training with train.save_steps
    eval/<what>-<method>/  one folder per evaluation (``eval_output_dir``): eval.json, predictions.csv,
                         confusion_matrix.png; <what> is the split (eval, test) or file-<stem> of ``eval --data``
    eval/index.json      every evaluation of the run: folder, split or file, method, headline metrics, time
    eval.json            the latest evaluation's results, with ``folder`` naming where its files are
    best/                the best weights so far, while training with train.save_best (moved into the result)
    loss.png             training curves, written at the end of training
    tensorboard/         event files with train.report_to: [tensorboard]
    report.html          ``clmtune report RUN``

Stages ask a ``RunDir`` for paths, for loading (config, tokenizer, model: adapter or full) and for atomic writes;
no other module spells these names. Modules (this file only re-exports them): ``files`` (the names, atomic
writes), ``folder`` (``RunDir``), ``targets`` (which output folders ``--overwrite`` may replace).
"""

from __future__ import annotations

from clmtune.run.files import (ADAPTER, BEST, CHECKPOINTS, CONFIG, CONFUSION_PNG, EVAL_INDEX, EVAL_JSON, EVALS,
                               LOSS_PNG, MODEL, PREDICTIONS_CSV, PREDICTIONS_JSONL, PREDICTIONS_TEXT_CSV, REPORT_HTML,
                               SUMMARY, TENSORBOARD, TOKENIZER, TRAIN_LOG, write_bytes_atomic, write_csv_atomic,
                               write_json_atomic, write_text_atomic)
from clmtune.run.folder import RunDir
from clmtune.run.targets import check_replace_target, enclosing_run

__all__ = ["ADAPTER", "BEST", "CHECKPOINTS", "CONFIG", "CONFUSION_PNG", "EVAL_INDEX", "EVAL_JSON", "EVALS", "LOSS_PNG",
           "MODEL", "PREDICTIONS_CSV", "PREDICTIONS_JSONL", "PREDICTIONS_TEXT_CSV", "REPORT_HTML", "RunDir", "SUMMARY",
           "TENSORBOARD", "TOKENIZER", "TRAIN_LOG", "check_replace_target", "enclosing_run", "write_bytes_atomic",
           "write_csv_atomic", "write_json_atomic", "write_text_atomic"]
