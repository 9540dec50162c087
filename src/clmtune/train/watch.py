"""Watching a training run: held-out evaluation every ``train.eval_steps`` optimizer steps, the best weights
(``train.save_best``), early stopping (``train.early_stopping_patience``) and trackers (``train.report_to``).

``Watch`` is driven by the recipe (``TrainRecipe.fit``) and receives what it needs as arguments (``WatchContext``,
``HeldOut``, the model): ``log`` after each logged step, ``after_step`` after each optimizer step (evaluates when
due; says whether to stop), ``state_dict`` into every checkpoint (so a resumed run has the same best and the same
patience count), ``finish`` before the weights are saved (loads the best weights back).

Held-out loss: token-weighted mean NLL of the first ``train.eval_max_rows`` rows of the held-out split, tokenized as
for training (``clmtune.metrics.perplexity``'s ``nll_per_token``; for classification with the LM head on the
label positions only, ``supervised_nll``); for classification also accuracy and macro-F1 of
rank classification (``clmtune.rank.predict.predict_rank``) on the same rows. Every process evaluates the same rows, so
all of them take the same decision (and ZeRO-3's gathered forward sees every process).

On a CPU (no DeepSpeed) the evaluation runs on the model ``clmtune eval`` would load from the same weights
(``clmtune.train.evalcopy``: a copy with the frozen weights as loaded, put into ``eval.dtype`` by
``clmtune.inference.for_inference``: bf16 with the adapter merged and the matmuls packed), so its numbers are those
of ``clmtune eval`` and it runs at its speed; the training model is not touched and no random number is drawn, so
a run trains the same weights with evaluation on or off. Elsewhere it runs on the training model under autocast.
"""

from __future__ import annotations

import contextlib
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

from clmtune.config import DataConfig, EvalConfig, TrainConfig
from clmtune.config.run_config import WATCH_METRICS
from clmtune.errors import ClmtuneError
from clmtune.run import RunDir
from clmtune.tasks.examples import IGNORE_INDEX
from clmtune.train.evalcopy import inference_copy
from clmtune.train.loss import virtual_tokens

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


@dataclass
class WatchContext:
    """What ``Watch`` needs of a training run."""

    train: TrainConfig
    eval: EvalConfig
    data: DataConfig
    accelerator: Any
    run: RunDir
    main: bool
    is_peft: bool
    total_steps: int = 0
    fast: bool = False
    """Evaluate on an inference copy (``clmtune.train.evalcopy``): a CPU, no DeepSpeed, no quantized base."""
    originals: tuple = ()
    """What the training swapped for speed and the copy puts back: (swapped weights, swapped modules)."""


@dataclass
class HeldOut:
    """The held-out rows an evaluation scores: tokenized features; for a ``labels`` task the examples, labels and
    the tokenizer too (rank classification)."""

    features: list[dict]
    pad_id: int
    examples: list | None = None
    labels: list[str] | None = None
    tokenizer: Any = None


def held_out_rows(data, limit: int, labels_task: bool, read_examples) -> HeldOut:
    """The first ``limit`` rows of the prepared held-out split (``data``: ``prepare_data``'s result);
    ``read_examples``: reads the task's examples where ``data`` does not hold them (a ``data.prepared`` folder)."""
    if data.eval is None or len(data.eval) == 0:
        raise ClmtuneError("train.eval_steps needs a held-out split; set data.eval_fraction > 0 (or "
                           "data.eval_file), or remove train.eval_steps")
    n = min(limit, len(data.eval))
    rows = data.eval.select(range(n))
    features = [{"input_ids": i, "labels": lab} for i, lab in zip(rows["input_ids"], rows["labels"])]
    held = HeldOut(features, data.pad_id)
    if labels_task:
        examples = data.examples if data.examples is not None else read_examples()
        held.examples = [e for e in examples.eval if e.label is not None][:n]
        held.labels = data.labels
    return held


class Watch:
    """Evaluation, best weights, early stopping and trackers of one training run."""

    def __init__(self, ctx: WatchContext):
        self.ctx = ctx
        t = ctx.train
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
        self.held: HeldOut | None = None
        self.trackers = list(t.report_to)
        self.step = 0

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self, held: HeldOut | None, resumed_state: dict | None, step: int) -> None:
        """Take the held-out rows; restore the state a checkpoint saved; start the trackers."""
        self.held, self.step = held, step
        if held is not None and len(held.features) == 1 and self.ctx.main:
            log.warning("the held-out split has one row (or conversation) only: its eval_loss says little about "
                        "the model; hold out more (data.eval_fraction, data.eval_file)")
        if resumed_state and "watch" in resumed_state:
            w = resumed_state["watch"]
            if self.keeper is not None and w.get("keeper"):
                self.keeper.load_state_dict(w["keeper"])
            self.last = w.get("last", {})
        if self.trackers and self.ctx.main:
            kwargs = {"tensorboard": {"purge_step": step + 1}} if resumed_state else {}
            self.ctx.accelerator.init_trackers(self.ctx.run.tensorboard.name, init_kwargs=kwargs)

    # -- during fit ------------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.ctx.total_steps)

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        from clmtune.data import Encoder
        from clmtune.metrics import classification_metrics, perplexity
        from clmtune.rank.predict import predict_rank

        ctx, held = self.ctx, self.held
        model = ctx.accelerator.unwrap_model(model)
        t0 = time.perf_counter()
        copy = inference_copy(model, *ctx.originals, ctx.eval.dtype) if ctx.fast else None
        scorer = copy if copy is not None else model
        was_training = model.training
        scorer.eval()
        batch = ctx.eval.batch_size
        with contextlib.nullcontext() if copy is not None else ctx.accelerator.autocast():
            out = {"eval_loss": (supervised_nll(scorer, held.features, held.pad_id, batch) if held.examples else
                                 perplexity(scorer, held.features, held.pad_id, batch)["nll_per_token"])}
            if held.examples:
                preds = predict_rank(scorer, Encoder(held.tokenizer, ctx.data), held.examples, held.labels, batch,
                                     ctx.eval.normalize_by_length)
                m = classification_metrics([e.label for e in held.examples], preds.predicted, held.labels)
                out.update(eval_accuracy=m["accuracy"], eval_macro_f1=m["macro_f1"])
        del copy, scorer
        model.train(was_training)
        out = {k: round(float(v), 6) for k, v in out.items()}
        out.update(eval_rows=len(held.features), eval_seconds=round(time.perf_counter() - t0, 3))
        return out

    def after_step(self, step: int, epoch: int, model, write_log) -> bool:
        """Evaluate when due (log it through ``write_log``, keep the best weights); True when training should stop
        early."""
        self.step = step
        if not self.due(step):
            return False
        metrics = self.evaluate(model)
        self.last = {k: v for k, v in metrics.items() if k in WATCH_METRICS}
        if "eval_loss" in metrics:
            self.losses.append((step, metrics["eval_loss"]))
        write_log({"step": step, "epoch": epoch + 1, **metrics})  # the log file and the trackers
        improved = self.keeper.update(metrics, step) if self.keeper else False
        if improved and self.save_best:
            self._save_best(model)
        if self.keeper and self.patience and self.keeper.since_best >= self.patience and step < self.ctx.total_steps:
            self.stopped_at = step
            log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %d)",
                     step, self.keeper.metric, self.patience, self.keeper.best, self.keeper.best_step)
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
            self.ctx.accelerator.log(values, step=record.get("step", self.step))

    def state_dict(self) -> dict[str, Any]:
        return {"keeper": self.keeper.state_dict() if self.keeper else None, "last": self.last}

    # -- best weights ----------------------------------------------------------------------------------------
    def _save_best(self, model) -> None:
        """Write the current trainable weights to ``RUN/best`` (checkpoint format: peft adapter or safetensors)."""
        from clmtune.train.checkpoints import save_checkpoint_weights

        save_checkpoint_weights(self.ctx.run.best, model, self.ctx.accelerator, self.ctx.is_peft)

    def finish(self, model) -> dict[str, Any] | None:
        """After fit: load the best weights back into the model (they become the run's result) and say where they
        came from; None when ``train.save_best`` is off."""
        ctx = self.ctx
        if self.trackers:
            ctx.accelerator.end_training()
        if ctx.main and len(self.losses) >= 2:
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

        ctx.accelerator.wait_for_everyone()
        load_checkpoint_weights(ctx.run.best, model, ctx.is_peft)
        ctx.accelerator.wait_for_everyone()
        if ctx.main:
            shutil.rmtree(ctx.run.best, ignore_errors=True)
        return {"metric": self.keeper.metric, "mode": self.keeper.mode, "value": self.keeper.best,
                "step": self.keeper.best_step}


@torch.no_grad()
def supervised_nll(model, features: list[dict], pad_id: int, batch_size: int) -> float:
    """``clmtune.metrics.perplexity``'s ``nll_per_token`` of rows supervised on a few positions (a label and its
    end token), with the LM head run on those positions only, as training runs it (``train.loss.head_positions``):
    the full (rows x length x vocabulary) logits took three quarters of a classification run's evaluation time.
    Models without a boolean ``logits_to_keep`` get the full logits."""
    from clmtune.metrics import perplexity
    from clmtune.models import forward_inputs, model_device
    from clmtune.rank.scoring import batches
    from clmtune.tasks.encoding import collate
    from clmtune.train.loss import causal_lm_loss, head_positions, head_trim_support, supervised_tokens

    if head_trim_support(model)[0] != "mask" or virtual_tokens(model):
        return perplexity(model, features, pad_id, batch_size)["nll_per_token"]
    nll, tokens = 0.0, 0
    for chunk in batches(features, batch_size):  # left-padded batches of similar length, as perplexity's
        batch = {k: v.to(model_device(model)) for k, v in collate(chunk, pad_id).items()}
        # a row's first real token follows padding and is never scored (perplexity's rule)
        labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, 1:] = labels[:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, IGNORE_INDEX)
        if supervised_tokens(labels) == 0:
            continue
        inputs = forward_inputs(model, batch)
        inputs["logits_to_keep"] = head_positions(labels, "mask", 0)
        nll += float(causal_lm_loss(model(**inputs).logits, labels, reduction="sum"))
        tokens += supervised_tokens(labels)
    if tokens == 0:
        raise ClmtuneError("no scored tokens for the held-out loss (every label is -100); check the data")
    return nll / tokens


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
