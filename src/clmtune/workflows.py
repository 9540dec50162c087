"""Workflows: stages chained for the common cases, so the CLI and the scripts do not each repeat the chain.

``train_and_evaluate(cfg)``: train, then (when there is a held-out split and evaluation is wanted) release the
trained model and evaluate the run folder from disk, exactly as ``clmtune eval --run RUN`` would.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clmtune.config import RunConfig
from clmtune.evaluate import evaluate_run
from clmtune.train import TrainResult, train


@dataclass
class TrainEvalResult:
    train: TrainResult
    metrics: dict | None
    """What ``eval.json`` holds; ``None`` when nothing was evaluated."""
    eval_dir: Path | None
    """Where the evaluation files were written."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # set by torchrun and accelerate launch


def release_model(result: TrainResult) -> None:
    """Drop the trained model before evaluation reloads the run from disk (on ``eval.device``), so a GPU does not
    hold two copies of it."""
    import torch

    result.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_and_evaluate(cfg: RunConfig, evaluate: bool = True, progress: bool = True, resume: str | None = None,
                       on_trained: Callable[[TrainResult], object] | None = None) -> TrainEvalResult:
    """Train as ``cfg`` says, then evaluate the held-out split of the run folder (on the main process only, and
    only when the run has one and ``evaluate`` is true). ``on_trained`` is called between the two (the CLI prints
    the training summary there)."""
    result = train(cfg, progress=progress, resume=resume)
    if on_trained is not None:
        on_trained(result)
    if not (evaluate and result.has_eval_split and is_main_process()):
        return TrainEvalResult(train=result, metrics=None, eval_dir=None)
    release_model(result)
    # the examples training read: the held-out split is not read from the source again
    metrics, where = evaluate_run(result.output_dir, "eval", progress=progress, data=result.examples)
    return TrainEvalResult(train=result, metrics=metrics, eval_dir=where)
