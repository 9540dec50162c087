"""Rank classification: the label with the highest log-likelihood after each prompt, by the exact best-first search
over the label tree where it pays (``search``), the rest by scoring every label (``scoring``). Used by the final
evaluation (``clmtune.evaluate``) and by the evaluation during training (``clmtune.train.watch``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clmtune.rank.scoring import LabelTree, batches, by_length, continuations, label_scores, strategy_for
from clmtune.rank.search import search_batch
from clmtune.tasks.examples import Example


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
"""``predict_rank`` stops searching (``clmtune.rank.search``) after a batch that left more than this share of
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
