"""``chat``: multi-turn conversations (Alpaca, ShareGPT or OpenAI ``messages`` rows), loss on the assistant's turns.

    input_ids = tokenize(chat_template(system, user_1, assistant_1, ..., user_n, assistant_n))
    labels    = input_ids on every assistant turn and its end marker (``data.train_on: last``: the final one only),
                -100 on system and user tokens

Rows are normalised by ``tasks.conversations`` (one error line naming every broken row), encoded by
``tasks.chat_encoding`` (whole-turn truncation: oldest pairs first, system prompt kept, a conversation that cannot
fit is dropped and counted). The template (``data.chat_template`` or the tokenizer's own) is installed into the
tokenizer before encoding, so the run's saved tokenizer carries it. Evaluated by the assistant-token loss and
perplexity of the held-out split plus generated replies scored by character ROUGE-L, BLEU-4 and exact match.
"""

from __future__ import annotations

import logging
from typing import Any

from clmtune.chat_templates import install_chat_template, reply_stops
from clmtune.tasks.base import Task
from clmtune.tasks.chat_encoding import encode_conversation, tokens_and_mask
from clmtune.tasks.conversations import to_conversations
from clmtune.tasks.examples import Conversation, Example, is_missing

log = logging.getLogger("clmtune")


class ChatTask(Task):
    name = "chat"
    nested_rows = True

    def prepare_tokenizer(self, tokenizer, d) -> None:
        source = install_chat_template(tokenizer, d.chat_template)
        log.debug("chat template: %s", source)

    def render_examples(self, rows: list[dict[str, Any]], d, labels, where: str, labelled: bool,
                        ) -> tuple[list[Example], int]:
        if not rows:
            return [], 0
        conv = to_conversations(rows, d.format, d.columns or None, where=where)
        if conv.dropped.get("final_user_message"):
            log.info("%s: %d conversations end with a user message nobody answered; that message is left out",
                     where, conv.dropped["final_user_message"])
        out = []
        for msgs, n in zip(conv.conversations, conv.row_numbers):
            rid = rows[n - 1].get(d.id_column) if len(rows) >= n else None
            rid = str(n - 1) if is_missing(rid) else str(rid)
            conversation = Conversation.from_dicts(msgs)
            last_user = conversation.last_user
            out.append(Example(id=rid, prompt=last_user, label=None, text=last_user, conversation=conversation))
        return out, 0

    def example_columns(self, examples: list[Example]) -> dict[str, list]:
        return {"messages": [e.conversation.as_dicts() for e in examples]}

    def sequence_lengths(self, tokenizer, d, examples: list[Example]) -> list[int]:
        """Tokens of each whole conversation under the run's chat template, exactly as ``encode`` renders it
        before any turn is left out (the template must be installed: ``prepare_tokenizer``)."""
        return [len(tokens_and_mask(tokenizer, e.conversation.as_dicts())[0]) for e in examples]

    def encode(self, batch, tokenizer, prefix, end_id, d) -> dict:
        """Each conversation (``messages``) -> ids + assistant labels; one that cannot fit is left out of the
        batch (a batched ``datasets.map`` may return fewer rows) and counted in ``finish_split``."""
        out = {"input_ids": [], "labels": [], "truncated": [], "prompt_len": [], "target_len": [], "turns": [],
               "turns_dropped": []}
        for msgs in batch["messages"]:
            enc = encode_conversation(tokenizer, msgs, d.max_length, d.train_on)
            if enc is None:
                continue
            supervised = sum(t != -100 for t in enc.labels)
            out["input_ids"].append(enc.input_ids)
            out["labels"].append(enc.labels)
            out["truncated"].append(enc.turns_dropped > 0)
            out["prompt_len"].append(len(enc.input_ids) - supervised)
            out["target_len"].append(supervised)
            out["turns"].append(sum(m["role"] == "assistant" for m in msgs) - enc.turns_dropped)
            out["turns_dropped"].append(enc.turns_dropped)
        return out

    def finish_split(self, ds, stats, d):
        turns = ds.data.column("turns").to_numpy()
        lengths = [len(x) for x in ds["input_ids"]]
        per_turn = sorted(round(n / t) for n, t in zip(lengths, turns) if t)
        stats.update(conversations=stats["rows"], dropped_too_long=stats["rows"] - len(ds),
                     turns=int(turns.sum()), turns_dropped=int(ds.data.column("turns_dropped").to_numpy().sum()),
                     tokens_per_turn={"p50": per_turn[len(per_turn) // 2] if per_turn else 0,
                                      "p95": per_turn[min(len(per_turn) - 1, int(0.95 * len(per_turn)))]
                                      if per_turn else 0, "max": per_turn[-1] if per_turn else 0})
        if stats["dropped_too_long"]:
            log.warning("%d conversations do not fit data.max_length=%d even with only their last turn; dropped",
                        stats["dropped_too_long"], d.max_length)
        return ds.remove_columns(["turns", "turns_dropped"])

    def format_prompt(self, text: str, d, tokenizer=None) -> str:
        """``clmtune generate --run CHAT_RUN TEXT``: TEXT as one user message under the run's template, followed by
        the assistant's generation prompt (a BOS the template writes is left to the tokenizer's own prefix)."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return text
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        return rendered[len(bos):] if bos and rendered.startswith(bos) else rendered

    def stop_strings(self, tokenizer) -> list[str]:
        return reply_stops(tokenizer)[1]
