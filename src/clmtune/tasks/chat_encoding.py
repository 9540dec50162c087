"""Conversations -> ``input_ids`` + ``labels`` with the loss on the assistant's turns only.

The chat template renders the whole conversation (system, user and assistant turns with their markers); labels
are the token ids where the assistant wrote (its reply and the end marker that follows it), ``-100`` elsewhere:

    input_ids  = tokenize(template(messages))
    labels[i]  = input_ids[i] if token i is inside an assistant turn else -100      (train_on: all)
                 ... only inside the last assistant turn                               (train_on: last)

With ``{% generation %}`` blocks in the template the mask is exactly
``apply_chat_template(..., return_assistant_tokens_mask=True)``; a template without them (many models' own) gets the
spans from prefix renderings: the assistant's turn i is the text between ``template(messages[:i], add_generation_
prompt=True)`` and ``template(messages[:i+1])``, mapped to tokens by the same overlap rule transformers uses.

Too long for ``max_length``: the oldest complete user+assistant pairs go first (the system prompt stays, the final
assistant reply is never cut); a conversation whose system prompt + last pair still does not fit is dropped and
counted. ``encode_conversations`` returns the features and the statistics ``clmtune prepare`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from clmtune.chat_templates import has_generation_blocks
from clmtune.config.task_rules import TRAIN_ON
from clmtune.errors import ClmtuneError
from clmtune.tasks.examples import IGNORE_INDEX, drop_oldest_turns



def _spans_by_prefix(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of the assistant turns) for a template without generation blocks."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (full.startswith(start) and full.startswith(upto) and len(upto) > len(start)):
            raise ClmtuneError("the chat template renders a conversation differently from its beginning, so the "
                               "assistant's tokens cannot be found; use a template with {% generation %} blocks or "
                               "a built-in one (data.chat_template: chatml, alpaca, zh)")
        spans.append((len(start), len(upto)))
    return full, spans


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    # The rule of transformers' apply_chat_template: a token overlapping a span is in it.
    mask, s = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        if s == len(spans):
            break
        if end > spans[s][0]:
            mask[t] = 1
    return mask


def tokens_and_mask(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) of one rendered conversation under ``tokenizer.chat_template``."""
    if has_generation_blocks(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text, spans = _spans_by_prefix(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _mask_from_spans(enc["offset_mapping"], spans)


def _last_run_only(mask: list[int]) -> list[int]:
    """Keep only the last contiguous run of ones (the final assistant turn)."""
    out = [0] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    turns_dropped: int  # oldest user+assistant pairs removed to fit max_length


def encode_conversation(tokenizer, messages: list[dict[str, str]], max_length: int | None = None,
                        train_on: str = "all") -> Encoded | None:
    """One conversation -> ids and labels, or None when it cannot fit ``max_length`` even with only its system
    prompt and final user+assistant pair."""
    if train_on not in TRAIN_ON:
        raise ClmtuneError(f"data.train_on={train_on!r}: use all (every assistant turn) or last")
    (ids, mask), dropped = drop_oldest_turns(messages, lambda msgs: tokens_and_mask(tokenizer, msgs),
                                             lambda out: len(out[0]), max_length, keep=2)
    if max_length is not None and len(ids) > max_length:
        return None
    if train_on == "last":
        mask = _last_run_only(mask)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return Encoded(ids, labels, dropped)


@dataclass
class ChatStats:
    """What ``clmtune prepare`` reports for a chat split."""

    conversations: int = 0
    encoded: int = 0
    truncated: int = 0           # conversations that lost their oldest turns
    turns_dropped: int = 0       # user+assistant pairs removed by truncation
    dropped_too_long: int = 0    # conversations that could not fit at all (not trained on)
    assistant_turns: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    tokens_per_turn: list[int] = field(default_factory=list)  # tokens per user+assistant pair, after truncation

    def as_dict(self) -> dict[str, Any]:
        per = sorted(self.tokens_per_turn)

        def q(p: float) -> int:
            return per[min(len(per) - 1, int(p * len(per)))] if per else 0

        return {"conversations": self.conversations, "encoded": self.encoded, "truncated": self.truncated,
                "turns_dropped": self.turns_dropped, "dropped_too_long": self.dropped_too_long,
                "assistant_turns": self.assistant_turns, "tokens": self.tokens,
                "supervised_tokens": self.supervised_tokens,
                "tokens_per_turn": {"mean": round(sum(per) / len(per), 1) if per else 0.0, "p50": q(0.5),
                                    "p95": q(0.95), "max": per[-1] if per else 0}}


def encode_conversations(tokenizer, conversations: Sequence[list[dict[str, str]]], max_length: int | None,
                         train_on: str = "all") -> tuple[list[dict[str, list[int]]], ChatStats]:
    """Encode many conversations; the dropped ones are counted in the stats, never silently lost."""
    stats = ChatStats(conversations=len(conversations))
    features = []
    for msgs in conversations:
        enc = encode_conversation(tokenizer, msgs, max_length, train_on)
        if enc is None:
            stats.dropped_too_long += 1
            continue
        stats.encoded += 1
        stats.truncated += enc.turns_dropped > 0
        stats.turns_dropped += enc.turns_dropped
        n_pairs = sum(m["role"] == "assistant" for m in msgs) - enc.turns_dropped
        stats.assistant_turns += n_pairs
        stats.tokens += len(enc.input_ids)
        stats.supervised_tokens += sum(lab != IGNORE_INDEX for lab in enc.labels)
        if n_pairs:
            stats.tokens_per_turn.append(round(len(enc.input_ids) / n_pairs))
        features.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return features, stats
