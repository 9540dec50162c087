"""Generated replies to held-out prompts (chat and sft runs), scored against the references.

A chat conversation is cut before its last assistant reply; the rest (system prompt, earlier turns, the last user
message) is rendered with the run's chat template plus the assistant's generation prompt. An sft example's prompt
is its rendered ``data.template``. The model writes a reply (greedy, ``generate.max_new_tokens``,
``generate.repetition_penalty``; the one decoding loop of ``clmtune.decoding``, batched with left padding, KV cache
on), stopped by the end token or the template's end marker (as a token, or as text cut like every stop string), and the reply is compared with the reference by character ROUGE-L, BLEU-4 and exact match
(``clmtune.textmetrics``). Every prompt, reference and reply goes to ``predictions.jsonl`` and ``predictions.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from clmtune.chat_templates import reply_stops
from clmtune.decoding import Decoder, Sampling
from clmtune.models import context_length
from clmtune.run import PREDICTIONS_CSV, PREDICTIONS_JSONL, write_csv_atomic, write_text_atomic
from clmtune.tasks.encoding import cut_prompt, leading_special_ids, token_ids
from clmtune.tasks.examples import Example, drop_oldest_turns
from clmtune.textmetrics import score_texts


@dataclass
class Reply:
    prompt: str
    """The last user message (chat) or the rendered prompt (sft)."""
    reference: str
    generated: str
    earlier_turns: int = 0
    """User/assistant pairs before the prompt that the model saw (chat)."""


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]], room: int | None) -> tuple[list[int], int]:
    """(rendered prompt ids, earlier pairs kept): the oldest pairs are left out while the prompt is longer than
    ``room`` (``drop_oldest_turns``, as training truncates); a last message alone still too long keeps its end."""
    ids, dropped = drop_oldest_turns(
        messages, lambda msgs: list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                                  return_dict=True)["input_ids"]), len, room)
    body = len(messages) - (messages[0]["role"] == "system")
    return (ids[-room:] if room is not None and len(ids) > room else ids), (body - 1) // 2 - dropped


def generate_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, end_id: int,
                     repetition_penalty: float = 1.0, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt (token ids), cleaned, cut at the template's end marker."""
    extra_ids, stops = reply_stops(tokenizer)
    sampling = Sampling(max_tokens=max_new_tokens, temperature=0, repetition_penalty=repetition_penalty,
                        stop=stops, stop_ids=[end_id, *extra_ids])
    texts = Decoder(model, tokenizer).texts(prompts, sampling, batch_size=batch_size, progress=progress,
                                            desc="eval (replies)")
    return [t[0] for t in texts]


def predict_replies(model, tokenizer, examples: list[Example], chat: bool, max_new_tokens: int, end_id: int,
                    repetition_penalty: float = 1.0, batch_size: int = 16, progress: bool = False) -> list[Reply]:
    """A reply per held-out example: chat examples hold their ``conversation``; sft examples a prompt and its
    reference response."""
    ctx = context_length(model)
    room = None if ctx is None else max(ctx - max_new_tokens, 1)
    prompts, items = [], []
    if chat:
        for e in examples:
            msgs, reference = e.conversation.split_last_reply()
            ids, earlier = chat_prompt_ids(tokenizer, msgs, room)
            prompts.append(ids)
            items.append((msgs[-1]["content"], reference, earlier))
    else:
        prefix = leading_special_ids(tokenizer)
        for e, ids in zip(examples, token_ids(tokenizer, [e.prompt for e in examples])):
            ids = prefix + ids
            prompts.append(cut_prompt(ids, room, "left", len(prefix)) if room and len(ids) > room else ids)
            items.append((e.prompt, e.target or "", 0))
    generated = generate_replies(model, tokenizer, prompts, max_new_tokens, end_id, repetition_penalty, batch_size,
                                 progress)
    return [Reply(prompt=p, reference=r, generated=g, earlier_turns=n) for (p, r, n), g in zip(items, generated)]


def write_replies(replies: Sequence[Reply], out_dir: Path) -> None:
    rows = [{"prompt": r.prompt, "reference": r.reference, "generated": r.generated,
             "earlier_turns": r.earlier_turns} for r in replies]
    write_text_atomic(out_dir / PREDICTIONS_JSONL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_csv_atomic(out_dir / PREDICTIONS_CSV, ["prompt", "reference", "generated", "earlier_turns"],
                     [[r["prompt"], r["reference"], r["generated"], r["earlier_turns"]] for r in rows])


def reply_metrics(replies: Sequence[Reply]) -> dict:
    """Character ROUGE-L, BLEU-4, exact match (x100) and n."""
    return score_texts([r.generated for r in replies], [r.reference for r in replies])
