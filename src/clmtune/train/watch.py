"""Watching a training run: held-out evaluation every ``train.eval_steps`` optimizer steps, the best weights
(``train.save_best``), early stopping (``train.early_stopping_patience``) and trackers (``train.report_to``).

``Watch`` is driven by the recipe (``TrainRecipe.fit``): ``log`` after each logged step, ``after_step`` after each
optimizer step (evaluates when due; says whether to stop), ``state_dict`` into every checkpoint (so a resumed run has
the same best and the same patience count), ``finish`` before the weights are saved (loads the best weights back).

Held-out loss: token-weighted mean NLL of the first ``train.eval_max_rows`` rows of the held-out split, tokenized as
for training (``evaluate.metrics.perplexity``'s ``nll_per_token``); for classification also accuracy and macro-F1 of
rank classification (``evaluate.predict.predict_rank``) on the same rows. Every process evaluates the same rows, so
all of them take the same decision (and ZeRO-3's gathered forward sees every process).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clmtune.config.run_config import WATCH_METRICS
from clmtune.errors import ClmtuneError
from clmtune.run import RunDir

log = logging.getLogger("clmtune")


@dataclass
class BestKeeper:
    """The best value of ``metric`` so far (``mode`` ``max`` or ``min``), its step, and how many evaluations have
    passed since it last improved."""

    metric: str
    mode: str = "max"
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            self.since_best += 1
            return False
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.best_step, self.since_best = float(value), step, 0
            return True
        self.since_best += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "best": self.best, "best_step": self.best_step,
                "since_best": self.since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]


def tracker_check(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing, with the install line (before any training starts)."""
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ClmtuneError("train.report_to has tensorboard, but the tensorboard package is not installed; "
                           "pip install 'clmtune[tensorboard]' (or remove it from train.report_to)")


class Watch:
    """Evaluation, best weights, early stopping and trackers of one ``TrainRecipe``."""

    def __init__(self, recipe):
        self.r = recipe
        t = recipe.cfg.train
        self.every = t.eval_steps
        self.patience = t.early_stopping_patience
        self.keeper: BestKeeper | None = None
        if self.every and (t.save_best or self.patience):
            best = t.save_best or {}
            metric = best.get("metric", "eval_loss")
            self.keeper = BestKeeper(metric, best.get("mode") or WATCH_METRICS[metric])
        self.save_best = bool(t.save_best) and self.every is not None
        self.stopped_at: int | None = None
        self.last: dict[str, float] = {}
        self.losses: list[tuple[int, float]] = []  # (step, held-out loss) of each evaluation since the start
        self.features, self.examples = [], []
        self.trackers = list(t.report_to)

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, resumed_state: dict | None) -> None:
        """Pick the held-out rows; restore the state a checkpoint saved; start the trackers."""
        r, t = self.r, self.r.cfg.train
        if self.every:
            if r.data.eval is None or len(r.data.eval) == 0:
                raise ClmtuneError("train.eval_steps needs a held-out split; set data.eval_fraction > 0 (or "
                                   "data.eval_file), or remove train.eval_steps")
            n = min(t.eval_max_rows, len(r.data.eval))
            rows = r.data.eval.select(range(n))
            self.features = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
            if len(self.features) == 1 and r.main:
                log.warning("the held-out split has one row (or conversation) only: its eval_loss says little about "
                            "the model; hold out more (data.eval_fraction, data.eval_file)")
            from clmtune.tasks import get_task

            if get_task(r.cfg.data.task).evaluation == "labels":
                examples = r.data.examples
                if examples is None:  # splits read from a data.prepared folder hold token ids, not the rows
                    from clmtune.data import load_task

                    examples = load_task(r.cfg.data)
                self.examples = [e for e in examples.eval if e.label is not None][:n]
        if resumed_state and "watch" in resumed_state:
            w = resumed_state["watch"]
            if self.keeper is not None and w.get("keeper"):
                self.keeper.load_state_dict(w["keeper"])
            self.last = w.get("last", {})
        if self.trackers and r.main:
            kwargs = {"tensorboard": {"purge_step": r.step + 1}} if resumed_state else {}
            r.accelerator.init_trackers(r.run.tensorboard.name, init_kwargs=kwargs)

    # -- during fit ------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.r.total_steps)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from clmtune.data import Encoder
        from clmtune.metrics import classification_metrics, perplexity
        from clmtune.evaluate.predict import predict_rank

        r = self.r
        model = r.accelerator.unwrap_model(r.model)
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        batch = r.cfg.eval.batch_size
        with r.accelerator.autocast():
            out = {"eval_loss": perplexity(model, self.features, r.data.pad_id, batch)["nll_per_token"]}
            if self.examples:
                labels = r.data.labels
                preds = predict_rank(model, Encoder(r.tokenizer, r.cfg.data), self.examples, labels, batch,
                                     r.cfg.eval.normalize_by_length)
                m = classification_metrics([e.label for e in self.examples], preds.predicted, labels)
                out.update(eval_accuracy=m["accuracy"], eval_macro_f1=m["macro_f1"])
        model.train(was_training)
        out = {k: round(float(v), 6) for k, v in out.items()}
        out.update(eval_rows=len(self.features), eval_seconds=round(time.perf_counter() - t0, 3))
        return out

    def after_step(self, epoch: int) -> bool:
        """Evaluate when due (log it, keep the best weights); True when training should stop early."""
        r = self.r
        if not self.due(r.step):
            return False
        metrics = self.evaluate()
        self.last = {k: v for k, v in metrics.items() if k in WATCH_METRICS}
        if "eval_loss" in metrics:
            self.losses.append((r.step, metrics["eval_loss"]))
        r.write_log({"step": r.step, "epoch": epoch + 1, **metrics})  # the log file and the trackers
        improved = self.keeper.update(metrics, r.step) if self.keeper else False
        if improved and self.save_best:
            self._save_best()
        if self.keeper and self.patience and self.keeper.since_best >= self.patience and r.step < r.total_steps:
            self.stopped_at = r.step
            log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                     r.step, self.keeper.metric, self.patience, self.keeper.best, self.keeper.best_step)
            return True
        return False

    def postfix(self) -> dict[str, str]:
        short = {"eval_loss": "eval_loss", "eval_accuracy": "eval_acc", "eval_macro_f1": "eval_f1"}
        return {short[k]: f"{v:.4f}" for k, v in self.last.items() if k in short}

    def log(self, record: dict[str, Any]) -> None:
        """Send the numeric values of a log record to the trackers (main process only, by accelerate)."""
        if self.trackers:
            values = {k: v for k, v in record.items() if k not in ("step", "epoch", "eval_rows")
                      and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.r.accelerator.log(values, step=self.r.step)

    def state_dict(self) -> dict[str, Any]:
        return {"keeper": self.keeper.state_dict() if self.keeper else None, "last": self.last}

    # -- best weights ----------------------------------------------------------------------------------------
    def _save_best(self) -> None:
        """Write the current trainable weights to ``RUN/best`` (checkpoint format: peft adapter or safetensors)."""
        from clmtune.train.checkpoints import save_checkpoint_weights

        r = self.r
        save_checkpoint_weights(r.run.best, r.model, r.accelerator, r.is_peft)

    def finish(self) -> dict[str, Any] | None:
        """After fit: load the best weights back into the model (they become the run's result) and say where they
        came from; None when ``train.save_best`` is off."""
        r = self.r
        if self.trackers:
            r.accelerator.end_training()
        if r.main and len(self.losses) >= 2:
            (s0, first), (s1, last) = self.losses[0], self.losses[-1]
            low_step, low = min(self.losses, key=lambda x: x[1])
            if last > 1.1 * low:  # more than 10 % above its best: over-fitting, or a learning rate too high
                log.warning("the held-out loss rose to %.4f at step %d from %.4f at step %d (first %.4f at step %d): "
                            "the model over-fits or the learning rate is too high; train fewer steps, lower "
                            "train.learning_rate, or keep the best weights with train.save_best", last, s1, low,
                            low_step, first, s0)
        if not self.save_best or self.keeper is None or self.keeper.best_step is None:
            return None
        from clmtune.train.checkpoints import load_checkpoint_weights

        r.accelerator.wait_for_everyone()
        load_checkpoint_weights(r.run.best, r.model, r.is_peft)
        r.accelerator.wait_for_everyone()
        if r.main:
            shutil.rmtree(r.run.best, ignore_errors=True)
        return {"metric": self.keeper.metric, "mode": self.keeper.mode, "value": self.keeper.best,
                "step": self.keeper.best_step}


def write_loss_png(run: RunDir, best_step: int | None = None) -> Path | None:
    """``RUN/loss.png`` from ``train_log.jsonl`` (``clmtune.curves``); a picture that
    cannot be drawn is logged, never fatal: the trained weights are already saved."""
    from clmtune.curves import plot_loss

    records = [json.loads(ln) for ln in run.log_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    try:
        return plot_loss(records, run.loss_png, title=f"{run.path.name}: loss", best_step=best_step)
    except Exception as exc:  # noqa: BLE001  (matplotlib/font problems must not fail a finished training)
        log.warning("could not draw %s: %s", run.loss_png, exc)
        return None
