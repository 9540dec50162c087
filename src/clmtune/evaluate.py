"""Evaluate stage: classification as generation (accuracy, macro-F1, confusion matrix, RAFT submissions) and
perplexity of language modelling.

Two classification methods:
- ``rank`` (default): score each label's tokens (+ end token) by their log-likelihood after the prompt and predict
  the best label; never invalid. One forward per batch runs each prompt once followed by the labels as a prefix
  tree under a 4D attention mask (``_scores_packed``; other architectures share the prompt's KV cache instead);
  the LM head runs only on positions that score label tokens.
- ``generate``: greedy decoding of up to (longest label + 2) tokens, stop at the end token, strip whitespace and
  compare with the label names (peft's example). Outputs that match no label are counted as ``invalid``;
  optionally they are also mapped to the nearest label by edit distance and both numbers are reported.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from clmtune.config import EVAL_METHODS, RunConfig
from clmtune.data import (IGNORE_INDEX, ClassificationEncoder, Example, collate, left_pad, load_task, prepare_data,
                          read_table, render_examples, resolve_source)
from clmtune.errors import ClmtuneError
from clmtune.models import forward_inputs, load_run, model_device
from clmtune.text import clean_text, nearest_label

log = logging.getLogger("clmtune")


@dataclass
class Predictions:
    predicted: list[str]
    """Predicted label per example; for ``generate`` the cleaned output, which may be no label at all."""
    invalid: int
    """Outputs that match no label (always 0 for ``rank``)."""
    outputs: list[str] | None = None
    """``generate`` only: the decoded outputs (same as ``predicted``)."""
    mapped: list[str] | None = None
    """``generate`` with ``map_invalid``: each output, or the nearest label when the output is invalid."""
    truncated: int = 0
    """Prompts cut to fit ``data.max_length``."""


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _is_prompt_learning(model) -> bool:
    """peft prompt/prefix/p-tuning models prepend virtual tokens or their own KV cache inside ``forward``."""
    cfg = getattr(model, "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def _continuations(encoder: ClassificationEncoder, labels: Sequence[str]) -> list[list[int]]:
    """Each label's token ids + end token: exactly the tokens the model learnt to write after the prompt."""
    return [ids + [encoder.end_id] for ids in encoder.label_ids(labels)]


# Architectures whose forward takes explicit ``position_ids`` and a custom 4D attention mask as-is (transformers 5
# ``masking_utils``), each checked against naive scoring in tests/test_eval_methods.py. BLOOM is not here: its
# ALiBi bias is built from a 2D mask. A sliding window (Mistral) is not applied to a custom mask: prompts longer
# than the window fall back to prompt+label rows (``label_scores``).
PACKED_MODEL_TYPES = frozenset({"gpt2", "opt", "llama", "mistral", "qwen2", "qwen3"})
RANK_STRATEGIES = ("packed", "shared_cache", "pairs")


def rank_strategy(model) -> str:
    """How ``label_scores`` runs a model: ``packed`` (one forward per batch: prompt + label tree under a 4D mask),
    ``shared_cache`` (prompt once, its KV cache repeated per label) or ``pairs`` (one prompt+label row per pair:
    peft prompt-learning models, whose forward prepends virtual tokens and builds its own mask)."""
    if _is_prompt_learning(model):
        return "pairs"
    config = getattr(model, "config", None)
    if (getattr(config, "model_type", None) in PACKED_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")):
        return "packed"
    return "shared_cache"


@torch.no_grad()
def label_scores(model, encoder: ClassificationEncoder, prompts: list[list[int]], labels: list[str],
                 batch_size: int, normalize: bool = False, progress: bool = False,
                 strategy: str | None = None) -> torch.Tensor:
    """(n_examples, n_labels) log-likelihood of each label's tokens + end token after each prompt.

    ``normalize``: mean instead of sum over the continuation's tokens. ``strategy=None`` picks the fastest exact
    way this model supports (``rank_strategy``); all three give the same scores up to float rounding.
    """
    conts = _continuations(encoder, labels)
    if strategy is None:
        strategy = rank_strategy(model)
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        if window and max(map(len, prompts), default=0) + max(map(len, conts)) > window:
            strategy = "pairs"  # the packed mask has no window; a repeated left-padded cache misplaces it (tested)
    if strategy not in RANK_STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {RANK_STRATEGIES}")
    fn = {"packed": _scores_packed, "shared_cache": _scores_shared_prompt, "pairs": _scores_padded_pairs}[strategy]
    order = _by_length(prompts)  # batches of similar length: less padding, same scores
    sums = fn(model, encoder, [prompts[i] for i in order], conts, batch_size, progress)  # (n, L)
    scores = torch.empty_like(sums)
    scores[order] = sums / torch.tensor([float(len(c)) for c in conts]) if normalize else sums
    return scores


def _by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
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
        index: dict[tuple[int, ...], int] = {}
        token, depth, parent, steps = [], [], [], []
        for j, c in enumerate(conts):
            src = 0
            for k, t in enumerate(c):
                steps.append((src, t, j))
                if k == len(c) - 1:
                    break
                key = tuple(c[:k + 1])
                if key not in index:
                    index[key] = len(token)
                    token.append(t)
                    depth.append(k)
                    parent.append(src - 1)  # -1: the prompt
                src = index[key] + 1
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
    Hidden cost: the (B, M+1, V) fp32 logits; with many labels (banking_77: M = 232, V = 50,265) B is cut so that
    they stay under ~256 MB.
    """
    from tqdm.auto import tqdm

    tree = LabelTree.build(conts)
    m = len(tree.token)
    dev = model_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    group = max(1, min(batch_size, (64 << 20) // ((m + 1) * vocab)))
    nodes = torch.tensor(tree.token, dtype=torch.long)  # (M,)
    depth = torch.tensor(tree.depth, dtype=torch.long)  # (M,)
    src, tok, lab = tree.steps.to(dev).unbind(1)  # (S,) each
    additive = model.config._attn_implementation == "eager"
    dtype = model.get_input_embeddings().weight.dtype
    n_labels = len(conts)
    sums = torch.zeros(len(prompts), n_labels)
    for rows in tqdm(list(_batches(range(len(prompts)), group)), desc="eval (rank)", disable=not progress,
                     unit="batch"):
        batch = collate([{"input_ids": prompts[i]} for i in rows], encoder.pad_id)
        pmask = batch["attention_mask"]  # (B, T)
        b = pmask.shape[0]
        ids = torch.cat([batch["input_ids"], nodes.expand(b, m)], dim=1)  # (B, T+M)
        pos = torch.cat([(pmask.cumsum(-1) - 1).clamp(min=0), pmask.sum(1, keepdim=True) + depth], dim=1)
        mask = _packed_attention(pmask, tree, dtype, additive)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       use_cache=False, logits_to_keep=m + 1).logits.float()  # (B, M+1, V)
        # log p(token) = logit[token] - logsumexp(logits), gathered for every scored step: (B, S)
        lp = logits[:, src, tok] - logits.logsumexp(-1)[:, src]
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
    first, feed, target, valid = first.to(dev), feed.to(dev), target.to(dev), valid.to(dev)
    groups = list(_batches(range(len(prompts)), batch_size))
    for group in tqdm(groups, desc="eval (rank)", disable=not progress, unit="batch"):
        rows = list(group)
        batch = {k: v.to(dev) for k, v in collate([{"input_ids": prompts[i]} for i in rows], encoder.pad_id).items()}
        prompt_inputs = forward_inputs(model, batch)
        out = model(**prompt_inputs, use_cache=True, logits_to_keep=1)
        last = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
        sums[rows] += last[:, first].cpu()
        cache = out.cache
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
            logits = model(**inputs, cache=shared, use_cache=True).logits.float()  # (B*n, N-1, V)
            # log p(token) = logit[token] - logsumexp(logits): same as log_softmax + gather without a 2nd (.., V)
            lp = logits.gather(-1, target[lab].repeat(b, 1)[..., None])[..., 0] - logits.logsumexp(-1)
            lp = (lp * valid[lab].repeat(b, 1)).sum(-1).view(b, n)  # (B, n)
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
    for chunk in tqdm(list(_batches(pairs, batch_size)), desc="eval (rank)", disable=not progress, unit="batch"):
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


@torch.no_grad()
def predict_rank(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                 normalize: bool = False, progress: bool = False) -> Predictions:
    reserve = max(len(c) for c in encoder.label_ids(labels)) + 1
    prompts, truncated = encoder.encode_prompts(examples, reserve=reserve)
    scores = label_scores(model, encoder, prompts, labels, batch_size, normalize, progress)
    return Predictions(predicted=[labels[k] for k in scores.argmax(dim=1).tolist()], invalid=0, truncated=truncated)


@torch.no_grad()
def predict_generate(model, encoder, examples: list[Example], labels: list[str], batch_size: int,
                     progress: bool = False, map_invalid: bool = True) -> Predictions:
    """Greedy decoding with ``transformers``' ``generate`` (KV cache on), then clean and compare with the labels."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    max_new = max(len(c) for c in encoder.label_ids(labels)) + 2
    prompts, truncated = encoder.encode_prompts(examples, reserve=max_new)
    tok = encoder.tokenizer
    gen_cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=encoder.end_id,
                               pad_token_id=encoder.pad_id)
    outputs = [""] * len(prompts)
    order = _by_length(prompts)  # batches of similar length: less padding
    for group in tqdm(list(_batches(order, batch_size)), desc="eval (generate)", disable=not progress,
                      unit="batch"):
        chunk = [prompts[i] for i in group]
        ids = left_pad(chunk, encoder.pad_id).to(model_device(model))  # (B, T)
        mask = left_pad([[1] * len(c) for c in chunk], 0).to(ids.device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        for i, row in zip(group, out[:, ids.shape[1]:].tolist()):  # (B, <= max_new) new tokens
            if encoder.end_id in row:
                row = row[:row.index(encoder.end_id)]
            outputs[i] = clean_text(tok.decode(row, skip_special_tokens=True))
    invalid = sum(o not in labels for o in outputs)
    mapped = [o if o in labels else nearest_label(o, labels) for o in outputs] if map_invalid else None
    return Predictions(predicted=outputs, invalid=invalid, outputs=outputs, mapped=mapped, truncated=truncated)


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (RAFT's metric, over the label set), per-class P/R/F1 and the confusion matrix.

    A prediction outside the label set (an invalid ``generate`` output) counts as wrong: a miss for its gold class,
    a false positive for none; the confusion matrix counts it in ``invalid_per_gold``.
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    acc = sum(g == p for g, p in zip(gold, predicted)) / len(gold)
    macro = f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
    p, r, f, s = precision_recall_fscore_support(gold, predicted, labels=labels, zero_division=0)
    per_class = {lab: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
                 for k, lab in enumerate(labels)}
    cm = confusion_matrix(gold, predicted, labels=labels).tolist()
    invalid = [sum(g == lab and pr not in labels for g, pr in zip(gold, predicted)) for lab in labels]
    return {"accuracy": acc, "macro_f1": float(macro), "per_class": per_class,
            "confusion_matrix": {"labels": labels, "rows_gold_cols_predicted": cm, "invalid_per_gold": invalid}}


def plot_confusion_matrix(matrix: dict, path: Path, title: str) -> Path:
    """Write the confusion matrix (counts; rows gold, columns predicted, plus an ``invalid`` column when any) as PNG."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels, cm = matrix["labels"], [list(r) for r in matrix["rows_gold_cols_predicted"]]
    cols = list(labels)
    if any(matrix.get("invalid_per_gold", [])):
        cols.append("(invalid)")
        cm = [r + [n] for r, n in zip(cm, matrix["invalid_per_gold"])]
    side = min(max(4.0, 2 + 0.45 * len(cols)), 30)  # banking_77: 77 columns still readable
    # Chinese label names need a CJK font; matplotlib picks the first installed one of these.
    plt.rcParams["font.sans-serif"] = ["DejaVu Sans", "Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Zen Hei",
                                       "SimHei", "Microsoft YaHei", "PingFang SC", "Arial Unicode MS"]
    from clmtune.fonts import use_cjk_font; use_cjk_font(cols + [title])  # noqa: E702  CJK font first (overrides the line above)
    fig, ax = plt.subplots(figsize=(side + 2, side + 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Glyph missing from font": a box instead of a CJK character, not an error
        im = ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 4 else 0, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(title, fontsize=10)
        if len(cols) <= 20:
            peak = max(max(r) for r in cm) or 1
            for i, row in enumerate(cm):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def submission_names(cfg: RunConfig, labels: list[str]) -> dict[str, str]:
    """Label (as the model writes it) -> name for a RAFT submission: ``task.json``'s spelling (``change_pin``) when
    the data source is a RAFT folder, else the label itself."""
    try:
        path = resolve_source(cfg.data.source)
    except ClmtuneError:
        return {lab: lab for lab in labels}
    names = {}
    if path.is_dir() and (path / "task.json").is_file():
        meta = json.loads((path / "task.json").read_text(encoding="utf-8"))
        for name in meta.get("label_columns", {}).get(cfg.data.label_column, []):
            names[str(name).replace("_", " ").strip()] = str(name)
    return {lab: names.get(lab, lab) for lab in labels}


def evaluate_examples(model, tokenizer, cfg: RunConfig, examples: list[Example], labels: list[str],
                      method: str, out_dir: Path, progress: bool = True) -> dict:
    """Predict ``examples``; write ``eval.json``, ``predictions.csv`` and (labelled) ``confusion_matrix.png`` into
    ``out_dir``; return what ``eval.json`` holds.

    Unlabelled examples give a RAFT submission: ``predictions.csv`` with columns ``ID,Label``.
    """
    if method not in EVAL_METHODS:
        raise ClmtuneError(f"eval method {method!r} is not one of {', '.join(EVAL_METHODS)}")
    if not examples:
        raise ClmtuneError("the split to evaluate is empty; check the data file")
    encoder = ClassificationEncoder(tokenizer, cfg.data)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    if method == "rank":
        preds = predict_rank(model, encoder, examples, labels, cfg.eval.batch_size, cfg.eval.normalize_by_length,
                             progress)
    else:
        preds = predict_generate(model, encoder, examples, labels, cfg.eval.batch_size, progress,
                                 cfg.eval.map_invalid)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    if preds.truncated:
        log.warning("eval: %d of %d prompts were cut to fit data.max_length=%d", preds.truncated, len(examples),
                    cfg.data.max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    labelled = all(e.label is not None for e in examples)
    result = {"method": method, "n": len(examples), "invalid": preds.invalid, "seconds": round(seconds, 3),
              "examples_per_s": round(len(examples) / max(seconds, 1e-9), 2), "truncated_prompts": preds.truncated}
    if method == "rank":
        result["normalize_by_length"] = cfg.eval.normalize_by_length
    final = preds.mapped if preds.mapped is not None else preds.predicted
    files = {"predictions": "predictions.csv"}
    if labelled:
        gold = [e.label for e in examples]
        result.update(classification_metrics(gold, preds.predicted, labels))
        if preds.mapped is not None:
            result["mapped_to_nearest_label"] = classification_metrics(gold, preds.mapped, labels)
        title = f"{method}: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} (n={len(gold)})"
        plot_confusion_matrix(result["confusion_matrix"], out_dir / "confusion_matrix.png", title)
        files["confusion_matrix_png"] = "confusion_matrix.png"
        with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            extra = ["output", "mapped"] if preds.mapped is not None else ["output"] if preds.outputs else []
            w.writerow(["id", "text", "gold", "predicted", *extra])
            for k, (e, p) in enumerate(zip(examples, preds.predicted)):
                more = [preds.outputs[k]] if preds.outputs else []
                if preds.mapped is not None:
                    more = [preds.outputs[k], preds.mapped[k]]
                w.writerow([e.id, e.text, e.label, p, *more])
    else:  # RAFT submission shape; an invalid output stays as written unless eval.map_invalid maps it
        names = submission_names(cfg, labels)
        with open(out_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["ID", "Label"])
            w.writerows([e.id, names.get(p, p)] for e, p in zip(examples, final))
        result["submission"] = True
        result["predicted_counts"] = {lab: final.count(lab) for lab in labels}
    result["files"] = files
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


@torch.no_grad()
def perplexity(model, features: Sequence[dict[str, list[int]]], pad_id: int, batch_size: int = 8,
               progress: bool = False) -> dict:
    """Perplexity of tokenized features ``{"input_ids", "labels"}`` (labels = -100 where not scored).

    Token-weighted: exp(sum of NLL over every scored token / number of scored tokens), so a long row counts more
    than a short one and padding (label -100) never counts. Rows are left-padded per batch.
    Hidden cost: the LM head runs on all (B, T) positions -> a (B, T, V) fp32 tensor per batch.
    """
    from tqdm.auto import tqdm

    if not features:
        raise ClmtuneError("the split for perplexity is empty; check the data file")
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for chunk in tqdm(list(_batches(features, batch_size)), desc="eval (perplexity)", disable=not progress,
                      unit="batch"):
        batch = {k: v.to(model_device(model)) for k, v in collate(chunk, pad_id).items()}
        logits = model(**forward_inputs(model, batch)).logits  # (B, T', V); T' > T with prompt-learning prefixes
        logits = logits[:, -batch["input_ids"].shape[1]:].float()  # (B, T, V)
        # Position t predicts token t+1. A row's first real token follows padding (left padding) and has no
        # context: it is never scored, as in an unpadded row. (B, T-1)
        labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, :-1] == 0, IGNORE_INDEX)
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    if tokens == 0:
        raise ClmtuneError("no scored tokens for perplexity (every label is -100); check the data")
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens": tokens, "n": len(features)}


def evaluate_lm(model, features: Sequence[dict[str, list[int]]], pad_id: int, out_dir: Path, batch_size: int = 8,
                progress: bool = True) -> dict:
    """Perplexity of a held-out split of tokenized features, written to ``out_dir/eval.json``."""
    t0 = time.perf_counter()
    result = {"method": "perplexity", **perplexity(model, features, pad_id, batch_size, progress)}
    seconds = time.perf_counter() - t0
    result.update(seconds=round(seconds, 3), examples_per_s=round(len(features) / max(seconds, 1e-9), 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def evaluate_run(run_dir: str | Path, split: str = "eval", data_file: str | None = None, method: str | None = None,
                 out_dir: str | Path | None = None, progress: bool = True, device: str | None = None,
                 ) -> tuple[dict, Path]:
    """Evaluate a trained run on its held-out split (``eval``), its unlabelled ``test`` split, or ``data_file``.

    Returns (metrics, folder written to). Default folders: the run folder for ``eval``, ``RUN/test`` for ``test``,
    ``RUN/eval-<file stem>`` for a data file. ``device``: overrides the run's ``eval.device``.
    """
    from clmtune.models import read_run_config

    run_dir = Path(run_dir)
    model, tokenizer, cfg = load_run(run_dir, device=device or read_run_config(run_dir).eval.device)
    if cfg.data.task != "classify":
        return _evaluate_lm_run(run_dir, model, tokenizer, cfg, split, data_file, out_dir, progress)
    labels = json.loads((run_dir / "train_summary.json").read_text(encoding="utf-8"))["labels"]
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise ClmtuneError(f"--data {data_file!r}: no such file")
        rows = read_table(path)
        labelled = bool(rows) and cfg.data.label_column in rows[0]
        examples, _ = render_examples(rows, cfg.data, labels, str(path), labelled=labelled)
        default_out = run_dir / f"eval-{path.stem}"
    else:
        if split not in ("eval", "test"):
            raise ClmtuneError(f"--split {split!r} is not one of eval, test")
        task = load_task(cfg.data)
        examples = task.eval if split == "eval" else task.test
        if not examples:
            raise ClmtuneError(f"the run's {split!r} split is empty" + (
                "; set data.eval_fraction > 0 or pass --data FILE" if split == "eval" else
                "; set data.test_file or pass --data FILE"))
        default_out = run_dir if split == "eval" else run_dir / "test"
    out = Path(out_dir) if out_dir else default_out
    result = evaluate_examples(model, tokenizer, cfg, examples, labels, method or cfg.eval.method, out, progress)
    return result, out


def _evaluate_lm_run(run_dir: Path, model, tokenizer, cfg: RunConfig, split: str, data_file: str | None,
                     out_dir: str | Path | None, progress: bool) -> tuple[dict, Path]:
    """Perplexity of an ``lm``/``sft`` run on its held-out split or on ``data_file`` (tokenized like training)."""
    import dataclasses

    if data_file is not None:
        if not Path(data_file).is_file():
            raise ClmtuneError(f"--data {data_file!r}: no such file")
        data_cfg = dataclasses.replace(cfg.data, source=str(data_file), eval_file=None, test_file=None,
                                       eval_fraction=0.0, prepared=None)
        features = prepare_data(tokenizer, data_cfg).train
        default_out = run_dir / f"eval-{Path(data_file).stem}"
    else:
        if split != "eval":
            raise ClmtuneError(f"--split {split!r}: an {cfg.data.task} run is scored by perplexity on its held-out "
                               "'eval' split or on --data FILE")
        features = prepare_data(tokenizer, cfg.data).eval
        if features is None or len(features) == 0:
            raise ClmtuneError("the run's 'eval' split is empty; set data.eval_fraction > 0 or pass --data FILE")
        default_out = run_dir
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(features["input_ids"], features["labels"])]
    out = Path(out_dir) if out_dir else default_out
    return evaluate_lm(model, rows, tokenizer.pad_token_id, out, cfg.eval.batch_size, progress), out
