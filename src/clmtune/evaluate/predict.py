"""Predictions of a label per example: ``rank`` (score every label, take the best; never invalid) or ``generate``
(greedy decoding compared with the label names; outputs matching no label are ``invalid``, optionally mapped to
the nearest label)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clmtune.evaluate.scoring import _batches, _by_length, label_scores
from clmtune.models import context_length, model_device
from clmtune.tasks.encoding import collate
from clmtune.tasks.examples import Example
from clmtune.text import clean_text, nearest_label


@dataclass
class Predictions:
    predicted: list[str]
    """Predicted label per example; for ``generate`` the cleaned output, which may be no label at all."""
    invalid: int
    """Outputs that match no label (always 0 for ``rank``)."""
    mapped: list[str] | None = None
    """``generate`` with ``map_invalid``: each output, or the nearest label when the output is invalid."""
    truncated: int = 0
    """Prompts cut to fit ``data.max_length``."""


@torch.no_grad()
def predict_rank(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                 normalize: bool = False, progress: bool = False) -> Predictions:
    prompts, truncated = encoder.encode_eval_prompts(examples, labels)
    scores = label_scores(model, encoder, prompts, labels, batch_size, normalize, progress)
    return Predictions(predicted=[labels[k] for k in scores.argmax(dim=1).tolist()], invalid=0, truncated=truncated)


@torch.no_grad()
def predict_generate(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                     progress: bool = False, map_invalid: bool = True) -> Predictions:
    """Greedy decoding with ``transformers``' ``generate`` (KV cache on), then clean and compare with the labels."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    # The same prompts as rank (one definition of "truncated": Encoder.eval_reserve), then up to longest label +
    # 2 new tokens; one less (label + end token, what rank scores) when max_length leaves no room for the extra
    # token in the model's context.
    prompts, truncated = encoder.encode_eval_prompts(examples, labels)
    max_new = encoder.eval_reserve(labels) + 1
    context = context_length(model)
    if context is not None and encoder.cfg.max_length + 1 > context:
        max_new -= 1
    tok = encoder.tokenizer
    gen_cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=encoder.end_id,
                               pad_token_id=encoder.pad_id)
    outputs = [""] * len(prompts)
    order = _by_length(prompts)  # batches of similar length: less padding
    for group in tqdm(list(_batches(order, batch_size)), desc="eval (generate)", disable=not progress,
                      unit="batch"):
        chunk = [prompts[i] for i in group]
        batch = collate([{"input_ids": c} for c in chunk], encoder.pad_id)  # (B, T) left-padded
        ids = batch["input_ids"].to(model_device(model))
        out = model.generate(input_ids=ids, attention_mask=batch["attention_mask"].to(ids.device),
                             generation_config=gen_cfg)
        for i, row in zip(group, out[:, ids.shape[1]:].tolist()):  # (B, <= max_new) new tokens
            if encoder.end_id in row:
                row = row[:row.index(encoder.end_id)]
            outputs[i] = clean_text(tok.decode(row, skip_special_tokens=True))
    invalid = sum(o not in labels for o in outputs)
    mapped = [o if o in labels else nearest_label(o, labels) for o in outputs] if map_invalid else None
    return Predictions(predicted=outputs, invalid=invalid, mapped=mapped, truncated=truncated)
