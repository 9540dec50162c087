"""The pieces ``TrainRecipe.setup`` builds, each returned by the function that builds it (torchtune's
``_setup_model(...) -> model`` style): the precision, the run folder claimed, the data, the model, the optimization
(optimizer, schedule, data loader, LM-head mode, speed switches), the resumed position and the memory estimate.

The recipe calls them in the order random numbers are drawn in (data, then the model's new weights, then the data
order), which a resumed run relies on.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clmtune.config import RunConfig
from clmtune.data import prepare_data
from clmtune.device import resolve_precision, training_device
from clmtune.errors import ClmtuneError
from clmtune.fsutil import check_writable
from clmtune.memory import runtime_rss, swapped_originals_bytes
from clmtune.models import (apply_peft, check_tokenizer_fits, context_length, load_model, load_tokenizer, model_dtype,
                            resolve_model_path, unwrap)
from clmtune.run import RunDir
from clmtune.train.checkpoints import (STATE_FILE, check_same_config, list_checkpoints, load_checkpoint, load_weights,
                                       prepare_output_dir, resolve_resume)
from clmtune.train.fusedhead import PackedHead, fused_head_bytes, fused_head_module, fused_head_reason
from clmtune.train.loss import HeadMode, head_trim_support, virtual_tokens
from clmtune.train.precision import bf16_unsupported_reason, frozen_matmul_weights_to_bf16, one_op_tanh_gelu
from clmtune.train.resources import estimate_run, prepare_base, reset_peak
from clmtune.train.sampler import EpochSampler, RowCollator
from clmtune.train.speed import (chunked_head_bytes, compile_forward, make_adamw, padding_free_reason,
                                 resolve_switch)

log = logging.getLogger("clmtune")


def trainable_summary(model) -> dict[str, int]:
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)  # ZeRO-3
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return {"trainable_params": trainable, "all_params": total}


def setup_precision(choice: str) -> tuple[str, str]:
    """(``bf16`` or ``fp32``, why) for ``train.precision`` on this machine."""
    precision, reason = resolve_precision(choice, training_device())
    if precision == "bf16" and (unsupported := bf16_unsupported_reason()):
        log.warning("train.precision=%s asked for, but %s; training in fp32 instead", choice, unsupported)
        precision, reason = "fp32", unsupported
    log.info("training in %s (%s)", precision, reason)
    return precision, reason


@dataclass
class Folder:
    """The run folder claimed for this run."""

    lock: Any = None
    finishing: bool = False
    """Killed between saving the weights and the summary, without checkpoints: ``--resume`` writes the bookkeeping."""
    checkpoint: Path | None = None
    """The checkpoint resumed from."""


def setup_folder(run: RunDir, cfg: RunConfig, resume: str | None, main: bool) -> Folder:
    """Check, lock and (``--overwrite``) clear the run folder; find the checkpoint ``resume`` names. The caller
    waits for every process afterwards: no process reads the folder before rank 0 has checked/cleaned it."""
    folder = Folder()
    if main:  # before minutes of loading: a folder that cannot be written, or that another run writes
        check_writable(run.path)
        folder.lock = run.lock().acquire()
    try:
        _check_folder(run, cfg, resume, main, folder)
    except BaseException:
        if folder.lock is not None:  # refused: the lock goes back with the error
            folder.lock.release()
        raise
    return folder


def _check_folder(run: RunDir, cfg: RunConfig, resume: str | None, main: bool, folder: Folder) -> None:
    if main:
        run.clean_temporary()
    folder.finishing = (resume is not None and run.has_weights() and not run.is_finished()
                        and not list_checkpoints(run.path))
    if resume is not None and not folder.finishing:
        if cfg.train.deepspeed is not None:
            raise ClmtuneError("--resume is not supported with train.deepspeed (DeepSpeed shards the optimizer "
                               "state); restart the run, or resume without DeepSpeed")
        folder.checkpoint = resolve_resume(run.path, resume)
        saved = json.loads((folder.checkpoint / STATE_FILE).read_text(encoding="utf-8"))["config"]
        check_same_config(cfg, saved, folder.checkpoint)
    if main:
        if cfg.train.overwrite:  # --overwrite clears a run's outputs; never in a folder that holds the data read
            here, d = run.path.resolve(), cfg.data
            for src in (d.source, d.eval_file, d.test_file, d.prepared):
                if src and Path(src).exists() and (Path(src).resolve() == here or here in Path(src).resolve().parents):
                    raise ClmtuneError(f"train.output_dir {run.path} holds the data {src}; write the run into "
                                       "another folder")
        prepare_output_dir(run.path, cfg.train.overwrite, resume is not None)


def setup_data(cfg: RunConfig, examples, objective, progress: bool, shape=None):
    """(tokenizer, prepared data, training rows): ``examples`` are the task's records the entry point read
    (``defaults.resolve_run``; None: read here). The rows are plain dicts with their index: the sampler and the
    collator report which rows each process saw."""
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(tokenizer, cfg.data, task=examples, context_length=context_length(cfg.model),
                        progress=progress, shape=shape)
    features = (objective.features(data.train) if objective else
                [{"input_ids": ids, "labels": lab, "row": i}
                 for i, (ids, lab) in enumerate(zip(data.train["input_ids"], data.train["labels"]))])
    log.info(data.summary_line())
    return tokenizer, data, features


def setup_model(cfg: RunConfig, tokenizer, device, objective=None, features=None, pad_id: int = 0):
    """(model with its adapter, parameter counts, the process's memory before the weights)."""
    is_peft = cfg.peft.method != "full"
    reset_peak(device)  # the measured peak is this run's, from here on
    runtime = runtime_rss()  # the process before the weights: Python, torch, peft, tokenizer, data
    base = load_model(cfg.model, model_dtype(cfg.model), quantize=True)
    check_tokenizer_fits(base, tokenizer, cfg.model.name_or_path)
    base = prepare_base(base, cfg)  # gradient checkpointing, quantized-base preparation
    model = apply_peft(base, cfg.peft, tokenizer_path=resolve_model_path(cfg.model.name_or_path))
    params = trainable_summary(model)
    if objective:
        objective.setup_reference(model, features, device, is_peft, pad_id)
    log.info("model: %s, method %s, %d trainable of %d parameters (%.3f%%)", cfg.model.name_or_path,
             cfg.peft.method, params["trainable_params"], params["all_params"],
             100 * params["trainable_params"] / params["all_params"])
    return model, params, runtime


@dataclass
class Optimization:
    """What ``setup_optimization`` builds: the prepared optimizer, schedule and data, and how each step runs."""

    model: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: EpochSampler
    trainable: list
    """What ``train.max_grad_norm`` clips."""
    total_steps: int
    batches_per_epoch: int
    """Per process."""
    head: HeadMode = HeadMode()
    fused_reason: str | None = None
    swapped: list = field(default_factory=list)
    """Frozen weights stored in bf16 for training: (parameter, fp32 original), put back after fit."""
    activations: list = field(default_factory=list)
    """Modules swapped for bf16 training (``one_op_tanh_gelu``), put back after fit."""
    device_loss: bool = False
    fused_adamw: bool = False
    padding_free: bool = False


def _bf16_layout(model, fused_head, chunked: bool, cpu: bool):
    """bf16 adapter training: (swapped weights, packed head or None, swapped activations).

    CPU: the frozen LM head column-major (faster input gradient, same memory), or, when the fused loss reads it,
    left fp32 and packed by oneDNN in vocabulary blocks (PackedHead; not a bf16 base's head, which is read as it is,
    without extra memory); tanh-GELU as one op. The other frozen weights are not packed: packed W and W^T for forward
    and backward measured slower per epoch than autocast on the plain bf16 weights, for two more copies of memory."""
    pack = fused_head is not None and fused_head.weight.dtype == torch.float32 and not chunked
    swapped = frozen_matmul_weights_to_bf16(model, cpu and fused_head is None,
                                            keep=(fused_head.weight,) if pack else ())
    packed = PackedHead(fused_head.weight) if pack else None
    return swapped, packed, one_op_tanh_gelu(model) if cpu else []


def setup_optimization(cfg: RunConfig, model, features: list[dict], pad_id: int, accelerator, precision: str,
                       objective=None) -> Optimization:
    """The LM-head mode and bf16 layout, the data order and loader, AdamW and the linear schedule, all prepared by
    ``accelerator`` (the returned ``Optimization.model`` is the prepared model)."""
    from transformers import get_linear_schedule_with_warmup

    t_cfg, n_proc, device = cfg.train, accelerator.num_processes, accelerator.device
    is_peft = cfg.peft.method != "full"
    head_mode, head_reason = (head_trim_support(model) if t_cfg.logits_on_labels_only
                              else (None, "train.logits_on_labels_only is off"))
    chunked = t_cfg.chunked_loss and not objective  # else the CPU's fused loss (fusedhead) where it applies
    fused_reason = ("the preference loss needs each sequence's log-probabilities" if objective else
                    fused_head_reason(model, device, is_peft, head_mode, precision, t_cfg.deepspeed is not None,
                                      any_device=chunked))
    fused_head = fused_head_module(model) if fused_reason is None else None
    swapped, packed_head, activations = [], None, []
    if precision == "bf16" and t_cfg.deepspeed is None and is_peft:
        swapped, packed_head, activations = _bf16_layout(model, fused_head, chunked, device.type == "cpu")
    lengths = ((objective.lengths(features) if objective else [len(f["input_ids"]) for f in features])
               if t_cfg.group_by_length else None)
    sampler = EpochSampler(len(features), t_cfg.seed, lengths, t_cfg.batch_size)
    length = cfg.data.max_length if cfg.data.padding == "max_length" else None
    if t_cfg.padding_free:
        reason = ("the preference task scores chosen and rejected rows side by side" if objective
                  else padding_free_reason(model))
        if reason is not None:
            raise ClmtuneError(f"train.padding_free is on, but {reason}; set train.padding_free: false")
    # Own generator: DataLoader draws a base seed per epoch; from the global RNG that would shift dropout masks
    # between an uninterrupted and a resumed run.
    collator = (objective.collator(pad_id, length, cfg.data.pad_to_multiple_of) if objective
                else RowCollator(pad_id, length, cfg.data.pad_to_multiple_of, bool(t_cfg.padding_free)))
    loader = torch.utils.data.DataLoader(features, batch_size=t_cfg.batch_size, sampler=sampler,
                                         generator=torch.Generator().manual_seed(t_cfg.seed), collate_fn=collator)
    # the preference objective reads its loss on the host (its metrics too): no device_loss there
    device_loss = resolve_switch(t_cfg.device_loss, device) and objective is None
    fused_adamw = resolve_switch(t_cfg.fused_adamw, device) and t_cfg.deepspeed is None
    optimizer = make_adamw([p for p in model.parameters() if p.requires_grad], t_cfg.learning_rate,
                           t_cfg.weight_decay, fused_adamw)
    if t_cfg.compile:
        compile_forward(model)
    # Per process: accelerate hands each process every n_proc-th batch (padding the last round: even_batches).
    batches_per_epoch = math.ceil(len(loader) / n_proc)
    steps_per_epoch = math.ceil(batches_per_epoch / t_cfg.gradient_accumulation_steps)
    # train.max_steps is the number of steps trained whatever the data size; epochs are then ignored, as in
    # transformers' Trainer.
    total_steps = steps_per_epoch * t_cfg.epochs if t_cfg.max_steps is None else t_cfg.max_steps
    if t_cfg.warmup_steps >= total_steps and accelerator.is_main_process:
        log.warning("train.warmup_steps=%d is not shorter than the training (%d steps): the learning rate never "
                    "reaches train.learning_rate=%g; lower warmup_steps or train longer", t_cfg.warmup_steps,
                    total_steps, t_cfg.learning_rate)
    # accelerate's scheduler wrapper steps the schedule n_proc times per optimizer step, hence the factor.
    scheduler = get_linear_schedule_with_warmup(optimizer, t_cfg.warmup_steps * n_proc, total_steps * n_proc)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    head = HeadMode()
    if t_cfg.logits_on_labels_only:
        if head_mode is None:
            log.info("LM head on every position (full logits): %s", head_reason)
        elif head_mode == "last":
            log.info("LM head on the last labelled positions of each batch (this model's forward takes an integer "
                     "logits_to_keep only)")
        head = HeadMode(head_mode, virtual_tokens(model), fused_head, packed_head, chunked and fused_head is not None)
    return Optimization(model, optimizer, scheduler, loader, sampler,
                        [p for p in model.parameters() if p.requires_grad], total_steps, batches_per_epoch, head,
                        fused_reason, swapped, activations, device_loss, fused_adamw, bool(t_cfg.padding_free))


@dataclass
class Resumed:
    """Where training starts: step, epoch, batches of that epoch already done, the RNG states to restore."""

    step: int = 0
    epoch: int = 0
    skip: int = 0
    rng: Any = None
    state: dict | None = None
    first_loss: float | None = None


def setup_resume(run: RunDir, folder: Folder, opt: Optimization, is_peft: bool) -> Resumed:
    """Load the checkpoint resumed from (or, finishing a run, its saved weights) into the prepared pieces."""
    if folder.finishing:
        load_weights(run.weights(is_peft), opt.model, is_peft)
    if folder.checkpoint is None:
        return Resumed()
    state = load_checkpoint(folder.checkpoint, opt.model, opt.optimizer, opt.scheduler, is_peft)
    resumed = Resumed(state["step"], state["epoch"], state["batch_in_epoch"], state["rng"], state,
                      state["first_loss"])
    log.info("resuming from %s: step %d, epoch %d, %d batches of it done", folder.checkpoint, resumed.step,
             resumed.epoch + 1, resumed.skip)
    return resumed


def open_log(run: RunDir, cfg: RunConfig, folder: Folder, step: int, main: bool):
    """Save the config and open ``train_log.jsonl`` (main process; None elsewhere): resumed, its lines up to the
    checkpoint's step are kept."""
    if not main:
        return None
    log_path = run.log_file
    run.save_config(cfg)
    if folder.checkpoint is not None and log_path.is_file():
        kept = [ln for ln in log_path.read_text(encoding="utf-8").splitlines() if ln and json.loads(ln)["step"] <= step]
        log_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    resumed = folder.checkpoint is not None or folder.finishing
    return open(log_path, "a" if resumed else "w", encoding="utf-8")


def setup_estimate(cfg: RunConfig, opt: Optimization, features: list[dict], precision: str, runtime: int, device):
    """The memory estimate of this run (``clmtune.memory``), with what the speed switches keep besides."""
    head = opt.head
    log.info("LM head and loss: %s", "fused, one pass over the frozen head per step" if head.fused is not None
             else f"logits, then cross-entropy ({opt.fused_reason})")
    lm_head_bytes = None
    if head.fused is not None:
        lm_head_bytes = (functools.partial(chunked_head_bytes, weight=head.fused.weight) if head.chunked else
                         functools.partial(fused_head_bytes, weight=head.fused.weight, packed=head.packed is not None))
    # a preference pair's chosen and rejected rows are padded to the longer of the two
    lengths = [max(len(f["input_ids"]), len(f.get("rejected_input_ids", ()))) for f in features]
    estimate = estimate_run(unwrap(opt.model), lengths,
                            [sum(1 for x in f["labels"] if x != -100) for f in features], cfg, precision, head.mode,
                            runtime, lm_head_bytes=lm_head_bytes)
    estimate.weights += swapped_originals_bytes(opt.swapped, device)  # the kept fp32 originals
    estimate.weights += head.packed.nbytes if head.packed else 0  # the head's 2 packed copies
    return estimate
