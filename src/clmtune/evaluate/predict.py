"""Predictions of a label per example: ``rank`` (score every label, take the best; never invalid) or ``generate``
(greedy decoding through ``clmtune.decoding``, compared with the label names; outputs matching no label are
``invalid``, optionally mapped to the nearest label)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clmtune.decoding import Decoder, Sampling
from clmtune.evaluate.constrained import constrained_decode
from clmtune.evaluate.scoring import LabelTree, batches, by_length, continuations, label_scores, strategy_for
from clmtune.evaluate.search import search_batch
from clmtune.models import context_length
from clmtune.tasks.examples import Example
from clmtune.text import nearest_label


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


SEARCH_STEPS = 2
"""The rank search's budget per batch: this many single-token steps per token of the longest label (+ end token);
rows still open get the whole tree scored on top of their prompt's cache. Label trees with no more than twice as
many nodes as the budget are always scored in one pass."""

SEARCH_GIVES_UP = 0.5
"""``predict_rank`` stops searching (``clmtune.evaluate.search``) after a batch that left more than this share of
its rows open within the step budget (a model without clear preferences), and scores the rest in one pass each."""


@torch.no_grad()
def predict_rank(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                 normalize: bool = False, progress: bool = False, search: bool = True) -> Predictions:
    """The label with the highest log-likelihood (summed, or per token with ``normalize``) for each example: by the
    best-first search where it applies (``search``, the default), the rest by scoring every label."""
    from tqdm.auto import tqdm

    prompts, truncated = encoder.encode_eval_prompts(examples, labels)
    conts = continuations(encoder, labels)
    picks: list[int | None] = [None] * len(prompts)
    # The search is for a model with clear preferences: the longest label's path twice over (detours included).
    # A step costs about one position per example through every layer, but as a small batch (on GPT-2 12 x 768 one
    # step cost ~4 tree nodes of the one pass; on a tiny model each call's overhead dominates), so it runs only
    # where the tree has more than twice as many nodes as that budget (not for 2-4 short labels: 3-9 nodes, but
    # for 10 labels of up to 5 tokens: 27 nodes); a search that must expand most of the tree gives up.
    budget = int(SEARCH_STEPS * max(map(len, conts)))
    if (search and not normalize and len(LabelTree.build(conts).token) > 2 * budget
            and strategy_for(model, prompts, conts) == "packed"):
        groups = list(batches(by_length(prompts), batch_size))
        for group in tqdm(groups, desc="eval (rank)", disable=not progress, unit="batch"):
            got, still_open = search_batch(model, [prompts[i] for i in group], conts, encoder.pad_id, budget)
            for i, j in zip(group, got):
                picks[i] = j
            if still_open > SEARCH_GIVES_UP * len(got):
                break
    rest = [i for i, j in enumerate(picks) if j is None]
    if rest:
        scores = label_scores(model, encoder, [prompts[i] for i in rest], labels, batch_size, normalize, progress)
        for i, j in zip(rest, scores.argmax(dim=1).tolist()):
            picks[i] = j
    return Predictions(predicted=[labels[j] for j in picks], invalid=0, truncated=truncated)


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
