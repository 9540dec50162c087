"""Token ids of examples (a foundation): the shared pieces every task uses to build rows and batches.

One helper per concept: ``leading_special_ids`` (the BOS a tokenizer adds), ``cut_prompt`` (prompt truncation,
used by training, evaluation and ``generate``), ``build_train_example``/``build_sft_example`` (prompt + target +
end with the loss mask), ``left_pad``/``collate`` (left-padded batches).
"""

from __future__ import annotations

from typing import Sequence

import torch

from clmtune.tasks.examples import IGNORE_INDEX
from clmtune.errors import ClmtuneError


def token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (``leading_special_ids`` adds a BOS back where needed).
    No attention masks / token type ids: converting them to Python lists costs ~25 % of the tokenizer call."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                     return_token_type_ids=False).input_ids


def leading_special_ids(tokenizer) -> list[int]:
    """The BOS id when the tokenizer itself puts one in front of text (LLaMA, OPT), else nothing.

    We tokenize with ``add_special_tokens=False`` (a BERT tokenizer would otherwise wrap every piece in
    [CLS] ... [SEP], and those would end up in the middle of a sequence) and add the BOS back by hand.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a").input_ids
    without = tokenizer("a", add_special_tokens=False).input_ids
    if with_special[:1] == [bos] and with_special[1:1 + len(without)] == without:
        return [bos]
    return []


def cut_prompt(ids: list[int], room: int, side: str, keep_prefix: int) -> list[int]:
    """``ids`` cut to ``room`` tokens: ``left`` keeps the end (what the target follows), ``right`` the start; the
    first ``keep_prefix`` tokens (a BOS) always stay."""
    head, body = ids[:keep_prefix], ids[keep_prefix:]
    room -= len(head)
    body = body[len(body) - room:] if side == "left" else body[:room]
    return head + body


def build_train_example(prompt_ids: list[int], target_ids: list[int], end_id: int, max_length: int,
                        truncation_side: str = "left", label: str | None = None, keep_prefix: int = 0,
                        ) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, was_truncated) for one row, unpadded. The target and end token are never cut, nor the
    first ``keep_prefix`` prompt tokens (a BOS), so a cut prompt starts as in evaluation (``encode_prompts``)."""
    target = list(target_ids) + [end_id]
    if len(target) + keep_prefix + 1 > max_length:
        raise ClmtuneError(f"data.max_length={max_length} cannot hold the label {label!r} ({len(target) - 1} tokens) "
                           f"plus its end token and at least one prompt token; raise data.max_length to at least "
                           f"{len(target) + keep_prefix + 1}")
    cut = len(prompt_ids) + len(target) > max_length
    if cut:
        prompt_ids = cut_prompt(list(prompt_ids), max_length - len(target), truncation_side, keep_prefix)
    ids = list(prompt_ids) + target
    labels = [IGNORE_INDEX] * len(prompt_ids) + target
    return ids, labels, cut


def build_sft_example(prompt_ids: list[int], target_ids: list[int], end_id: int, max_length: int,
                      truncation_side: str = "left", keep_prefix: int = 0) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, was_truncated) for a prompt -> response row, unpadded.

    Too long: the prompt is cut first (``truncation_side``, its leading special tokens kept), but keeps at least
    half of ``max_length``; then the response is cut on the right (its end token goes with it: it did not end).
    """
    target = list(target_ids) + [end_id]
    prompt = list(prompt_ids)
    cut = len(prompt) + len(target) > max_length
    if cut:
        keep = min(len(prompt), max(max_length - len(target), max_length // 2, keep_prefix + 1))
        if keep < len(prompt):
            prompt = cut_prompt(prompt, keep, truncation_side, keep_prefix)
        target = target[:max_length - len(prompt)]
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target, cut


def left_pad(seqs: Sequence[Sequence[int]], pad_value: int, length: int | None = None) -> torch.Tensor:
    """Stack sequences into a (batch, length) tensor, padding on the left."""
    length = max(len(s) for s in seqs) if length is None else length
    out = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def collate(features: Sequence[dict[str, list[int]]], pad_id: int, length: int | None = None,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Left-padded batch: input_ids, attention_mask and (if present) labels, each of shape (batch, length).
    Labels are -100 on padding and on each row's first real token (nothing before it to predict it from).

    ``length=None`` pads to the longest row of the batch (rounded up to ``pad_to_multiple_of``).
    """
    if length is None:
        length = max(len(f["input_ids"]) for f in features)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    ids = [f["input_ids"] for f in features]
    batch = {"input_ids": left_pad(ids, pad_id, length),
             "attention_mask": left_pad([[1] * len(s) for s in ids], 0, length)}
    if "labels" in features[0]:
        labels = left_pad([f["labels"] for f in features], IGNORE_INDEX, length)
        # A row's first real token has no context: the position before it is padding (or there is none), so it
        # is never scored. Without this, an ``lm`` row's first token would be "predicted" from a pad position when
        # the row is padded but not when it is the longest of its batch: the loss would depend on the batching.
        labels[:, 0] = IGNORE_INDEX
        labels[:, 1:][batch["attention_mask"][:, :-1] == 0] = IGNORE_INDEX
        batch["labels"] = labels
    return batch
