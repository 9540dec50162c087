"""Train stage: fine-tune a causal LM with a peft adapter on classification-as-generation data.

Engine: a plain ``accelerate`` loop, as in peft's causal-LM example, rather than ``transformers.Trainer``:
the same code runs on one CPU, under ``accelerate launch``/``torchrun`` (DDP) and with DeepSpeed, and we keep
control of what the loss is computed on (only the supervised positions) and of what is saved when.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from clmtune.config import RunConfig, save_config
from clmtune.data import IGNORE_INDEX, collate, prepare_data
from clmtune.errors import ClmtuneError
from clmtune.models import apply_peft, context_length, forward_inputs, load_model, load_tokenizer

log = logging.getLogger("clmtune")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    seconds: float
    has_eval_split: bool
    model: object = None
    """The trained (unwrapped) model, for callers that go on in the same process."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions.

    logits: (B, T, V) for the last T positions of the batch; labels: (B, T_full) with T_full >= T.
    Position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:] (of the same last T).
    """
    labels = labels[:, -logits.shape[1]:]
    shift_logits = logits[:, :-1].float()  # (B, T-1, V); fp32 for a stable log-softmax under bf16 autocast
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    finished = (path / "adapter" / "adapter_config.json").is_file()
    if finished and not overwrite:
        raise ClmtuneError(f"{path} already holds a finished run; choose another train.output_dir or pass "
                           "--overwrite (or --train.overwrite true)")
    path.mkdir(parents=True, exist_ok=True)


def trainable_summary(model) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "all_params": total}


def train(cfg: RunConfig, progress: bool = True) -> TrainResult:
    """Train an adapter as ``cfg`` says and write the run folder (see README: "What a run folder holds")."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    t_cfg = cfg.train
    out = Path(t_cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
                              mixed_precision="bf16" if t_cfg.precision == "bf16" else "no")
    main = accelerator.is_main_process
    if main:
        prepare_output_dir(out, t_cfg.overwrite)
    set_seed(t_cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(tokenizer, cfg.data, context_length=context_length(cfg.model), progress=progress and main)
    features, truncated = data.train, data.report["splits"]["train"]["truncated"]
    log.info(data.summary_line())

    model = apply_peft(load_model(cfg.model), cfg.peft)
    params = trainable_summary(model)
    log.info("model: %s, %d trainable of %d parameters (%.3f%%)", cfg.model.name_or_path,
             params["trainable_params"], params["all_params"], 100 * params["trainable_params"] / params["all_params"])

    length = cfg.data.max_length if cfg.data.padding == "max_length" else None
    loader = torch.utils.data.DataLoader(
        features, batch_size=t_cfg.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(t_cfg.seed),
        collate_fn=partial(collate, pad_id=data.pad_id, length=length))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t_cfg.learning_rate,
                                  weight_decay=t_cfg.weight_decay)
    steps_per_epoch = math.ceil(len(loader) / t_cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * t_cfg.epochs
    if t_cfg.max_steps is not None:
        total_steps = min(total_steps, t_cfg.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, t_cfg.warmup_steps, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    if main:
        save_config(cfg, out / "config.yaml")
    log_path = out / "train_log.jsonl"
    log_file = open(log_path, "w", encoding="utf-8") if main else None
    step, losses, window_tokens, t0 = 0, [], 0, time.perf_counter()
    window_start = t0
    bar = tqdm(total=total_steps, desc="train", disable=not (progress and main), unit="step")
    model.train()
    try:
        for epoch in range(t_cfg.epochs):
            for batch in loader:
                with accelerator.accumulate(model):
                    logits = model(**forward_inputs(model, batch)).logits
                    loss = causal_lm_loss(logits, batch["labels"])
                    accelerator.backward(loss)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                window_tokens += int(batch["attention_mask"].sum())
                losses.append(loss.item())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if main and (step % t_cfg.log_every == 0 or step == total_steps):
                    now = time.perf_counter()
                    record = {"step": step, "epoch": epoch + 1, "loss": round(losses[-1], 6),
                              "learning_rate": scheduler.get_last_lr()[0],
                              "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1)}
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    window_tokens, window_start = 0, now
                if step >= total_steps:
                    break
            if step >= total_steps:
                break
    finally:
        bar.close()
        if log_file:
            log_file.close()
    seconds = time.perf_counter() - t0

    accelerator.wait_for_everyone()
    if main:
        accelerator.unwrap_model(model).save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "tokenizer")
        summary = {"steps": step, "epochs": t_cfg.epochs, "seconds": round(seconds, 2),
                   "first_loss": losses[0], "final_loss": losses[-1], "pad_token": {"token": tokenizer.pad_token, "id": tokenizer.pad_token_id},
                   "end_token": data.report["end_token"],
                   "truncated_train_rows": truncated, "labels": data.labels, "data": data.report["data"], **params}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return TrainResult(output_dir=out, steps=step, first_loss=losses[0], final_loss=losses[-1], seconds=seconds,
                       has_eval_split=data.eval is not None and len(data.eval) > 0,
                       model=accelerator.unwrap_model(model))
