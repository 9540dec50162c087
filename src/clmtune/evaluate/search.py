"""``rank`` by an exact best-first search over the label prefix tree, instead of scoring every tree node.

``rank`` picks the label whose tokens (+ end token) have the highest summed log-likelihood after the prompt. Every
token's log-probability is <= 0, so a prefix's score only falls as it grows: once the best item on a row's frontier
is a complete label, no other label can beat it (uniform-cost search on -log p). Per batch:

- one prefill of the left-padded prompts (KV cache on, LM head on the last position only): the scores of every
  label's first token;
- then steps of one token per row, like greedy decoding: each row expands its best incomplete prefix (feeds that
  prefix's last token at position prompt length + depth, attending to the prompt and to that prefix's own earlier
  tokens in the cache through a 4D mask, never to a sibling branch) and scores its children.

A trained model puts most of the probability on one label, so a row is usually done after about as many steps as
that label has tokens, about what ``generate`` costs, while the one-pass tree scoring (``scoring._scores_packed``)
runs every node of the tree through every layer for every example: with 10 labels of 2-5 tokens that is 30 nodes
against ~3 steps. A model without preferences (random weights) makes the search expand most of the tree one step
at a time, which is slower than the one pass: rows still open after ``budget`` steps get the whole tree scored on
top of the prompt's KV cache (the one pass without running the prompt again), and ``predict_rank`` stops searching
once a batch leaves most of its rows open.
Same result as scoring every label up to float rounding (a near-tie between two labels' sums may resolve
differently); only for models the one-pass scoring supports (custom 4D masks) and summed scores (a per-token mean
is not monotone, so ``eval.normalize_by_length`` scores the whole tree).
"""

from __future__ import annotations

import heapq

import torch

from clmtune.evaluate.constrained import Trie
from clmtune.models import model_device
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


def _child_scores(logits: torch.Tensor, feed: list[tuple[int, int, float]], children) -> list[list[float]]:
    """For each (row, node, score) of ``feed``: score + log p(child token) for the node's children, in the order of
    ``children[node]``; ``logits`` (B, V) at the node. One gather for all rows (no (B, V) log-softmax copy)."""
    rows = [r for r, node, _ in feed for _ in children[node]]
    toks = [t for _, node, _ in feed for t in children[node]]
    logits = logits.float()
    lse = torch.logsumexp(logits, -1)  # (B,)
    vals = (logits[rows, toks] - lse[rows]).tolist()
    out, k = [], 0
    for _, node, score in feed:
        m = len(children[node])
        out.append([score + v for v in vals[k:k + m]])
        k += m
    return out


@torch.no_grad()
def search_batch(model, prompts: list[list[int]], conts: list[list[int]], pad_id: int, budget: int,
                 finish: bool = True) -> tuple[list[int | None], int]:
    """For each prompt of one batch, the index of the best continuation. Rows that ``budget`` single-token steps
    could not settle are scored over the whole label tree on top of the prompts' KV cache (``finish``; the prompt
    is not run again), or left ``None``. Also returns how many rows the search left open."""
    trie, token, depth, ancestors, leaf = _tree(conts)
    device = model_device(model)
    additive = model.config._attn_implementation == "eager"
    dtype = model.get_input_embeddings().weight.dtype
    ids = left_pad(prompts, pad_id)  # (B, T)
    pmask = left_pad([[1] * len(p) for p in prompts], 0)  # (B, T)
    b, t = ids.shape
    plen = pmask.sum(1).tolist()
    out = model(input_ids=ids.to(device), attention_mask=pmask.to(device),
                position_ids=(pmask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True, logits_to_keep=1)
    cache = out.cache
    root = [(r, 0, 0.0) for r in range(b)]
    frontier: list[list[tuple[float, int]]] = []
    first = _child_scores(out.logits[:, -1], root, trie.children)  # per row: log p(first token) per root child
    for scores in first:
        heap = [(-s, child) for s, child in zip(scores, trie.children[0].values())]
        heapq.heapify(heap)
        frontier.append(heap)
    slot: list[dict[int, int]] = [{} for _ in range(b)]  # node -> cache column holding its token, per row
    done: list[int | None] = [None] * b
    for step in range(budget + 1):
        feed = []  # (row, node, score) expanded at this step
        for r in range(b):
            if done[r] is not None:
                continue
            neg, node = frontier[r][0]
            if node in leaf:  # the best item is a complete label: nothing left can beat it
                done[r] = leaf[node]
                continue
            heapq.heappop(frontier[r])
            feed.append((r, node, -neg))
        if not feed or step == budget:
            break
        col = t + step
        inp = torch.full((b, 1), pad_id, dtype=torch.long)
        pos = torch.zeros((b, 1), dtype=torch.long)
        allowed = torch.zeros((b, col + 1), dtype=torch.bool)  # (B, col+1) cache columns + this step's
        allowed[:, :t] = pmask.bool()
        allowed[:, col] = True  # every row attends to itself (idle rows: only that, so never a fully masked row)
        for r, node, _ in feed:
            inp[r, 0], pos[r, 0] = token[node], plen[r] + depth[node]
            for a in ancestors[node]:  # the prefix's earlier tokens, expanded at earlier steps
                allowed[r, slot[r][a]] = True
            slot[r][node] = col
        mask = allowed[:, None, None, :]  # (B, 1, 1, col+1)
        if additive:
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        out = model(input_ids=inp.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    cache=cache, use_cache=True)
        cache = out.cache
        for (r, node, _), scores in zip(feed, _child_scores(out.logits[:, -1], feed, trie.children)):
            for s, child in zip(scores, trie.children[node].values()):
                heapq.heappush(frontier[r], (-s, child))
    open_rows = [r for r in range(b) if done[r] is None]
    if finish and open_rows:
        first_by_token = [dict(zip(trie.children[0], f)) for f in first]
        sums = _tree_scores(model, cache, conts, open_rows, pmask, plen, t + step, first_by_token, additive, dtype)
        for r, best in zip(open_rows, sums.argmax(1).tolist()):
            done[r] = best
    return done, len(open_rows)


def _tree_scores(model, cache, conts, rows, pmask, plen, width, first, additive, dtype) -> torch.Tensor:
    """(len(rows), n_labels) summed log-likelihoods: every node of the label tree fed after the prompts in ``cache``
    (``width`` columns: prompt + search steps, which the nodes do not see), as ``scoring._scores_packed`` does
    after the prompt; ``first``: per row, log p(first token) at the prompt's last position, by token."""
    import copy

    from clmtune.evaluate.scoring import LabelTree

    tree = LabelTree.build(conts)
    m = len(tree.token)
    device = model_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = max(1, (64 << 20) // (m * vocab))  # (rows, M, V) fp32 logits under ~256 MB, as the one pass
    src, tok, lab = tree.steps.unbind(1)
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
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       cache=c, use_cache=True).logits.float().cpu()  # (rows, M, V)
        lp = logits[:, (src - 1).clamp(min=0), tok] - logits.logsumexp(-1)[:, (src - 1).clamp(min=0)]  # (rows, S)
        for j in (src == 0).nonzero()[:, 0].tolist():  # a label's first token: scored at the prompt's last position
            lp[:, j] = torch.tensor([first[r][int(tok[j])] for r in part])
        sums[k:k + len(part)] = torch.zeros(len(part), len(conts)).index_add_(1, lab, lp)
    return sums
