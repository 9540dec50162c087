"""One optimizer step's forward and backward passes (``train_window``): next-token cross-entropy on the supervised
positions, through the fused LM head where it applies."""

from __future__ import annotations

import contextlib

import torch

from clmtune.models import forward_inputs
from clmtune.models.head import head_returns_hidden
from clmtune.train.fusedhead import frozen_head_loss
from clmtune.train.loss import HeadMode, causal_lm_loss, head_positions, supervised_targets, supervised_tokens
from clmtune.train.speed import chunked_head_loss, packed_inputs


def train_window(window: list[dict], model, accelerator, head: HeadMode, n_proc: int,
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
