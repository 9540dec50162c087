"""``TrainRecipe``: one training run as ``setup`` (the pieces of ``train.setup``, each returned by its function),
``fit`` (the optimizer steps, logging, evaluation and checkpoints, top to bottom as in nanoGPT's loop) and ``save``
(weights, tokenizer, summary)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from clmtune.config import RunConfig
from clmtune.defaults import resolve_run
from clmtune.errors import ClmtuneError
from clmtune.models import unwrap
from clmtune.run import RunDir
from clmtune.train.checkpoints import STATE_FILE, save_checkpoint, set_rng_state, trainable_state
from clmtune.train.loss import check_finite
from clmtune.train.precision import restore_modules, restore_weights
from clmtune.train.preference import PreferenceObjective
from clmtune.train.resources import make_accelerator, memory_summary, restore_determinism, seed_everything
from clmtune.train.setup import (Folder, open_log, setup_data, setup_estimate, setup_folder, setup_model,
                                 setup_optimization, setup_precision, setup_resume)
from clmtune.train.speed import LossBuffer, compile_ok, skip_update_if_not_finite
from clmtune.train.step import train_window
from clmtune.train.stop import stop_after_step
from clmtune.train.watch import HeldOut, Watch, WatchContext, held_out_rows, write_loss_png

log = logging.getLogger("clmtune")

OBJECTIVES = {"preference": PreferenceObjective}
"""``Task.training`` -> the objective that replaces next-token cross-entropy (``next_token``: ``step.train_window``)."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    has_eval_split: bool
    resumed_from: Path | None = None
    memory: dict | None = None
    """``train_summary.json``'s ``memory``: the estimate's parts and the measured peak (bytes)."""
    model: object = None
    """The trained (unwrapped) model, for callers that go on in the same process."""
    examples: object = None
    """The task's examples the run was trained from (``TaskData``; ``None`` for a ``data.prepared`` folder): the
    evaluation right after training takes them instead of reading the source again."""


class TrainRecipe:
    """One training run: ``setup()`` builds everything, ``fit()`` runs the optimizer steps, ``save()`` writes the
    run folder and returns the ``TrainResult``. The order of the steps inside ``setup`` is the order random numbers
    are drawn in, which a resumed run relies on: do not reorder them."""

    def __init__(self, cfg: RunConfig, progress: bool = True, resume: str | None = None):
        # every `auto` (model, learning rate, max_length) becomes a value first; the task and its records are
        # resolved there once and handed down
        resolved = resolve_run(cfg, announce=int(os.environ.get("RANK", "0")) == 0)
        self.cfg, self.auto, self.task, self.examples = resolved.cfg, resolved.auto, resolved.task, resolved.examples
        self.progress, self.resume = progress, resume
        self.run = RunDir(self.cfg.train.output_dir)
        self.folder = Folder()
        self.step, self.first_loss, self.losses = 0, None, []
        self.rows_seen: list[int] = []  # rows this process trained on in its first epoch (reported for DDP)
        self.pending, self.grad_norms = LossBuffer(), {}  # train.device_loss: device losses not yet read
        self.determinism, self.log_file, self.last_saved, self.objective = None, None, -1, None

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self) -> "TrainRecipe":
        cfg = self.cfg
        self.precision, self.precision_reason = setup_precision(cfg.train.precision)
        self.accelerator = acc = make_accelerator(cfg, self.precision)
        self.main, self.n_proc = acc.is_main_process, acc.num_processes
        objective = OBJECTIVES.get(self.task.training)
        self.objective = objective(cfg.preference, self.progress and self.main) if objective else None
        self.folder = setup_folder(self.run, cfg, self.resume, self.main)
        acc.wait_for_everyone()  # no process reads the folder before rank 0 has checked/cleaned it
        self.determinism = seed_everything(cfg)  # deterministic kernels too, with train.deterministic
        self.tokenizer, self.data, self.features = setup_data(cfg, self.examples, self.objective,
                                                              self.progress and self.main, self.task)
        self.examples = None  # kept by self.data
        self.is_peft = cfg.peft.method != "full"
        model, self.params, runtime = setup_model(cfg, self.tokenizer, acc.device, self.objective, self.features,
                                                  self.data.pad_id)
        self.opt = setup_optimization(cfg, model, self.features, self.data.pad_id, acc, self.precision,
                                      self.objective)
        self.model = self.opt.model
        self.resumed = setup_resume(self.run, self.folder, self.opt, self.is_peft)
        self.step, self.first_loss = self.resumed.step, self.resumed.first_loss
        self.log_file = open_log(self.run, cfg, self.folder, self.step, self.main)
        self.last_saved = self.step if self.folder.checkpoint is not None else -1
        self.estimate = setup_estimate(cfg, self.opt, self.features, self.precision, runtime, acc.device)
        if self.main:
            log.info(self.estimate.table())
        self.watch = self._setup_watch()
        return self

    def _setup_watch(self) -> Watch:
        cfg, opt = self.cfg, self.opt
        fast = self.accelerator.device.type == "cpu" and cfg.train.deepspeed is None and not (
            cfg.model.load_in_4bit or cfg.model.load_in_8bit)
        ctx = WatchContext(cfg.train, cfg.eval, cfg.data, self.accelerator, self.run, self.main, self.is_peft,
                           opt.total_steps, fast, (opt.swapped, opt.activations))
        watch = Watch(ctx)
        held: HeldOut | None = None
        if watch.every:
            from clmtune.data import load_task

            held = held_out_rows(self.data, cfg.train.eval_max_rows, self.task.evaluation == "labels",
                                 lambda: load_task(cfg.data))  # a data.prepared folder holds token ids only
            held.tokenizer = self.tokenizer
        watch.setup(held, self.resumed.state, self.step)
        return watch

    # -- fit -------------------------------------------------------------------------------------------------
    def fit(self) -> "TrainRecipe":
        from tqdm.auto import tqdm

        if self.folder.finishing:
            return self._finish_from_log()
        t_cfg, opt, total = self.cfg.train, self.opt, self.opt.total_steps
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not (self.progress and self.main),
                   unit="step")
        self.t0 = self.since = time.perf_counter()
        self.tokens = 0
        self.model.train()
        if self.resumed.rng is not None:
            set_rng_state(self.resumed.rng)  # last: everything above may consume random numbers
        stopper = stop_after_step(enabled=self.n_proc == 1)
        stop_request = stopper.__enter__()
        try:
            endless = t_cfg.max_steps is not None and opt.batches_per_epoch > 0
            for epoch in itertools.count(self.resumed.epoch) if endless else range(self.resumed.epoch, t_cfg.epochs):
                if self.step >= total:
                    break
                # skip: batches per process already done; each was one of n_proc consecutive batches of the order
                batch_in_epoch = self.resumed.skip if epoch == self.resumed.epoch else 0
                opt.loader.set_epoch(epoch)  # DataLoaderShard re-sends its counter to the sampler at iter()
                opt.sampler.skip_rows(batch_in_epoch * self.n_proc * t_cfg.batch_size)
                batches = iter(opt.loader)
                while window := list(itertools.islice(batches, t_cfg.gradient_accumulation_steps)):
                    grad_norm, n_sup, metrics = self._optimizer_step(window, epoch)
                    batch_in_epoch += len(window)
                    self.step += 1
                    bar.update(1)
                    if self.step % t_cfg.log_every == 0 or self.step == total:
                        self._log_step(epoch, grad_norm, n_sup, metrics)
                    t_eval = time.perf_counter()
                    stop = self.watch.after_step(self.step, epoch, self.model, self.write_log)
                    self.since += time.perf_counter() - t_eval  # tokens/s counts training time only
                    if self.losses:
                        bar.set_postfix(loss=f"{self.losses[-1]:.4f}", **self.watch.postfix())
                    if t_cfg.save_steps and (self.step % t_cfg.save_steps == 0 or self.step == total):
                        self.save_checkpoint(epoch, batch_in_epoch)
                    if stop_request and self.step < total:
                        self._stop_here(epoch, batch_in_epoch)
                    if self.step >= total or stop:
                        break
                if self.watch.stopped_at is not None:
                    break
        finally:
            stopper.__exit__(None, None, None)
            bar.close()
            self._after_fit()
        self._flush_losses()  # train.device_loss: steps after the last log line (none unless stopped early)
        self.seconds = time.perf_counter() - self.t0
        ckpt = self.folder.checkpoint
        if not self.losses and ckpt is None:
            raise ClmtuneError("no training step was run; check train.epochs, train.max_steps and the data")
        self.final_loss = (self.losses[-1] if self.losses else
                           json.loads((ckpt / STATE_FILE).read_text(encoding="utf-8"))["loss"])
        if t_cfg.save_steps and self.last_saved != self.step:
            self.save_checkpoint(t_cfg.epochs - 1, opt.batches_per_epoch)
        return self

    def _optimizer_step(self, window: list[dict], epoch: int) -> tuple[float | None, int, dict]:
        """Forward, backward and update of one window; returns (gradient norm, supervised tokens, objective metric
        sums). The loss is checked before the update (read on the host every step, or, with ``train.device_loss``,
        at log lines, checkpoints and evaluations, or every step where the optimizer cannot skip a bad update)."""
        t_cfg, opt, step = self.cfg.train, self.opt, self.step + 1
        seen = self.rows_seen if epoch == 0 else None
        metrics = {}
        if self.objective:  # n_sup: the pairs of the step
            loss_sum, n_sup, metrics = self.objective.window(window, self.model, self.accelerator, opt.head,
                                                             self.n_proc, seen)
        else:
            loss_sum, n_sup = train_window(window, self.model, self.accelerator, opt.head, self.n_proc, seen,
                                           opt.device_loss)
        grad_norm = None  # the global norm before clipping, logged as transformers.Trainer does
        if t_cfg.max_grad_norm is not None and t_cfg.deepspeed is None:  # DeepSpeed clips itself
            grad_norm = self.accelerator.clip_grad_norm_(opt.trainable, t_cfg.max_grad_norm)
        due = step % t_cfg.log_every == 0 or step == opt.total_steps or (
            t_cfg.save_steps and step % t_cfg.save_steps == 0) or self.watch.due(step)
        if opt.device_loss:
            self.pending.add(step, loss_sum / max(n_sup, 1), grad_norm)
            if not skip_update_if_not_finite(opt.optimizer, loss_sum, grad_norm) or due:
                self._flush_losses()
        else:
            grad_norm = None if grad_norm is None else float(grad_norm)
            check_finite(step, loss_sum / max(n_sup, 1), grad_norm, self.last_saved, self.run.checkpoints)
            self.losses.append(loss_sum / max(n_sup, 1))
        opt.optimizer.step()
        opt.scheduler.step()
        opt.optimizer.zero_grad()
        self.tokens += sum(b["counts"][1] if "counts" in b else int(b["attention_mask"].sum()) for b in window)
        if opt.device_loss and due:  # flushed above: the step's values were read before its update
            grad_norm = self.grad_norms.get(step)
        if self.first_loss is None and self.losses:
            self.first_loss = self.losses[0]
        return grad_norm, n_sup, metrics

    def _log_step(self, epoch: int, grad_norm, n_sup: int, metrics: dict) -> None:
        now = time.perf_counter()
        self.write_log({"step": self.step, "epoch": epoch + 1, "loss": round(self.losses[-1], 6),
                        "learning_rate": self.opt.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "tokens_per_s": round(self.tokens / max(now - self.since, 1e-9), 1),
                        "seconds": round(now - self.since, 4),  # since the previous line
                        **{k: round(v / max(n_sup, 1), 6) for k, v in metrics.items()}})
        self.tokens, self.since = 0, now

    def _stop_here(self, epoch: int, batch_in_epoch: int) -> None:
        """A stop signal arrived (``train.stop``): checkpoint this step and end with KeyboardInterrupt."""
        if self.last_saved != self.step:
            self.save_checkpoint(epoch, batch_in_epoch)
        log.warning("stopped at step %d of %d; checkpoint in %s; continue with `clmtune train --config %s --resume`",
                    self.step, self.opt.total_steps, self.run.checkpoints, self.run.config_file)
        raise KeyboardInterrupt

    def _after_fit(self) -> None:
        """Put back what training swapped for speed: the returned model is the fp32 one saved to disk."""
        if self.log_file:
            self.log_file.close()
        restore_weights(self.opt.swapped)
        self.opt.head = self.opt.head._replace(packed=None)  # free the packed head copies
        restore_modules(self.opt.activations)
        restore_determinism(self.determinism)  # process-wide flags: leave them as they were

    def _finish_from_log(self) -> "TrainRecipe":
        """The weights are final (``Folder.finishing``): the steps and losses come from the training log."""
        records = self.run.log_records()
        self.step = records[-1]["step"] if records else 0
        self.first_loss = records[0]["loss"] if records else None
        self.final_loss, self.seconds = (records[-1]["loss"] if records else None), 0.0
        log.info("%s: the weights were saved but not the summary; finishing the run (step %d)", self.run.path,
                 self.step)
        if self.log_file:
            self.log_file.close()
        return self

    def _flush_losses(self) -> None:
        """train.device_loss: read the pending steps' losses and gradient norms (one host synchronisation), refuse
        a non-finite one (before any checkpoint holds its update) and append them to ``self.losses``."""
        for step, loss, grad_norm in self.pending.flush():
            check_finite(step, loss, grad_norm, self.last_saved, self.run.checkpoints)
            self.losses.append(loss)
            self.grad_norms = {step: grad_norm}

    def write_log(self, record: dict) -> None:
        """One ``train_log.jsonl`` line (main process) and the same values to the trackers."""
        if self.main:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()
        self.watch.log(record)

    def check_folder(self) -> None:
        """The run folder (with this run's lock) is still there: deleted or replaced during training, saving into
        it would recreate a partial folder, or fail with FileNotFoundError after the whole training."""
        lock = self.folder.lock
        if self.main and lock is not None and not lock.path.is_file():
            raise ClmtuneError(f"the run folder {self.run.path} was deleted or replaced while training; nothing was "
                               "saved; train again (into a folder nothing else removes)")

    def save_checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        self.check_folder()
        self._flush_losses()  # train.device_loss: no checkpoint holds an update whose loss was not checked
        if batch_in_epoch >= self.opt.batches_per_epoch:  # store the next position: start of the next epoch
            epoch, batch_in_epoch = epoch + 1, 0
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                 "total_steps": self.opt.total_steps, "first_loss": self.first_loss,
                 "loss": self.losses[-1] if self.losses else None, "config": self.cfg.to_dict(),
                 "watch": self.watch.state_dict()}
        where = save_checkpoint(self.run.path, self.model, self.opt.optimizer, self.opt.scheduler, self.accelerator,
                                state, self.cfg.train.save_total_limit, self.is_peft)
        self.last_saved = self.step
        log.debug("checkpoint written: %s", where)

    def release(self) -> None:
        """Give the output folder's lock back (also after an error)."""
        if self.folder.lock is not None:
            self.folder.lock.release()
            self.folder.lock = None

    # -- save ------------------------------------------------------------------------------------------------
    def save(self) -> TrainResult:
        from accelerate.utils import gather_object

        acc, run = self.accelerator, self.run
        self.check_folder()
        acc.wait_for_everyone()
        best = self.watch.finish(self.model)  # with train.save_best: the best weights are loaded back into the model
        weights = trainable_state(self.model, acc)  # collective (ZeRO-3 gather); the real weights, not shards
        per_rank = gather_object([self.rows_seen]) if self.n_proc > 1 else [self.rows_seen]
        summary = {"memory": None}
        if self.main:
            run.save_tokenizer(self.tokenizer)
            if not self.folder.finishing:
                run.save_weights(acc.unwrap_model(self.model), self.is_peft, state_dict=weights)
            summary = self._summary(best, per_rank)
            write_loss_png(run, best["step"] if best else None)
            run.write_json(run.summary_file.name, summary)  # last: marks the run finished
        acc.wait_for_everyone()
        return TrainResult(output_dir=run.path, steps=self.step, first_loss=self.first_loss,
                           final_loss=self.final_loss, seconds=self.seconds,
                           has_eval_split=self.data.eval is not None and len(self.data.eval) > 0,
                           resumed_from=self.folder.checkpoint, memory=summary["memory"],
                           model=acc.unwrap_model(self.model, keep_fp32_wrapper=False), examples=self.data.examples)

    def _summary(self, best: dict | None, per_rank: list) -> dict:
        """``train_summary.json``."""
        cfg, opt, report = self.cfg, self.opt, self.data.report
        head = opt.head
        summary = {"steps": self.step, "epochs": cfg.train.epochs, "seconds": round(self.seconds, 2),
                   "first_loss": self.first_loss, "final_loss": self.final_loss, "method": cfg.peft.method,
                   "model": cfg.model.name_or_path, "learning_rate": cfg.train.learning_rate,
                   "max_length": cfg.data.max_length, "auto": self.auto, "precision": self.precision,
                   "precision_reason": self.precision_reason, "lm_head_positions": head.mode or "all",
                   "lm_head_loss": ("chunked" if head.chunked else "fused") if head.fused is not None else "logits",
                   "speed": {"device_loss": opt.device_loss, "fused_adamw": opt.fused_adamw,
                             "padding_free": opt.padding_free,
                             "compile": compile_ok(unwrap(self.model)) if cfg.train.compile else None},
                   "resumed_from": str(self.folder.checkpoint) if self.folder.checkpoint else None,
                   "pad_token": {"token": self.tokenizer.pad_token, "id": self.tokenizer.pad_token_id},
                   "end_token": report["end_token"], "truncated_train_rows": report["splits"]["train"]["truncated"],
                   "labels": self.data.labels, "data": report["data"], "splits": report["splits"], **self.params,
                   "memory": memory_summary(self.estimate, self.accelerator.device)}
        if "turns" in report["splits"]["train"]:  # chat: turns, tokens per turn, truncated, dropped
            summary["conversations"] = {s: {k: v for k, v in st.items() if k not in ("prompt_tokens",)}
                                        for s, st in report["splits"].items()}
        if self.watch.every:
            summary.update(eval_steps=self.watch.every, best=best, early_stopped_at=self.watch.stopped_at)
        if self.n_proc > 1:
            summary["distributed"] = {"num_processes": self.n_proc, "rows_seen_first_epoch_per_rank": per_rank}
        return summary


def train(cfg: RunConfig, progress: bool = True, resume: str | None = None) -> TrainResult:
    """Train as ``cfg`` says and write the run folder (see README: "What a run folder holds").

    ``resume``: ``"latest"`` (newest checkpoint of ``train.output_dir``) or a checkpoint folder.
    """
    recipe = TrainRecipe(cfg, progress, resume)
    try:
        return recipe.setup().fit().save()
    finally:
        recipe.release()
