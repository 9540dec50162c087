"""Rank scoring kernels: the log-likelihood of each label's tokens (+ end token) after each prompt.

Three exact strategies (``label_scores`` picks the fastest the model supports): ``packed`` (prompt + label prefix
tree under a 4D attention mask, one forward per batch), ``shared_cache`` (prompt once, its KV cache repeated per
label), ``pairs`` (one prompt+label row per pair: peft prompt-learning models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from clmtune.rank.headscore import head_returns_hidden, linear_head, logprobs
from clmtune.rank.labeltree import Trie
from clmtune.models import (CUSTOM_MASK_MODEL_TYPES, cache_kwarg, forward_inputs, is_prompt_learning, model_device,
                            output_cache)
from clmtune.tasks.encoding import collate

if TYPE_CHECKING:
    from clmtune.data.encoder import Encoder


def batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def continuations(encoder: Encoder, labels: Sequence[str]) -> list[list[int]]:
    """Each label's token ids + end token: exactly the tokens the model learnt to write after the prompt."""
    return [ids + [encoder.end_id] for ids in encoder.label_ids(labels)]


# The packed strategy needs explicit ``position_ids`` and a custom 4D mask (``models.CUSTOM_MASK_MODEL_TYPES``).
# Mistral's sliding window is not applied to a custom mask: prompts longer than the window fall back to
# prompt+label rows (``strategy_for``).
PACKED_MODEL_TYPES = CUSTOM_MASK_MODEL_TYPES
RANK_STRATEGIES = ("packed", "shared_cache", "pairs")


def rank_strategy(model) -> str:
    """How ``label_scores`` runs a model: ``packed`` (one forward per batch: prompt + label tree under a 4D mask),
    ``shared_cache`` (prompt once, its KV cache repeated per label) or ``pairs`` (one prompt+label row per pair:
    peft prompt-learning models, whose forward prepends virtual tokens and builds its own mask)."""
    if is_prompt_learning(model):
        return "pairs"
    config = getattr(model, "config", None)
    if (getattr(config, "model_type", None) in PACKED_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")):
        return "packed"
    return "shared_cache"


def strategy_for(model, prompts: list[list[int]], conts: list[list[int]]) -> str:
    """``rank_strategy``, or ``pairs`` where prompt + label can exceed a sliding attention window."""
    strategy = rank_strategy(model)
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window and max(map(len, prompts), default=0) + max(map(len, conts)) > window:
        strategy = "pairs"  # the packed mask has no window; a repeated left-padded cache misplaces it (tested)
    return strategy


@torch.no_grad()
def label_scores(model, encoder: Encoder, prompts: list[list[int]], labels: list[str],
                 batch_size: int, normalize: bool = False, progress: bool = False,
                 strategy: str | None = None) -> torch.Tensor:
    """(n_examples, n_labels) log-likelihood of each label's tokens + end token after each prompt.

    ``normalize``: mean instead of sum over the continuation's tokens. ``strategy=None`` picks the fastest exact
    way this model supports (``rank_strategy``); all three give the same scores up to float rounding.
    """
    conts = continuations(encoder, labels)
    if strategy is None:
        strategy = strategy_for(model, prompts, conts)
    if strategy not in RANK_STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {RANK_STRATEGIES}")
    fn = {"packed": _scores_packed, "shared_cache": _scores_shared_prompt, "pairs": _scores_padded_pairs}[strategy]
    order = by_length(prompts)  # batches of similar length: less padding, same scores
    sums = fn(model, encoder, [prompts[i] for i in order], conts, batch_size, progress)  # (n, L)
    scores = torch.empty_like(sums)
    scores[order] = sums / torch.tensor([float(len(c)) for c in conts]) if normalize else sums
    return scores


def by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Indices of ``seqs`` from longest to shortest (stable)."""
    return sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))


@dataclass
class LabelTree:
    """The label continuations as a prefix tree, so a prefix shared by several labels is run once.

    Node ``i`` stands for one distinct proper prefix of some continuation (its last token is ``token[i]``); the
    logits at a node predict the token after that prefix. ``steps`` lists every scored token of every label:
    (source, token, label), source = 0 for the prompt's last position and 1 + i for node i.
    banking_77 with OPT's BPE: 77 labels, 289 label tokens + 77 end tokens -> 232 nodes instead of 77 x 9 padded.
    """
    token: list[int]
    depth: list[int]
    """0 for a node right after the prompt."""
    ancestors: torch.Tensor
    """(M, M) bool: [i, a] when node a is node i or a prefix of it (what node i may attend to besides the prompt)."""
    steps: torch.Tensor
    """(S, 3) long: source, token, label."""

    @staticmethod
    def build(conts: list[list[int]]) -> "LabelTree":
        """The inner nodes (proper prefixes) of the label prefix tree (``labeltree.Trie``), numbered in the order
        the labels reach them."""
        trie = Trie.build(conts)
        index: dict[int, int] = {}  # trie node -> node of this tree
        token, depth, parent, steps = [], [], [], []
        for j, c in enumerate(conts):
            src, node = 0, 0
            for k, t in enumerate(c):
                steps.append((src, t, j))
                if k == len(c) - 1:
                    break
                node = trie.children[node][t]
                if node not in index:
                    index[node] = len(token)
                    token.append(t)
                    depth.append(k)
                    parent.append(src - 1)  # -1: the prompt
                src = index[node] + 1
        m = len(token)
        ancestors = torch.zeros((m, m), dtype=torch.bool)
        for i in range(m):
            a = i
            while a >= 0:
                ancestors[i, a] = True
                a = parent[a]
        return LabelTree(token, depth, ancestors, torch.tensor(steps, dtype=torch.long).view(-1, 3))


def _packed_attention(prompt_mask: torch.Tensor, tree: LabelTree, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """(B, 1, T+M, T+M) attention mask for rows [left-padded prompt (T) | label tree nodes (M)].

    Prompt positions attend causally to the real prompt tokens; node i attends to the whole real prompt and to its
    own prefix nodes, never to a sibling branch. Every position may attend to itself, so no row is fully masked
    (a fully masked row gives NaN under SDPA, and a NaN value leaks through a 0 attention weight).
    ``additive``: 0 / dtype-min floats (eager attention adds the mask), else bool (SDPA: True = attend).
    """
    b, t = prompt_mask.shape
    m = len(tree.token)
    real = prompt_mask.bool()  # (B, T)
    allowed = torch.zeros((b, t + m, t + m), dtype=torch.bool)
    allowed[:, :t, :t] = torch.ones((t, t), dtype=torch.bool).tril() & real[:, None, :]
    allowed[:, t:, :t] = real[:, None, :]
    allowed[:, t:, t:] = tree.ancestors
    allowed |= torch.eye(t + m, dtype=torch.bool)
    allowed = allowed[:, None]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _scores_packed(model, encoder, prompts, conts, batch_size, progress):
    """Score with one forward per group of examples: each row is [prompt | label tree], under a 4D mask.

    Per group of B examples (prompts left-padded to T) and a label tree of M nodes:
      input (B, T+M); positions 0..p-1 on the p real prompt tokens, p + depth on the nodes; LM head only on the last
      M+1 positions (logits_to_keep): position T-1 scores each label's first token, node i scores the token after
      its prefix. Cost: B*(T+M) token positions, and B*(M+1) LM-head rows, in one call (no cache copies).
    A plain linear head is bypassed: the forward returns the (B, M+1, d) hidden states and ``headscore`` runs the
    head in vocabulary blocks, so the (B, M+1, V) fp32 logits never exist. Otherwise (an adapter on the head) they
    do, and with many labels (banking_77: M = 232, V = 50,265) B is cut so that they stay under ~256 MB.
    """
    from tqdm.auto import tqdm

    tree = LabelTree.build(conts)
    m = len(tree.token)
    dev = model_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    bypass = linear_head(model)
    group = batch_size if bypass else max(1, min(batch_size, (64 << 20) // ((m + 1) * vocab)))
    nodes = torch.tensor(tree.token, dtype=torch.long)  # (M,)
    depth = torch.tensor(tree.depth, dtype=torch.long)  # (M,)
    src, tok, lab = tree.steps.to(dev).unbind(1)  # (S,) each
    additive = model.config._attn_implementation == "eager"
    dtype = model.get_input_embeddings().weight.dtype
    n_labels = len(conts)
    sums = torch.zeros(len(prompts), n_labels)
    for rows in tqdm(list(batches(range(len(prompts)), group)), desc="eval (rank)", disable=not progress,
                     unit="batch"):
        batch = collate([{"input_ids": prompts[i]} for i in rows], encoder.pad_id)
        pmask = batch["attention_mask"]  # (B, T)
        b = pmask.shape[0]
        ids = torch.cat([batch["input_ids"], nodes.expand(b, m)], dim=1)  # (B, T+M)
        pos = torch.cat([(pmask.cumsum(-1) - 1).clamp(min=0), pmask.sum(1, keepdim=True) + depth], dim=1)
        mask = _packed_attention(pmask, tree, dtype, additive)
        with head_returns_hidden(bypass and bypass[0]):
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                        use_cache=False, logits_to_keep=m + 1).logits  # (B, M+1, d) hidden, or (B, M+1, V) logits
        # log p(token) = logit[token] - logsumexp(logits), for every scored step: (B, S)
        at = (torch.arange(b, device=dev)[:, None] * (m + 1) + src).reshape(-1)  # (B*S,) rows of (B*(M+1), .)
        lp = logprobs(out.reshape(b * (m + 1), -1), bypass, at, tok.repeat(b)).view(b, -1)
        sums[list(rows)] += torch.zeros(b, n_labels, device=dev).index_add_(1, lab, lp).cpu()
    return sums


def _scores_shared_prompt(model, encoder, prompts, conts, batch_size, progress):
    """Score with the prompt encoded once per example and its KV cache repeated for every label.

    Per group of B examples (prompts left-padded to T) and L labels (continuation c_j of length n_j >= 2):
      pass 1: (B, T) prompts -> cache + logits at the last position only (logits_to_keep=1) -> scores c_j[0]
      pass 2: cache repeated to (B*L, T); feed c_j[:-1] right-padded to (B*L, N-1), N = max n_j; logits at
              position k score c_j[k+1]. Right padding sits after the real tokens, so causal attention keeps it
              from touching them; its logits are ignored.
    Cost: B*T + B*L*(N-1) token positions instead of B*L*(T+N) for prompt+label rows. Hidden cost: the repeated
    cache holds L copies of the prompt's keys/values, so labels are processed in chunks of at most
    max(1, 4*batch_size // B) to keep it within ~4 ordinary batches.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    n_labels = len(conts)
    sums = torch.zeros(len(prompts), n_labels)
    first = torch.tensor([c[0] for c in conts])  # (L,)
    width = max(len(c) for c in conts) - 1
    feed = torch.full((n_labels, width), encoder.pad_id, dtype=torch.long)  # (L, N-1) right-padded c_j[:-1]
    target = torch.zeros((n_labels, width), dtype=torch.long)  # (L, N-1) c_j[1:]
    valid = torch.zeros((n_labels, width), dtype=torch.bool)
    for j, c in enumerate(conts):
        feed[j, :len(c) - 1] = torch.tensor(c[:-1])
        target[j, :len(c) - 1] = torch.tensor(c[1:])
        valid[j, :len(c) - 1] = True
    dev = model_device(model)
    bypass = linear_head(model)  # the second pass's head in vocabulary blocks (``headscore``), not (B*n, N-1, V)
    first, feed, target, valid = first.to(dev), feed.to(dev), target.to(dev), valid.to(dev)
    groups = list(batches(range(len(prompts)), batch_size))
    for group in tqdm(groups, desc="eval (rank)", disable=not progress, unit="batch"):
        rows = list(group)
        batch = {k: v.to(dev) for k, v in collate([{"input_ids": prompts[i]} for i in rows], encoder.pad_id).items()}
        prompt_inputs = forward_inputs(model, batch)
        out = model(**prompt_inputs, use_cache=True, logits_to_keep=1)
        last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
        sums[rows] += last[:, first].cpu()
        cache = output_cache(out)
        if not isinstance(cache, DynamicCache):
            raise RuntimeError(f"unexpected cache type {type(cache).__name__}; use strategy=\"pairs\"")
        layers = [(k, v) for k, v, *_ in cache]  # per layer (B, H, T, D) keys and values of the prompts
        b = len(rows)
        prompt_mask = batch["attention_mask"]  # (B, T)
        prompt_len = prompt_mask.sum(1)  # (B,)
        chunk = max(1, 4 * batch_size // b)
        for j0 in range(0, n_labels, chunk):
            lab = list(range(j0, min(j0 + chunk, n_labels)))
            n = len(lab)
            # rows ordered (example, label): row r = example r // n, label lab[r % n]
            shared = DynamicCache(ddp_cache_data=[(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0))
                                                  for k, v in layers])
            ids = feed[lab].repeat(b, 1)  # (B*n, N-1)
            mask = torch.cat([prompt_mask.repeat_interleave(n, 0), torch.ones_like(ids)], dim=1)  # (B*n, T+N-1)
            pos = prompt_len.repeat_interleave(n, 0)[:, None] + torch.arange(width, device=dev)  # (B*n, N-1)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if "position_ids" in prompt_inputs:  # GPT-2/LLaMA: number the label tokens after each real prompt
                inputs["position_ids"] = pos
            with head_returns_hidden(bypass and bypass[0]):
                out = model(**inputs, **{cache_kwarg(model): shared}, use_cache=True).logits  # (B*n, N-1, d) hidden, or (.., V)
            # log p(token) = logit[token] - logsumexp(logits) at the real (not padding) label positions
            ok = valid[lab].repeat(b, 1)  # (B*n, N-1)
            lp = torch.zeros(ok.shape, device=dev)
            lp[ok] = logprobs(out.reshape(-1, out.shape[-1]), bypass, ok.reshape(-1).nonzero()[:, 0],
                              target[lab].repeat(b, 1)[ok])
            lp = lp.sum(-1).view(b, n)  # (B, n)
            sums[rows, j0:j0 + n] += lp.cpu()
    return sums


def _scores_padded_pairs(model, encoder, prompts, conts, batch_size, progress):
    """Score with one left-padded row per (example, label): prompt + continuation.

    Used for peft prompt-learning models. Left padding puts every continuation at the end of its row (virtual tokens
    are prepended, so the end still lines up), and the LM head runs only on the last (longest continuation + 1)
    positions via ``logits_to_keep`` instead of all T (saves a (B, T, V) matmul).
    """
    from tqdm.auto import tqdm

    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(conts))]
    sums = torch.empty(len(prompts), len(conts))
    keep = max(len(c) for c in conts) + 1
    dev = model_device(model)
    for chunk in tqdm(list(batches(pairs, batch_size)), desc="eval (rank)", disable=not progress, unit="batch"):
        batch = collate([{"input_ids": prompts[i] + conts[j]} for i, j in chunk], encoder.pad_id)
        batch = {k: v.to(dev) for k, v in batch.items()}
        logits = model(**forward_inputs(model, batch), logits_to_keep=keep).logits[:, -keep:]  # (B, K, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        kept = logprobs.shape[1]  # K = min(keep, T): a batch of short rows has fewer than `keep` positions
        for row, (i, j) in enumerate(chunk):
            c = torch.tensor(conts[j])
            # token at position T-len(c)+k is predicted by logits at position T-len(c)+k-1, i.e. K-len(c)-1+k
            pos = torch.arange(kept - len(c) - 1, kept - 1)
            sums[i, j] = logprobs[row, pos, c].sum()
    return sums
