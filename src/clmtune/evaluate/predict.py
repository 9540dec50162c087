"""Predictions of a label per example: ``rank`` (score every label, take the best; never invalid) or ``generate``
(greedy decoding through ``clmtune.decoding``, compared with the label names; outputs matching no label are
``invalid``, optionally mapped to the nearest label)."""

from __future__ import annotations

import torch

from clmtune.decoding import Decoder, Sampling
from clmtune.evaluate.constrained import constrained_decode
from clmtune.rank.predict import Predictions
from clmtune.rank.scoring import LabelTree, continuations
from clmtune.models import context_length
from clmtune.tasks.examples import Example
from clmtune.text import nearest_label


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


def predict_generate(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                     progress: bool = False, map_invalid: bool = True) -> Predictions:
    """Greedy decoding (the one decoding loop, ``clmtune.decoding``: KV cache on), then compare with the labels."""
    # The same prompts as rank (one definition of "truncated": Encoder.eval_reserve), then up to longest label +
    # 2 new tokens; one less (label + end token, what rank scores) when max_length leaves no room for the extra
    # token in the model's context.
    prompts, truncated = encoder.encode_eval_prompts(examples, labels)
    max_new = encoder.eval_reserve(labels) + 1
    context = context_length(model)
    if context is not None and encoder.cfg.max_length + 1 > context:
        max_new -= 1
    sampling = Sampling(max_tokens=max_new, temperature=0, stop_ids=[encoder.end_id])
    outputs = [t[0] for t in Decoder(model, encoder.tokenizer).texts(prompts, sampling, batch_size=batch_size,
                                                                     progress=progress, desc="eval (generate)")]
    invalid = sum(o not in labels for o in outputs)
    mapped = [o if o in labels else nearest_label(o, labels) for o in outputs] if map_invalid else None
    return Predictions(predicted=outputs, invalid=invalid, mapped=mapped, truncated=truncated)
