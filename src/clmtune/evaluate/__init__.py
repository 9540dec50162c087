"""Evaluate stage: classification as generation (accuracy, macro-F1, confusion matrix, RAFT submissions) and
perplexity of language modelling, split by job:

- ``predict``: a label per example by ``rank`` (never invalid; its kernels are the foundation ``clmtune.rank``,
  shared with the evaluation during training and the server), ``constrained`` (greedy decoding on the label
  prefix tree, ``constrained.py``; never invalid) or ``generate`` (greedy decoding, invalid outputs counted and
  optionally mapped to the nearest label); ``auto`` picks rank or constrained by the size of the label tree;
- metrics (accuracy, macro-F1, confusion matrix; perplexity) live below the stages, in ``clmtune.metrics``;
- ``report``: the files (``eval.json``, ``predictions.csv``, the confusion matrix PNG);
- ``run``: orchestration, asking the run's task which evaluation it gets.
"""

from __future__ import annotations

from clmtune.metrics import classification_metrics, perplexity
from clmtune.evaluate.predict import predict_constrained, predict_generate
from clmtune.rank.predict import Predictions, predict_rank
from clmtune.evaluate.report import plot_confusion_matrix, submission_names
from clmtune.evaluate.run import evaluate_examples, evaluate_lm, evaluate_run
from clmtune.rank.scoring import PACKED_MODEL_TYPES, RANK_STRATEGIES, LabelTree, label_scores, rank_strategy

__all__ = ["PACKED_MODEL_TYPES", "RANK_STRATEGIES", "LabelTree", "Predictions", "classification_metrics",
           "evaluate_examples", "evaluate_lm", "evaluate_run", "label_scores", "perplexity", "plot_confusion_matrix",
           "predict_constrained", "predict_generate", "predict_rank", "rank_strategy", "submission_names"]
