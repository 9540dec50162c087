"""Train stage: fine-tune a causal LM with a peft adapter (or every weight) on classification-as-generation data.

Engine: a plain ``accelerate`` loop, as in peft's causal-LM example, rather than ``transformers.Trainer``:
the same code runs on one CPU, under ``accelerate launch``/``torchrun`` (DDP, gloo on CPU) and with DeepSpeed,
and we keep control of what the loss is computed on (only the supervised positions) and of what is saved when.

Steps (a recipe in the manner of torchtune's recipe classes / litgpt's setup-fit-save): ``TrainRecipe.setup``
(accelerator, output folder, data, model + adapter, optimizer, schedule, resumed state), ``fit`` (the optimizer
steps, logging and checkpoints) and ``save`` (weights, tokenizer, summary). ``train(cfg)`` runs the three.
Pieces live beside it: ``loss`` (the loss and LM-head trimming), ``sampler`` (the data order), ``precision``
(bf16), ``checkpoints``.

Speed (measured by bench/bench_train.py): batches are length-grouped (``EpochSampler``) and padded
per batch; the LM head runs only on the positions that predict a label (a boolean ``logits_to_keep`` mask: for
classification ~3 positions per row instead of ~40..256, and the head is the largest matmul for big
vocabularies); the loss is a sum over label tokens divided by the label tokens of the whole optimizer step (all
accumulated batches, all processes); bf16 keeps the frozen matmul weights in bf16.

Checkpoints (``train.save_steps``) live in ``RUN/checkpoints/step-NNNNNN`` and hold the trainable weights, the
optimizer, the scheduler, the RNG states and the position in the data (epoch, batches consumed). A checkpoint is
written into a hidden temporary folder and renamed into place when complete, so a killed process never leaves a
folder that looks like a checkpoint but is not. Resuming rebuilds the same data order (it is a pure function of
seed and epoch, see ``EpochSampler``), skips the consumed batches and restores the RNG states, so a resumed run
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clmtune.config import RunConfig
from clmtune.data import prepare_data
from clmtune.defaults import resolve_run
from clmtune.errors import ClmtuneError
from clmtune.models import (apply_peft, check_tokenizer_fits, context_length, forward_inputs, load_model,
                            load_tokenizer, model_dtype, resolve_model_path, unwrap)
from clmtune.fsutil import check_writable
from clmtune.run import RunDir
from clmtune.train.checkpoints import (STATE_FILE, check_same_config, set_rng_state, trainable_state,
                                       list_checkpoints, load_checkpoint, load_weights, prepare_output_dir,
                                       resolve_resume, save_checkpoint)
from clmtune.models.head import head_returns_hidden
from clmtune.train.fusedhead import (PackedHead, frozen_head_loss, fused_head_bytes, fused_head_module,
                                     fused_head_reason)
from clmtune.train.loss import (HeadMode, causal_lm_loss, check_finite, head_positions, head_trim_support, logits_to_keep,
                                supervised_targets, supervised_tokens, virtual_tokens)
from clmtune.device import resolve_precision, training_device
from clmtune.train.precision import (bf16_unsupported_reason, frozen_matmul_weights_to_bf16, one_op_tanh_gelu,
                                     restore_modules, restore_weights)
from clmtune.memory import runtime_rss, swapped_originals_bytes
from clmtune.train.resources import (estimate_run, make_accelerator, memory_summary, prepare_base,
                                     reset_peak, restore_determinism, seed_everything)
from clmtune.train.preference import PreferenceObjective
from clmtune.train.stop import stop_after_step
from clmtune.train.sampler import EpochSampler, RowCollator
from clmtune.tasks import get_task
from clmtune.train.speed import (LossBuffer, chunked_head_bytes, chunked_head_loss, compile_forward, compile_ok,
                                 make_adamw, packed_inputs, padding_free_reason, resolve_switch,
                                 skip_update_if_not_finite)
from clmtune.train.watch import Watch, write_loss_png

log = logging.getLogger("clmtune")

OBJECTIVES = {"preference": PreferenceObjective}
"""``Task.training`` -> the objective that replaces next-token cross-entropy (``next_token`` is this module's own
``_train_window``)."""

__all__ = ["EpochSampler", "HeadMode", "TrainRecipe", "TrainResult", "bf16_unsupported_reason", "causal_lm_loss",
           "head_positions", "head_trim_support", "list_checkpoints", "logits_to_keep", "resolve_resume",
           "supervised_tokens", "train", "virtual_tokens"]


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


def trainable_summary(model) -> dict[str, int]:
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ZeRO-3
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return {"trainable_params": trainable, "all_params": total}


def _train_window(window: list[dict], model, accelerator, head: HeadMode, n_proc: int,
                  rows_seen: list[int] | None, device_loss: bool = False) -> tuple[float | torch.Tensor, int]:
    """Forward + backward over one optimizer step's batches (gradient accumulation); returns the summed loss and
    the number of supervised tokens of the window, over all processes.

    The gradient is that of (sum of token losses) / (supervised tokens of the whole window, all processes): each
    token weighs the same, however the tokens fall into batches and processes (the mean of per-batch means would
    overweight short labels in small batches). ``accelerator.backward`` divides by its accumulation steps and DDP
    averages over processes; the scale undoes both. Costs one all-reduce of one integer per step under DDP.
    ``device_loss``: the summed loss is returned as a device tensor, not read on the host (``train.speed``); the
    token counts then come from the collator's CPU-side ``counts``. A batch with ``position_ids`` is a packed,
    padding-free one (``train.padding_free``).
    """
    n_sup = sum(b["counts"][0] if "counts" in b else supervised_tokens(b["labels"]) for b in window)
    if n_proc > 1:
        n_sup = int(accelerator.reduce(torch.tensor(n_sup, device=accelerator.device), "sum"))
    scale = accelerator.gradient_accumulation_steps * n_proc / max(n_sup, 1)
    total = torch.zeros((), device=accelerator.device) if device_loss else 0.0
    for k, batch in enumerate(window):
        rows = batch.pop("rows")
        if rows_seen is not None:
            rows_seen.extend(rows)
        last = k == len(window) - 1
        # our own accumulation, not accelerator.accumulate(): the window is fetched ahead (to count its tokens),
        # which makes accelerate's end-of-dataloader test fire one window early
        accelerator.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            inputs = packed_inputs(batch) if "position_ids" in batch else forward_inputs(model, batch, backward=True)
            if head.mode:  # LM head (d x V matmul) on the supervised positions only: (N, V) logits, not (B, T, V)
                inputs["logits_to_keep"] = head_positions(batch["labels"], head.mode, head.n_virtual)
            if head.fused is not None:  # the frozen head and the loss in one pass over its weight (fusedhead)
                with head_returns_hidden(head.fused):
                    hidden = model(**inputs).logits  # (N, d): the supervised positions' final hidden states
                targets = supervised_targets(batch["labels"])
                loss = (chunked_head_loss(hidden, head.fused.weight, targets) if head.chunked
                        else frozen_head_loss(hidden, head.fused.weight, targets, head.packed))
            else:
                logits = model(**inputs).logits
                loss = causal_lm_loss(logits, batch["labels"], reduction="sum")
            accelerator.backward(loss * scale)
        total += loss.detach() if device_loss else loss.item()
    if n_proc > 1:  # the logged loss is the mean over every process's tokens
        total = accelerator.reduce(torch.as_tensor(total, device=accelerator.device), "sum")
        total = total if device_loss else float(total)
    return total, n_sup


class TrainRecipe:
    """One training run: ``setup()`` builds everything, ``fit()`` runs the optimizer steps, ``save()`` writes the
    run folder and returns the ``TrainResult``. The order of the steps inside ``setup`` is the order random numbers
    are drawn in, which a resumed run relies on: do not reorder them."""

    def __init__(self, cfg: RunConfig, progress: bool = True, resume: str | None = None):
        # every `auto` (model, learning rate, max_length) becomes a value first: the run and its saved config use it
        resolved = resolve_run(cfg, announce=int(os.environ.get("RANK", "0")) == 0)
        cfg, self.auto, self.examples = resolved.cfg, resolved.auto, resolved.examples
        self.cfg, self.progress, self.resume = cfg, progress, resume
        self.run = RunDir(cfg.train.output_dir)
        self.lock = None
        self.ckpt: Path | None = None
        self.step, self.first_loss, self.losses = 0, None, []
        self.rows_seen: list[int] = []  # rows this process trained on in its first epoch (reported for DDP)
        self.head = HeadMode()
        self.swapped: list = []
        self.activations: list = []  # modules swapped for bf16 training (one_op_tanh_gelu), put back after fit
        self.estimate, self.determinism = None, None
        self.pending, self.grad_norms = LossBuffer(), {}  # train.device_loss: device losses not yet read
        training = get_task(cfg.data.task).training
        self.objective = OBJECTIVES[training](self) if training in OBJECTIVES else None

    # -- setup -----------------------------------------------------------------------------------------------
    def setup(self) -> "TrainRecipe":
        t_cfg = self.cfg.train
        self.precision, self.precision_reason = resolve_precision(t_cfg.precision, training_device())
        if self.precision == "bf16" and (reason := bf16_unsupported_reason()):
            log.warning("train.precision=%s asked for, but %s; training in fp32 instead", t_cfg.precision, reason)
            self.precision, self.precision_reason = "fp32", reason
        log.info("training in %s (%s)", self.precision, self.precision_reason)
        self.accelerator = make_accelerator(self.cfg, self.precision)
        self.main = self.accelerator.is_main_process
        self.n_proc = self.accelerator.num_processes
        if self.main:  # before minutes of loading: a folder that cannot be written, or that another run writes
            check_writable(self.run.path)
            self.lock = self.run.lock().acquire()
            self.run.clean_temporary()
        # killed between saving the weights and the summary, without checkpoints: --resume writes the bookkeeping
        self.finishing = (self.resume is not None and self.run.has_weights() and not self.run.is_finished()
                          and not list_checkpoints(self.run.path))
        if self.resume is not None and not self.finishing:
            if t_cfg.deepspeed is not None:
                raise ClmtuneError("--resume is not supported with train.deepspeed (DeepSpeed shards the optimizer "
                                   "state); restart the run, or resume without DeepSpeed")
            self.ckpt = resolve_resume(self.run.path, self.resume)
            check_same_config(self.cfg, json.loads((self.ckpt / STATE_FILE).read_text(encoding="utf-8"))["config"],
                               self.ckpt)
        if self.main:
            if t_cfg.overwrite:  # --overwrite clears a run's outputs; never in a folder that holds the data read
                here, d = self.run.path.resolve(), self.cfg.data
                for src in (d.source, d.eval_file, d.test_file, d.prepared):
                    if src and Path(src).exists() and (Path(src).resolve() == here or
                                                       here in Path(src).resolve().parents):
                        raise ClmtuneError(f"train.output_dir {self.run.path} holds the data {src}; write the run "
                                           "into another folder")
            prepare_output_dir(self.run.path, t_cfg.overwrite, self.resume is not None)
        self.accelerator.wait_for_everyone()  # no process reads the folder before rank 0 has checked/cleaned it
        self.determinism = seed_everything(self.cfg)  # deterministic kernels too, with train.deterministic
        self._setup_data()
        self._setup_model()
        self._setup_optimization()
        self._setup_state()
        self.watch = Watch(self)
        self.watch.setup(self.resumed_state)
        return self

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = prepare_data(self.tokenizer, cfg.data, task=self.examples,
                                 context_length=context_length(cfg.model), progress=self.progress and self.main)
        self.examples = None  # kept by self.data
        # rows as plain dicts with their index: the sampler/collator report which rows each process saw
        self.features = (self.objective.features(self.data.train) if self.objective else
                         [{"input_ids": ids, "labels": lab, "row": i}
                          for i, (ids, lab) in enumerate(zip(self.data.train["input_ids"], self.data.train["labels"]))])
        log.info(self.data.summary_line())

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.is_peft = cfg.peft.method != "full"
        reset_peak(self.accelerator.device)  # the measured peak is this run's, from here on
        self.runtime = runtime_rss()  # the process before the weights: Python, torch, peft, tokenizer, data
        base = load_model(cfg.model, model_dtype(cfg.model), quantize=True)
        check_tokenizer_fits(base, self.tokenizer, cfg.model.name_or_path)
        base = prepare_base(base, cfg)  # gradient checkpointing, quantized-base preparation
        self.model = apply_peft(base, cfg.peft, tokenizer_path=resolve_model_path(cfg.model.name_or_path))
        self.params = trainable_summary(self.model)
        if self.objective:
            self.objective.setup_reference(self.model, self.features, self.accelerator.device, self.is_peft)
        log.info("model: %s, method %s, %d trainable of %d parameters (%.3f%%)", cfg.model.name_or_path,
                 cfg.peft.method, self.params["trainable_params"], self.params["all_params"],
                 100 * self.params["trainable_params"] / self.params["all_params"])

    def _setup_optimization(self) -> None:
        from transformers import get_linear_schedule_with_warmup

        cfg, t_cfg, n_proc = self.cfg, self.cfg.train, self.n_proc
        self.head_mode, self.head_reason = (head_trim_support(self.model) if t_cfg.logits_on_labels_only
                                            else (None, "train.logits_on_labels_only is off"))
        device = self.accelerator.device
        self.chunked = t_cfg.chunked_loss and not self.objective  # else the CPU's fused loss (fusedhead) where it applies
        self.fused_reason = ("the preference loss needs each sequence's log-probabilities" if self.objective else
                             fused_head_reason(self.model, device, self.is_peft, self.head_mode, self.precision,
                                               t_cfg.deepspeed is not None, any_device=self.chunked))
        self.fused_head = fused_head_module(self.model) if self.fused_reason is None else None
        self.packed_head = None
        if self.precision == "bf16" and t_cfg.deepspeed is None and self.is_peft:
            # CPU: the frozen LM head column-major (faster input gradient, same memory), or, when the fused loss
            # reads it, left fp32 and packed by oneDNN in vocabulary blocks (PackedHead; not a bf16 base's head,
            # which is read as it is, without extra memory); tanh-GELU as one op.
            # The other frozen weights are not packed: packed W and W^T for forward and backward measured slower
            # per epoch than autocast on the plain bf16 weights, for two more copies of memory.
            cpu = self.accelerator.device.type == "cpu"
            head = self.fused_head
            pack = (head is not None and head.weight.dtype == torch.float32  # a bf16 base's head: fused, unpacked
                    and not self.chunked)
            self.swapped = frozen_matmul_weights_to_bf16(self.model, cpu and head is None,
                                                         keep=(head.weight,) if pack else ())
            self.packed_head = PackedHead(head.weight) if pack else None
            self.activations = one_op_tanh_gelu(self.model) if cpu else []
        lengths = ((self.objective.lengths(self.features) if self.objective else
                    [len(f["input_ids"]) for f in self.features]) if t_cfg.group_by_length else None)
        self.sampler = EpochSampler(len(self.features), t_cfg.seed, lengths, t_cfg.batch_size)
        length = cfg.data.max_length if cfg.data.padding == "max_length" else None
        self.padding_free = False
        if t_cfg.padding_free:
            reason = ("the preference task scores chosen and rejected rows side by side" if self.objective
                      else padding_free_reason(self.model))
            if reason is not None:
                raise ClmtuneError(f"train.padding_free is on, but {reason}; set train.padding_free: false")
            self.padding_free = True
        # Own generator: DataLoader draws a base seed per epoch; from the global RNG that would shift dropout masks
        # between an uninterrupted and a resumed run.
        collator = (self.objective.collator(self.data.pad_id, length, cfg.data.pad_to_multiple_of) if self.objective
                    else RowCollator(self.data.pad_id, length, cfg.data.pad_to_multiple_of, self.padding_free))
        loader = torch.utils.data.DataLoader(self.features, batch_size=t_cfg.batch_size, sampler=self.sampler,
                                             generator=torch.Generator().manual_seed(t_cfg.seed), collate_fn=collator)
        # the preference objective reads its loss on the host (its metrics too): no device_loss there
        self.device_loss = resolve_switch(t_cfg.device_loss, device) and self.objective is None
        self.fused_adamw = resolve_switch(t_cfg.fused_adamw, device) and t_cfg.deepspeed is None
        optimizer = make_adamw([p for p in self.model.parameters() if p.requires_grad], t_cfg.learning_rate,
                               t_cfg.weight_decay, self.fused_adamw)
        if t_cfg.compile:
            compile_forward(self.model)
        # Per process: accelerate hands each process every n_proc-th batch (padding the last round: even_batches).
        self.batches_per_epoch = math.ceil(len(loader) / n_proc)
        steps_per_epoch = math.ceil(self.batches_per_epoch / t_cfg.gradient_accumulation_steps)
        # train.max_steps is the number of steps trained whatever the data size; epochs are then ignored, as in
        # transformers' Trainer.
        self.total_steps = steps_per_epoch * t_cfg.epochs if t_cfg.max_steps is None else t_cfg.max_steps
        if t_cfg.warmup_steps >= self.total_steps and self.main:
            log.warning("train.warmup_steps=%d is not shorter than the training (%d steps): the learning rate never "
                        "reaches train.learning_rate=%g; lower warmup_steps or train longer", t_cfg.warmup_steps,
                        self.total_steps, t_cfg.learning_rate)
        # accelerate's scheduler wrapper steps the schedule n_proc times per optimizer step, hence the factor.
        scheduler = get_linear_schedule_with_warmup(optimizer, t_cfg.warmup_steps * n_proc, self.total_steps * n_proc)
        self.model, self.optimizer, self.loader, self.scheduler = self.accelerator.prepare(
            self.model, optimizer, loader, scheduler)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # what max_grad_norm clips

    def _setup_state(self) -> None:
        """Resumed position, the log file, the LM-head mode."""
        self.epoch0, self.skip, self.rng, self.resumed_state = 0, 0, None, None
        if self.finishing:
            load_weights(self.run.weights(self.is_peft), self.model, self.is_peft)
        if self.ckpt is not None:
            state = self.resumed_state = load_checkpoint(self.ckpt, self.model, self.optimizer, self.scheduler,
                                                         self.is_peft)
            self.step, self.epoch0, self.skip = state["step"], state["epoch"], state["batch_in_epoch"]
            self.first_loss, self.rng = state["first_loss"], state["rng"]
            log.info("resuming from %s: step %d, epoch %d, %d batches of it done", self.ckpt, self.step,
                     self.epoch0 + 1, self.skip)
        log_path = self.run.log_file
        if self.main:
            self.run.save_config(self.cfg)
            if self.ckpt is not None and log_path.is_file():  # keep the log lines up to the checkpoint's step
                kept = [ln for ln in log_path.read_text(encoding="utf-8").splitlines()
                        if ln and json.loads(ln)["step"] <= self.step]
                log_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        resumed = self.ckpt is not None or self.finishing
        self.log_file = open(log_path, "a" if resumed else "w", encoding="utf-8") if self.main else None
        self.last_saved = self.step if self.ckpt is not None else -1
        if self.cfg.train.logits_on_labels_only:
            mode = self.head_mode
            if mode is None:
                log.info("LM head on every position (full logits): %s", self.head_reason)
            elif mode == "last":
                log.info("LM head on the last labelled positions of each batch (this model's forward takes an "
                         "integer logits_to_keep only)")
            self.head = HeadMode(mode, virtual_tokens(self.model), self.fused_head, self.packed_head,
                                 self.chunked and self.fused_head is not None)
        log.info("LM head and loss: %s", "fused, one pass over the frozen head per step" if self.head.fused
                 is not None else f"logits, then cross-entropy ({self.fused_reason})")
        self.estimate = estimate_run(unwrap(self.model), [len(f["input_ids"]) for f in self.features],
                                     [sum(1 for x in f["labels"] if x != -100) for f in self.features], self.cfg,
                                     self.precision, self.head.mode, self.runtime,
                                     lm_head_bytes=None if self.head.fused is None else
                                     functools.partial(chunked_head_bytes, weight=self.head.fused.weight)
                                     if self.head.chunked else
                                     functools.partial(fused_head_bytes, weight=self.head.fused.weight,
                                                       packed=self.packed_head is not None))
        self.estimate.weights += swapped_originals_bytes(self.swapped, self.accelerator.device)  # kept fp32 originals
        self.estimate.weights += self.packed_head.nbytes if self.packed_head else 0  # the head's 2 packed copies
        if self.main:
            log.info(self.estimate.table())

    # -- fit -------------------------------------------------------------------------------------------------
    def fit(self) -> "TrainRecipe":
        from tqdm.auto import tqdm

        t_cfg, n_proc, ga = self.cfg.train, self.n_proc, self.cfg.train.gradient_accumulation_steps
        if self.finishing:  # the weights are final: take the steps and losses from the training log
            records = self.run.log_records()
            self.step = records[-1]["step"] if records else 0
            self.first_loss = records[0]["loss"] if records else None
            self.final_loss, self.seconds = (records[-1]["loss"] if records else None), 0.0
            log.info("%s: the weights were saved but not the summary; finishing the run (step %d)", self.run.path,
                     self.step)
            if self.log_file:
                self.log_file.close()
            return self
        window_tokens, self.t0 = 0, time.perf_counter()
        window_start = self.t0
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not (self.progress and self.main),
                   unit="step")
        self.model.train()
        if self.rng is not None:
            set_rng_state(self.rng)  # last: everything above may consume random numbers
        stopper = stop_after_step(enabled=self.n_proc == 1)
        stop_request = stopper.__enter__()
        try:
            endless = t_cfg.max_steps is not None and self.batches_per_epoch > 0
            for epoch in itertools.count(self.epoch0) if endless else range(self.epoch0, t_cfg.epochs):
                if self.step >= self.total_steps:
                    break
                # skip: batches per process already done; each was one of n_proc consecutive batches of the order
                batch_in_epoch = self.skip if epoch == self.epoch0 else 0
                self.loader.set_epoch(epoch)  # DataLoaderShard re-sends its counter to the sampler at iter()
                self.sampler.skip_rows(batch_in_epoch * n_proc * t_cfg.batch_size)
                batches = iter(self.loader)
                while window := list(itertools.islice(batches, ga)):
                    seen = self.rows_seen if epoch == 0 else None
                    metrics = {}
                    if self.objective:  # n_sup: the pairs of the step
                        loss_sum, n_sup, metrics = self.objective.window(window, self.model, self.accelerator,
                                                                         self.head, n_proc, seen)
                    else:
                        loss_sum, n_sup = _train_window(window, self.model, self.accelerator, self.head, n_proc, seen,
                                                        self.device_loss)
                    grad_norm = None  # the global norm before clipping, logged as transformers.Trainer does
                    if t_cfg.max_grad_norm is not None and t_cfg.deepspeed is None:  # DeepSpeed clips itself
                        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, t_cfg.max_grad_norm)
                    due = (self.step + 1) % t_cfg.log_every == 0 or self.step + 1 == self.total_steps or (
                        t_cfg.save_steps and (self.step + 1) % t_cfg.save_steps == 0) or self.watch.due(self.step + 1)
                    if self.device_loss:  # read on the host at log lines and checkpoints only (train.speed)
                        self.pending.add(self.step + 1, loss_sum / max(n_sup, 1), grad_norm)
                        if not skip_update_if_not_finite(self.optimizer, loss_sum, grad_norm) or due:
                            self._flush_losses()  # every step when the optimizer cannot skip a bad update
                    else:
                        grad_norm = None if grad_norm is None else float(grad_norm)
                        check_finite(self.step + 1, loss_sum / max(n_sup, 1), grad_norm,  # before the update
                                     self.last_saved, self.run.checkpoints)
                        self.losses.append(loss_sum / max(n_sup, 1))
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                    batch_in_epoch += len(window)
                    window_tokens += sum(b["counts"][1] if "counts" in b else int(b["attention_mask"].sum())
                                         for b in window)
                    if self.device_loss and due:  # flushed above: the step's values were read before its update
                        grad_norm = self.grad_norms.get(self.step + 1)
                    if self.first_loss is None and self.losses:
                        self.first_loss = self.losses[0]
                    self.step += 1
                    bar.update(1)
                    if self.step % t_cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        record = {"step": self.step, "epoch": epoch + 1, "loss": round(self.losses[-1], 6),
                                  "learning_rate": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                  "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                                  "seconds": round(now - window_start, 4),  # since the previous line
                                  **{k: round(v / max(n_sup, 1), 6) for k, v in metrics.items()}}
                        self.write_log(record)
                        window_tokens, window_start = 0, now
                    t_eval = time.perf_counter()
                    stop = self.watch.after_step(epoch)  # held-out evaluation when due; early stopping
                    window_start += time.perf_counter() - t_eval  # tokens/s counts training time only
                    if self.losses:
                        bar.set_postfix(loss=f"{self.losses[-1]:.4f}", **self.watch.postfix())
                    if t_cfg.save_steps and (self.step % t_cfg.save_steps == 0 or self.step == self.total_steps):
                        self.save_checkpoint(epoch, batch_in_epoch)
                    if stop_request and self.step < self.total_steps:
                        if self.last_saved != self.step:
                            self.save_checkpoint(epoch, batch_in_epoch)
                        log.warning("stopped at step %d of %d; checkpoint in %s; continue with `clmtune train --config "
                                    "%s --resume`", self.step, self.total_steps, self.run.checkpoints,
                                    self.run.config_file)
                        raise KeyboardInterrupt
                    if self.step >= self.total_steps or stop:
                        break
                if self.watch.stopped_at is not None:
                    break
        finally:
            stopper.__exit__(None, None, None)
            bar.close()
            if self.log_file:
                self.log_file.close()
            restore_weights(self.swapped)  # the returned model is the fp32 one saved to disk
            self.head, self.packed_head = self.head._replace(packed=None), None  # free the packed head copies
            restore_modules(self.activations)
            restore_determinism(self.determinism)  # process-wide flags: leave them as they were
        self._flush_losses()  # train.device_loss: steps after the last log line (none unless stopped early)
        self.seconds = time.perf_counter() - self.t0
        if not self.losses and self.ckpt is None:
            raise ClmtuneError("no training step was run; check train.epochs, train.max_steps and the data")
        self.final_loss = (self.losses[-1] if self.losses else
                           json.loads((self.ckpt / STATE_FILE).read_text(encoding="utf-8"))["loss"])
        if t_cfg.save_steps and self.last_saved != self.step:
            self.save_checkpoint(t_cfg.epochs - 1, self.batches_per_epoch)
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
        if self.main and self.lock is not None and not self.lock.path.is_file():
            raise ClmtuneError(f"the run folder {self.run.path} was deleted or replaced while training; nothing was "
                               "saved; train again (into a folder nothing else removes)")

    def save_checkpoint(self, epoch: int, batch_in_epoch: int) -> None:
        self.check_folder()
        self._flush_losses()  # train.device_loss: no checkpoint holds an update whose loss was not checked
        if batch_in_epoch >= self.batches_per_epoch:  # store the next position: start of the next epoch
            epoch, batch_in_epoch = epoch + 1, 0
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "total_steps": self.total_steps,
                 "first_loss": self.first_loss, "loss": self.losses[-1] if self.losses else None,
                 "config": self.cfg.to_dict(), "watch": self.watch.state_dict()}
        where = save_checkpoint(self.run.path, self.model, self.optimizer, self.scheduler, self.accelerator, state,
                                self.cfg.train.save_total_limit, self.is_peft)
        self.last_saved = self.step
        log.debug("checkpoint written: %s", where)

    def release(self) -> None:
        """Give the output folder's lock back (also after an error)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- save ------------------------------------------------------------------------------------------------
    def save(self) -> TrainResult:
        from accelerate.utils import gather_object

        acc, cfg, run = self.accelerator, self.cfg, self.run
        self.check_folder()
        acc.wait_for_everyone()
        best = self.watch.finish()  # with train.save_best: the best weights are loaded back into the model
        weights = trainable_state(self.model, acc)  # collective (ZeRO-3 gather); the real weights, not shards
        per_rank = gather_object([self.rows_seen]) if self.n_proc > 1 else [self.rows_seen]
        if self.main:
            run.save_tokenizer(self.tokenizer)
            if not self.finishing:
                run.save_weights(acc.unwrap_model(self.model), self.is_peft, state_dict=weights)
            summary = {"steps": self.step, "epochs": cfg.train.epochs, "seconds": round(self.seconds, 2),
                       "first_loss": self.first_loss, "final_loss": self.final_loss, "method": cfg.peft.method,
                       "model": cfg.model.name_or_path, "learning_rate": cfg.train.learning_rate,
                       "max_length": cfg.data.max_length, "auto": self.auto,
                       "precision": self.precision,
                       "precision_reason": self.precision_reason, "lm_head_positions": self.head.mode or "all",
                       "lm_head_loss": ("chunked" if self.head.chunked else "fused") if self.head.fused is not None
                       else "logits",
                       "speed": {"device_loss": self.device_loss, "fused_adamw": self.fused_adamw,
                                 "padding_free": self.padding_free,
                                 "compile": compile_ok(unwrap(self.model)) if cfg.train.compile else None},
                       "resumed_from": str(self.ckpt) if self.ckpt else None,
                       "pad_token": {"token": self.tokenizer.pad_token, "id": self.tokenizer.pad_token_id},
                       "end_token": self.data.report["end_token"],
                       "truncated_train_rows": self.data.report["splits"]["train"]["truncated"],
                       "labels": self.data.labels, "data": self.data.report["data"], 
                       "splits": self.data.report["splits"], **self.params,
                       "memory": memory_summary(self.estimate, acc.device)}
            if "turns" in self.data.report["splits"]["train"]:  # chat: turns, tokens per turn, truncated, dropped
                summary["conversations"] = {s: {k: v for k, v in st.items() if k not in ("prompt_tokens",)}
                                            for s, st in self.data.report["splits"].items()}
            if self.watch.every:
                summary.update(eval_steps=self.watch.every, best=best, early_stopped_at=self.watch.stopped_at)
            if self.n_proc > 1:
                summary["distributed"] = {"num_processes": self.n_proc, "rows_seen_first_epoch_per_rank": per_rank}
            write_loss_png(run, best["step"] if best else None)
            run.write_json(run.summary_file.name, summary)  # last: marks the run finished
        else:
            summary = {"memory": None}
        acc.wait_for_everyone()
        return TrainResult(output_dir=run.path, steps=self.step, first_loss=self.first_loss,
                           final_loss=self.final_loss, seconds=self.seconds,
                           has_eval_split=self.data.eval is not None and len(self.data.eval) > 0,
                           resumed_from=self.ckpt, memory=summary["memory"], model=acc.unwrap_model(self.model, keep_fp32_wrapper=False))


def train(cfg: RunConfig, progress: bool = True, resume: str | None = None) -> TrainResult:
    """Train as ``cfg`` says and write the run folder (see README: "What a run folder holds").

    ``resume``: ``"latest"`` (newest checkpoint of ``train.output_dir``) or a checkpoint folder.
    """
    recipe = TrainRecipe(cfg, progress, resume)
    try:
        return recipe.setup().fit().save()
    finally:
        recipe.release()
