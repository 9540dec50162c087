"""Predictions of a label per example: ``rank`` (score every label, take the best; never invalid) or ``generate``
(greedy decoding compared with the label names; outputs matching no label are ``invalid``, optionally mapped to
the nearest label)."""

from __future__ import annotations

import torch

from clmtune.evaluate.constrained import constrained_decode
from clmtune.rank.predict import Predictions
from clmtune.rank.scoring import LabelTree, batches, by_length, continuations
from clmtune.models import context_length, model_device
from clmtune.tasks.encoding import collate
from clmtune.tasks.examples import Example
from clmtune.text import clean_text, nearest_label


CONSTRAINED_ABOVE_NODES = 64
"""``eval.method: auto`` uses ``constrained`` instead of ``rank`` when the label prefix tree has more nodes than
this (``LabelTree``: one node per distinct proper prefix of label tokens + end token). ``rank`` runs the LM head
over the whole vocabulary at every node for every example; ``constrained`` decodes at most one step per tree level
and only multiplies the head rows of the allowed tokens. Measured on a CPU: with 2 labels (3-4 nodes)
rank and greedy decoding cost about the same; with banking_77's 232 nodes rank was 3-4x slower than generate."""


def label_tree_nodes(encoder, labels: list[str]) -> int:
    return len(LabelTree.build(continuations(encoder, labels)).token)


def resolve_method(method: str, encoder, labels: list[str]) -> str:
    """``auto`` -> ``rank`` or ``constrained`` by the size of the label tree; other methods as they are."""
    if method != "auto":
        return method
    return "constrained" if label_tree_nodes(encoder, labels) > CONSTRAINED_ABOVE_NODES else "rank"


@torch.no_grad()
def predict_constrained(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                        progress: bool = False) -> Predictions:
    """Greedy decoding restricted to the label prefix tree (``clmtune.evaluate.constrained``): never invalid."""
    prompts, truncated = encoder.encode_eval_prompts(examples, labels)  # cut as rank and generate cut them
    picks = constrained_decode(model, prompts, continuations(encoder, labels), encoder.pad_id, batch_size,
                               progress)
    return Predictions(predicted=[labels[j] for j in picks], invalid=0, truncated=truncated)


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
    order = by_length(prompts)  # batches of similar length: less padding
    for group in tqdm(list(batches(order, batch_size)), desc="eval (generate)", disable=not progress,
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
