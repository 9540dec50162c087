"""Evaluation of a preference run: the held-out pairs (or ``--data FILE``) scored with the run's loss, as TRL
evaluates (``tasks.preference_loss.pair_losses``): ``reward_accuracy`` (the share of pairs whose chosen response gets
the larger reward), ``reward_margin`` (the mean reward difference), ``n`` (pairs), the loss and TRL's metrics.

The reference (dpo, ipo) is the run's starting point: an adapter run's base weights (the adapter switched off), a
full fine-tuning run's ``model.name_or_path`` loaded again. Scored in fp32 with the adapter unmerged.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from clmtune.config import RunConfig
from clmtune.data import prepare_data
from clmtune.errors import ClmtuneError
from clmtune.evaluate.report import write_result
from clmtune.run import RunDir
from clmtune.tasks.preference_loss import (METRIC_NAMES, REFERENCE_LOSSES, forward_scores, pair_losses,
                                          reference_context, takes_head_mask)


def pair_batches(features, pad_id: int, batch_size: int):
    from clmtune.tasks.encoding import collate

    for start in range(0, len(features), batch_size):
        rows = features.select(range(start, min(start + batch_size, len(features))))
        seqs = ([{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"])]
                + [{"input_ids": a, "labels": b} for a, b in zip(rows["rejected_input_ids"], rows["rejected_labels"])])
        yield collate(seqs, pad_id)


@torch.no_grad()
def score_pairs(model, features, pad_id: int, cfg: RunConfig, reference=None, batch_size: int = 16,
                progress: bool = True) -> dict:
    """Mean loss and metrics of ``features`` (a preference split) under ``cfg.preference``; ``reference``: a
    separate reference model (full fine-tuning), else the adapter switched off."""
    from tqdm.auto import tqdm

    p = cfg.preference
    device = next(model.parameters()).device
    mask, ref_mask = takes_head_mask(model), reference is not None and takes_head_mask(reference)
    losses, metrics = [], {k: [] for k in METRIC_NAMES}
    batches = pair_batches(features, pad_id, batch_size)
    for batch in tqdm(batches, total=-(-len(features) // batch_size), desc="eval pairs", disable=not progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        ref = None
        if p.loss in REFERENCE_LOSSES:
            if reference is not None:
                ref = forward_scores(reference, batch, head_mask=ref_mask).logps
            else:
                with reference_context(model):
                    ref = forward_scores(model, batch, head_mask=mask).logps
        scores = forward_scores(model, batch, with_nll=p.loss == "orpo", head_mask=mask)
        loss, m = pair_losses(p.loss, scores, ref, p.beta, p.label_smoothing, p.lambda_, p.gamma)
        losses.append(loss)
        for k, v in m.items():
            metrics[k].append(v)
    mean = {k: float(torch.cat(v).mean()) for k, v in metrics.items()}
    return {"loss": float(torch.cat(losses).mean()), "reward_accuracy": mean["rewards/accuracies"],
            "reward_margin": mean["rewards/margins"], "n": len(features), **mean}


def evaluate_preference_run(run: RunDir, model, tokenizer, cfg: RunConfig, split: str, data_file: str | None,
                            out_dir: str | Path | None, progress: bool, method: str | None = None
                            ) -> tuple[dict, Path]:
    if split != "eval":
        raise ClmtuneError(f"--split {split!r}: a preference run is scored on its held-out 'eval' pairs or on "
                           "--data FILE")
    if data_file is not None:
        if not Path(data_file).is_file():
            raise ClmtuneError(f"--data {data_file!r}: no such file")
        data_cfg = dataclasses.replace(cfg.data, source=str(data_file), eval_file=None, test_file=None,
                                       eval_fraction=0.0, prepared=None, max_train_rows=None)
        prep = prepare_data(tokenizer, data_cfg)
        features = prep.train
    else:
        prep = prepare_data(tokenizer, dataclasses.replace(cfg.data, prepared=None))
        features = prep.eval
        if features is None or len(features) == 0:
            raise ClmtuneError("the run's 'eval' split is empty; set data.eval_fraction > 0 or pass --data FILE")
    reference = None
    if cfg.preference.loss in REFERENCE_LOSSES and cfg.peft.method == "full":
        from clmtune.models import load_model

        reference = load_model(cfg.model).to(next(model.parameters()).device).eval()
    model.eval()
    t0 = time.perf_counter()
    result = score_pairs(model, features, prep.pad_id, cfg, reference, cfg.eval.batch_size, progress)
    result = {"method": f"preference ({cfg.preference.loss})", **result,
              "dropped_too_long": prep.report["splits"]["train" if data_file else "eval"].get("dropped_too_long", 0),
              "seconds": round(time.perf_counter() - t0, 3)}
    out = Path(out_dir) if out_dir else run.eval_output_dir("eval", data_file, "preference")
    write_result(result, out)
    run.record_evaluation(out, result, "eval", data_file)
    return result, out
