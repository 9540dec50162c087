"""The preference objective of the train stage (``Task.training == "preference"``): DPO, IPO, ORPO, SimPO.

What differs from next-token training, and nothing else: the rows are pairs (chosen and rejected collated into one
left-padded (2B, T) batch, one forward pass for both), the loss is ``tasks.preference_loss.pair_losses`` (TRL's
formulas) divided by the pairs of the optimizer step, and DPO/IPO need reference log-probabilities:

- an adapter (LoRA, IA3): the same weights with the adapter switched off (peft's ``disable_adapter``), no copy;
- full fine-tuning: a frozen copy of the starting weights;
- ``preference.precompute_reference: true`` (any method): computed once for every training pair before the first
  step, from the starting weights, and carried in the batches (no reference forward per step). A resumed run
  computes the same numbers again (the starting weights are a function of the seed; eval mode draws no random
  numbers), so it still ends where an uninterrupted run ends.

The reference forward runs in eval mode (no dropout), so the reference of a pair does not change from step to step.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from clmtune.tasks.encoding import collate
from clmtune.tasks.preference_loss import (METRIC_NAMES, REFERENCE_LOSSES, forward_scores, pair_losses,
                                          reference_context, takes_head_mask)

log = logging.getLogger("clmtune")


class PairCollator:
    """[chosen_1..B, rejected_1..B] as one left-padded batch, the rows' indices and (precomputed) the reference
    log-probabilities in the same order."""

    def __init__(self, pad_id: int, length: int | None, pad_to_multiple_of: int | None = None):
        self.pad_id, self.length, self.multiple = pad_id, length, pad_to_multiple_of

    def __call__(self, feats):
        seqs = ([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats]
                + [{"input_ids": f["rejected_input_ids"], "labels": f["rejected_labels"]} for f in feats])
        batch = collate(seqs, self.pad_id, length=self.length, pad_to_multiple_of=self.multiple)
        batch["rows"] = torch.tensor([f["row"] for f in feats])
        if "ref_chosen" in feats[0]:
            batch["ref_logps"] = torch.tensor([f["ref_chosen"] for f in feats] + [f["ref_rejected"] for f in feats],
                                              dtype=torch.float64)
        return batch


class PreferenceObjective:
    """Held by ``TrainRecipe`` as ``objective`` when the task trains on pairs."""

    def __init__(self, settings, progress: bool = False):
        self.p, self.progress = settings, progress
        self.ref_model = None
        self.needs_reference = self.p.loss in REFERENCE_LOSSES
        self.head_mask = False  # the model takes a boolean logits_to_keep (set once the model is built)

    # -- setup -----------------------------------------------------------------------------------------------
    def features(self, train) -> list[dict]:
        cols = [train[c] for c in ("input_ids", "labels", "rejected_input_ids", "rejected_labels")]
        return [{"input_ids": a, "labels": b, "rejected_input_ids": c, "rejected_labels": d, "row": i}
                for i, (a, b, c, d) in enumerate(zip(*cols))]

    @staticmethod
    def lengths(features) -> list[int]:
        return [max(len(f["input_ids"]), len(f["rejected_input_ids"])) for f in features]

    def collator(self, pad_id: int, length: int | None, multiple: int | None) -> PairCollator:
        return PairCollator(pad_id, length, multiple)

    def setup_reference(self, model, features: list[dict], device, is_peft: bool, pad_id: int) -> None:
        """After the model is built and before training: the reference (see the module docstring)."""
        if not self.needs_reference:
            return
        self.head_mask = takes_head_mask(model)
        if self.p.precompute_reference:
            self.precompute(model, features, device, pad_id)
        elif not is_peft:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval()
            log.info("preference: reference model = a frozen copy of the starting weights")
        else:
            log.info("preference: reference model = the same weights with the adapter switched off")

    @torch.no_grad()
    def precompute(self, model, features: list[dict], device, pad_id: int, batch_size: int = 16) -> None:
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        model.to(device)
        order = sorted(range(len(features)), key=lambda i: -self.lengths([features[i]])[0])  # little padding
        collator = PairCollator(pad_id, None)
        for start in tqdm(range(0, len(order), batch_size), desc="reference log-probabilities",
                          disable=not self.progress):
            rows = [features[i] for i in order[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collator(rows).items() if k != "rows"}
            with reference_context(model):
                logps = forward_scores(model, batch, head_mask=self.head_mask).logps.double().cpu().tolist()
            for k, f in enumerate(rows):
                f["ref_chosen"], f["ref_rejected"] = logps[k], logps[len(rows) + k]
        model.train(was_training)
        log.info("preference: reference log-probabilities of %d pairs computed once before training", len(features))

    @torch.no_grad()
    def reference_logps(self, model, batch, head_mask: bool = False) -> torch.Tensor:
        model_ = self.ref_model if self.ref_model is not None else model
        if self.ref_model is not None and next(self.ref_model.parameters()).device != batch["input_ids"].device:
            self.ref_model.to(batch["input_ids"].device)
        was_training = model_.training
        model_.eval()
        try:
            with reference_context(model_) if self.ref_model is None else contextlib.nullcontext():
                return forward_scores(model_, batch, head_mask=head_mask).logps
        finally:
            model_.train(was_training)

    # -- one optimizer step ----------------------------------------------------------------------------------
    def window(self, window: list[dict], model, accelerator, head, n_proc: int,
               rows_seen: list[int] | None) -> tuple[float, int, dict[str, float]]:
        """Forward + backward over one optimizer step's batches: (summed pair losses, pairs, metric sums)."""
        n_pairs = sum(len(b["rows"]) for b in window)
        if n_proc > 1:
            n_pairs = int(accelerator.reduce(torch.tensor(n_pairs, device=accelerator.device), "sum"))
        scale = accelerator.gradient_accumulation_steps * n_proc / max(n_pairs, 1)
        total, sums = 0.0, dict.fromkeys(METRIC_NAMES, 0.0)
        for k, batch in enumerate(window):
            rows = batch.pop("rows")
            ref = batch.pop("ref_logps", None)
            if rows_seen is not None:
                rows_seen.extend(rows.tolist())
            last = k == len(window) - 1
            accelerator.gradient_state._set_sync_gradients(last)  # as step.train_window: the window is fetched ahead
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                if self.needs_reference and ref is None:
                    ref = self.reference_logps(model, batch, head.mode == "mask")
                scores = forward_scores(model, batch, with_nll=self.p.loss == "orpo", head_mask=head.mode == "mask",
                                        backward=True)
                losses, metrics = pair_losses(self.p.loss, scores, None if ref is None else ref.to(scores.logps),
                                              self.p.beta, self.p.label_smoothing, self.p.lambda_, self.p.gamma)
                loss = losses.sum()
                accelerator.backward(loss * scale)
            total += loss.item()
            for name, values in metrics.items():
                sums[name] += float(values.sum())
        if n_proc > 1:
            vec = torch.tensor([total, *sums.values()], device=accelerator.device, dtype=torch.float64)
            vec = accelerator.reduce(vec, "sum").tolist()
            total, sums = vec[0], dict(zip(sums, vec[1:]))
        return total, n_pairs, sums
