"""Generated replies to held-out conversations, scored against the references (chat and sft runs).

Each held-out conversation is cut before its last assistant reply; the rest (system prompt, earlier turns, the
last user message) is rendered with the chat template and the assistant's generation prompt, the model writes a
reply (greedy by default, batched with left padding, KV cache on), and the reply is compared with the reference:
character ROUGE-L, BLEU-4 and exact match (``clmtune.textmetrics``). ``predictions.jsonl`` keeps every prompt,
reference and generated reply.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from clmtune.chat_templates import reply_stops
from clmtune.config import GenerateConfig
from clmtune.data import left_pad
from clmtune.generate import _decode, _generation_config, _stopping_criteria, context_length, stop_token_ids
from clmtune.models import model_device
from clmtune.textmetrics import score_texts


@dataclass
class ChatPrediction:
    prompt: str
    """The last user message (the whole conversation before it is part of the model's input)."""
    reference: str
    generated: str
    earlier_turns: int
    """User/assistant pairs before the prompt that the model saw."""


def split_last_reply(conversation: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(messages up to the last user message, the last assistant reply)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    return conversation[:last], conversation[last]["content"]


def _prompt_ids(tokenizer, messages: list[dict[str, str]], room: int | None) -> tuple[list[int], int]:
    """Rendered prompt ids; the oldest pairs are left out while it is longer than ``room`` (as training does)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(system):]
    while True:
        ids = list(tokenizer.apply_chat_template(system + body, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"])
        if room is None or len(ids) <= room or len(body) <= 1:
            return ids[-room:] if room is not None and len(ids) > room else ids, (len(body) - 1) // 2
        body = body[2:]


@torch.no_grad()
def predict_replies(model, tokenizer, conversations: Sequence[list[dict[str, str]]], settings: GenerateConfig,
                    progress: bool = False) -> list[ChatPrediction]:
    """The model's reply to each conversation's last user message, in input order."""
    from tqdm.auto import tqdm

    ctx = context_length(model)
    room = None if ctx is None else ctx - settings.max_new_tokens
    extra_ids, stops = reply_stops(tokenizer)
    stop_ids = sorted(set(stop_token_ids(tokenizer, model)) | set(extra_ids))
    gen_cfg = _generation_config(settings, stop_ids, tokenizer.pad_token_id)
    items = []
    for conv in conversations:
        msgs, reference = split_last_reply(conv)
        ids, earlier = _prompt_ids(tokenizer, msgs, room)
        items.append((ids, msgs[-1]["content"], reference, earlier))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))  # similar lengths share a batch
    generated: list[str] = [""] * len(items)
    torch.manual_seed(settings.seed)
    groups = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    for group in tqdm(groups, desc="generate replies", disable=not progress, unit="batch"):
        input_ids = left_pad([items[i][0] for i in group], tokenizer.pad_token_id).to(model_device(model))  # (B, T)
        attention_mask = left_pad([[1] * len(items[i][0]) for i in group], 0).to(input_ids.device)  # (B, T)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg,
                             stopping_criteria=_stopping_criteria(tokenizer, stops, input_ids.shape[1]))
        for r, row in enumerate(out[:, input_ids.shape[1]:].tolist()):
            generated[group[r]] = _decode(tokenizer, row, stop_ids, stops)
    return [ChatPrediction(prompt=p, reference=ref, generated=g, earlier_turns=e)
            for (_, p, ref, e), g in zip(items, generated)]


def score_predictions(predictions: Sequence[ChatPrediction]) -> dict[str, float]:
    """Character ROUGE-L, BLEU-4 and exact match (x100) of the generated replies, and ``n``."""
    return score_texts([p.generated for p in predictions], [p.reference for p in predictions])


def write_predictions(predictions: Sequence[ChatPrediction], folder: str | Path) -> list[Path]:
    """``predictions.jsonl`` and ``predictions.csv`` (prompt, reference, generated, earlier_turns)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p.prompt, "reference": p.reference, "generated": p.generated,
             "earlier_turns": p.earlier_turns} for p in predictions]
    jsonl, table = folder / "predictions.jsonl", folder / "predictions.csv"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with open(table, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["prompt", "reference", "generated", "earlier_turns"])
        w.writeheader()
        w.writerows(rows)
    return [jsonl, table]
