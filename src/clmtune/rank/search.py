"""``rank`` by an exact best-first search over the label prefix tree, instead of scoring every tree node.

``rank`` picks the label whose tokens (+ end token) have the highest summed log-likelihood after the prompt. Every
token's log-probability is <= 0, so a prefix's score only falls as it grows: once the best item on a row's frontier
is a complete label, no other label can beat it (uniform-cost search on -log p). Per batch:

- one prefill of the left-padded prompts (KV cache on, LM head on the last position only): the scores of every
  label's first token;
- then steps like greedy decoding: each row expands its best incomplete prefix, and with it every other open prefix
  within ``WIDEN`` nats (feeds each prefix's last token at position prompt length + depth, attending to the prompt
  and to that prefix's own earlier tokens in the cache through a 4D mask, never to a sibling branch or to the other
  prefixes fed in the same step) and scores their children.

A trained model puts most of the probability on one label, so a row is usually done after about as many steps as
that label has tokens, about what ``generate`` costs, while the one-pass tree scoring (``scoring._scores_packed``)
runs every node of the tree through every layer for every example: with 10 labels of 2-5 tokens that is 30 nodes
against ~3 steps. A model without preferences (random weights) makes the search expand most of the tree, level by
level thanks to ``WIDEN`` (about as many calls as the tree is deep), which costs about what the one pass costs in
one call; rows still open after ``budget`` steps get the whole tree scored on top of the prompt's KV cache (the one
pass without running the prompt again), and ``predict_rank`` stops searching once a batch leaves most of its rows
open.
Same result as scoring every label up to float rounding (a near-tie between two labels' sums may resolve
differently); only for models the one-pass scoring supports (custom 4D masks) and summed scores (a per-token mean
is not monotone, so ``eval.normalize_by_length`` scores the whole tree).
"""

from __future__ import annotations

import heapq

import torch

from clmtune.rank.labeltree import Trie
from clmtune.rank.headscore import head_returns_hidden, linear_head, logprobs
from clmtune.models import cache_kwarg, model_device, output_cache
from clmtune.tasks.encoding import left_pad


def _tree(conts: list[list[int]]):
    """(trie, token, depth, parent, leaf label) for the continuations' prefix tree; node 0 is the root."""
    trie = Trie.build(conts)
    n = trie.n_nodes
    token, depth, parent = [-1] * n, [-1] * n, [-1] * n
    stack = [0]
    while stack:
        node = stack.pop()
        for tok, child in trie.children[node].items():
            token[child], depth[child], parent[child] = tok, depth[node] + 1, node
            stack.append(child)
    leaf = {i: trie.label[i] for i in range(1, n) if not trie.children[i]}  # after a label's end token
    ancestors = [[] for _ in range(n)]  # the nodes of a node's prefix before it (root excluded)
    for i in range(1, n):
        a = parent[i]
        while a > 0:
            ancestors[i].append(a)
            a = parent[a]
    return trie, token, depth, ancestors, leaf


WIDEN = 8.0
"""Each search step expands, per row, the best open prefix and every other open prefix whose log-likelihood is
within this many nats of it (stopping at the first complete label, below which nothing can win). A model with a
clear favourite (the best prefix ahead by more than this) expands one prefix a step, as greedy decoding would; a
model without one (random weights: every token about -log V) expands the near-ties together in one call instead of
one per step. The result is exact either way; this only trades calls against positions."""


def _child_scores(logprobs: list[float], feed: list[tuple[int, int, float]], children) -> list[list[float]]:
    """For each (row, node, score) of ``feed``: score + log p(child token) for the node's children, in the order of
    ``children[node]``; ``logprobs`` lists those log p in the same order (``_child_steps``)."""
    out, k = [], 0
    for _, node, score in feed:
        m = len(children[node])
        out.append([score + v for v in logprobs[k:k + m]])
        k += m
    return out


def _child_steps(feed_at: list[int], feed: list[tuple[int, int, float]], children) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens) for ``headscore.logprobs``: for the i-th fed node (whose output row is ``feed_at[i]``) one entry
    per child token."""
    rows = [at for at, (_, node, _) in zip(feed_at, feed) for _ in children[node]]
    toks = [t for _, node, _ in feed for t in children[node]]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(toks, dtype=torch.long)


@torch.no_grad()
def search_batch(model, prompts: list[list[int]], conts: list[list[int]], pad_id: int, budget: int,
                 finish: bool = True, widen: float = WIDEN) -> tuple[list[int | None], int]:
    """For each prompt of one batch, the index of the best continuation. Rows that ``budget`` steps could not settle
    are scored over the whole label tree on top of the prompts' KV cache (``finish``; the prompt is not run again),
    or left ``None``. Also returns how many rows the search left open. ``widen``: see ``WIDEN`` (0: one prefix per
    row and step, plain best-first)."""
    trie, token, depth, ancestors, leaf = _tree(conts)
    device = model_device(model)
    additive = model.config._attn_implementation == "eager"
    dtype = model.get_input_embeddings().weight.dtype
    bypass = linear_head(model)
    ids = left_pad(prompts, pad_id)  # (B, T)
    pmask = left_pad([[1] * len(p) for p in prompts], 0)  # (B, T)
    b, t = ids.shape
    plen = pmask.sum(1).tolist()
    with head_returns_hidden(bypass and bypass[0]):
        out = model(input_ids=ids.to(device), attention_mask=pmask.to(device),
                    position_ids=(pmask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    root = [(r, 0, 0.0) for r in range(b)]
    at, tok = _child_steps(list(range(b)), root, trie.children)
    first = _child_scores(logprobs(out.logits[:, -1], bypass, at.to(device), tok.to(device)).tolist(), root,
                          trie.children)  # per row: log p(first token) per root child
    frontier: list[list[tuple[float, int]]] = []
    for scores in first:
        heap = [(-s, child) for s, child in zip(scores, trie.children[0].values())]
        heapq.heapify(heap)
        frontier.append(heap)
    slot: list[dict[int, int]] = [{} for _ in range(b)]  # node -> cache column holding its token, per row
    done: list[int | None] = [None] * b
    col = t  # cache columns so far: the prompt, then each step's fed nodes
    for step in range(budget + 1):
        feed: list[list[tuple[int, int, float]]] = [[] for _ in range(b)]  # per row: (row, node, score) to expand
        for r in range(b):
            if done[r] is not None:
                continue
            neg, node = frontier[r][0]
            if node in leaf:  # the best item is a complete label: nothing left can beat it
                done[r] = leaf[node]
                continue
            while frontier[r] and frontier[r][0][1] not in leaf and -frontier[r][0][0] >= -neg - widen:
                s, node = heapq.heappop(frontier[r])
                feed[r].append((r, node, -s))
        k = max(map(len, feed))
        if not k or step == budget:  # rows still open: ``finish`` scores their whole tree, not the frontier
            break
        inp = torch.full((b, k), pad_id, dtype=torch.long)  # (B, k): row r feeds its nodes, then padding
        pos = torch.zeros((b, k), dtype=torch.long)
        allowed = torch.zeros((b, k, col + k), dtype=torch.bool)  # (B, k, cache columns + this step's k)
        allowed[:, :, :t] = pmask.bool()[:, None, :]
        allowed[:, torch.arange(k), col + torch.arange(k)] = True  # each position attends to itself: never fully masked
        flat, feed_at = [], []
        for r in range(b):
            for j, (_, node, score) in enumerate(feed[r]):
                inp[r, j], pos[r, j] = token[node], plen[r] + depth[node]
                for a in ancestors[node]:  # the prefix's earlier tokens, fed at earlier steps; never a sibling
                    allowed[r, j, slot[r][a]] = True
                slot[r][node] = col + j
                flat.append((r, node, score))
                feed_at.append(r * k + j)
        mask = allowed[:, None]  # (B, 1, k, col+k)
        if additive:
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        with head_returns_hidden(bypass and bypass[0]):
            out = model(input_ids=inp.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True, **{cache_kwarg(model): cache})  # logits: (B, k, d) hidden, or (B, k, V)
        cache = output_cache(out)
        col += k
        at, tok = _child_steps(feed_at, flat, trie.children)
        lp = logprobs(out.logits.reshape(b * k, -1), bypass, at.to(device), tok.to(device)).tolist()
        for (r, node, _), scores in zip(flat, _child_scores(lp, flat, trie.children)):
            for s, child in zip(scores, trie.children[node].values()):
                heapq.heappush(frontier[r], (-s, child))
    open_rows = [r for r in range(b) if done[r] is None]
    if finish and open_rows:
        first_by_token = [dict(zip(trie.children[0], f)) for f in first]
        sums = _tree_scores(model, cache, conts, open_rows, pmask, plen, col, first_by_token, additive, dtype)
        for r, best in zip(open_rows, sums.argmax(1).tolist()):
            done[r] = best
    return done, len(open_rows)


def _tree_scores(model, cache, conts, rows, pmask, plen, width, first, additive, dtype) -> torch.Tensor:
    """(len(rows), n_labels) summed log-likelihoods: every node of the label tree fed after the prompts in ``cache``
    (``width`` columns: prompt + search steps, which the nodes do not see), as ``scoring._scores_packed`` does
    after the prompt; ``first``: per row, log p(first token) at the prompt's last position, by token."""
    import copy

    from clmtune.rank.scoring import LabelTree

    tree = LabelTree.build(conts)
    m = len(tree.token)
    device = model_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    bypass = linear_head(model)  # (rows, M, d) hidden states, or (rows, M, V) fp32 logits kept under ~256 MB
    chunk = len(rows) if bypass else max(1, (64 << 20) // (m * vocab))
    src, tok, lab = tree.steps.unbind(1)
    at = (src - 1).clamp(min=0)  # (S,) the node whose output scores each step (first tokens: replaced below)
    sums = torch.zeros(len(rows), len(conts))
    for k in range(0, len(rows), chunk):
        part = rows[k:k + chunk]
        c = copy.deepcopy(cache)
        c.batch_select_indices(torch.tensor(part, device=device))
        allowed = torch.zeros((len(part), m, width + m), dtype=torch.bool)
        allowed[:, :, :pmask.shape[1]] = pmask[part].bool()[:, None, :]
        allowed[:, :, width:] = tree.ancestors | torch.eye(m, dtype=torch.bool)
        mask = allowed[:, None]
        if additive:
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        ids = torch.tensor(tree.token).expand(len(part), m)
        pos = torch.tensor([plen[r] for r in part])[:, None] + torch.tensor(tree.depth)
        with head_returns_hidden(bypass and bypass[0]):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                        use_cache=True, **{cache_kwarg(model): c}).logits  # (rows, M, d) or (rows, M, V)
        n = len(part)
        lp = logprobs(out.reshape(n * m, -1), bypass, (torch.arange(n)[:, None] * m + at).reshape(-1).to(device),
                      tok.repeat(n).to(device)).view(n, -1).cpu()  # (rows, S)
        for j in (src == 0).nonzero()[:, 0].tolist():  # a label's first token: scored at the prompt's last position
            lp[:, j] = torch.tensor([first[r][int(tok[j])] for r in part])
        sums[k:k + len(part)] = torch.zeros(len(part), len(conts)).index_add_(1, lab, lp)
    return sums
