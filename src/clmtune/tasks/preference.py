"""``preference``: prompt / chosen / rejected pairs for DPO, IPO, ORPO and SimPO (``preference:`` section).

    chosen   = prefix + prompt_ids + chosen_ids + [end]      labels: -100 on prefix and prompt
    rejected = prefix + prompt_ids + rejected_ids + [end]    labels: -100 on prefix and prompt

Rows are either text pairs (``data.prompt_column``, ``data.chosen_column``, ``data.rejected_column``) or
conversation pairs: chosen and rejected are OpenAI message lists that share their first messages (the prompt; a
``prompt`` list or text in front of them is part of it) and end with the assistant's answer; they are rendered by
the chat template (``data.chat_template`` or the tokenizer's own) when encoded, as TRL's DPOTrainer does.

Too long: the prompt is cut first (``data.truncation_side``, default from its start), never the responses; a pair
whose responses leave no room for one prompt token is dropped and counted (``dropped_too_long``). Each pair is a
``PreferencePair`` record; the train stage runs chosen and rejected as one concatenated batch
(``clmtune.train.preference``), the losses are in ``clmtune.tasks.preference_loss``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from clmtune.errors import ClmtuneError
from clmtune.tasks.base import Task
from clmtune.tasks.encoding import cut_prompt, token_ids
from clmtune.tasks.examples import IGNORE_INDEX, Example, cell_text, check_columns, is_missing, row_name

log = logging.getLogger("clmtune")

Messages = list[dict[str, str]]


@dataclass
class PreferencePair(Example):
    """One pair: ``prompt``, ``target`` (the chosen response) and ``rejected``. Conversation pairs also keep their
    messages: ``messages`` (the shared prompt turns) and the chosen / rejected answers' turns."""

    rejected: str = ""
    messages: Messages | None = None
    chosen_messages: Messages | None = None
    rejected_messages: Messages | None = None

    @property
    def chosen(self) -> str:
        return self.target or ""

    @property
    def dedup_key(self) -> tuple:
        """Equal only when the rejected answer is equal too: one prompt and chosen answer against two different
        rejected answers are two pairs to learn from."""
        return (*super().dedup_key, self.rejected, repr(self.messages), repr(self.chosen_messages),
                repr(self.rejected_messages))


def _as_messages(value: Any, key: str, where: str) -> Messages | None:
    """An OpenAI message list as ``[{role, content}]`` (other keys dropped), or None when ``value`` is text."""
    if isinstance(value, str) or is_missing(value):
        return None
    if hasattr(value, "tolist"):  # Parquet lists arrive as numpy arrays
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise ClmtuneError(f"{where}: {key} is neither text nor a list of {{role, content}} messages ({value!r:.80}); "
                           "fix the row")
    return [{"role": str(m["role"]), "content": cell_text(m["content"])} for m in value]


def split_conversations(prompt: Messages, chosen: Messages, rejected: Messages, where: str,
                        ) -> tuple[Messages, Messages, Messages]:
    """(shared prompt turns, chosen answer turns, rejected answer turns): chosen and rejected lose their common
    first messages, which join ``prompt``; each answer must then end with an assistant message."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    shared, c, r = prompt + chosen[:k], chosen[k:], rejected[k:]
    for name, turns in (("chosen", c), ("rejected", r)):
        if not turns or turns[-1]["role"] != "assistant":
            raise ClmtuneError(f"{where}: the {name} conversation does not end with an assistant message after the "
                               "messages it shares with the other; each must end with its own answer")
    if not shared:
        raise ClmtuneError(f"{where}: chosen and rejected share no prompt message; give a prompt column or let both "
                           "start with the same user message")
    return shared, c, r


class PreferenceTask(Task):
    name = "preference"
    training = "preference"
    nested_rows = True

    def prepare_tokenizer(self, tokenizer, d) -> None:
        if d.chat_template:  # conversation pairs; text pairs need no template
            from clmtune.chat_templates import install_chat_template

            install_chat_template(tokenizer, d.chat_template)

    def check_columns(self, d, columns, where) -> None:
        check_columns("data.chosen_column/rejected_column", [d.chosen_column, d.rejected_column], columns, where,
                      "column(s)")

    def example(self, row, i, rid, d, labels, where, labelled) -> PreferencePair | None:
        at = f"{where} {row_name(where, i)}"
        prompt_value = row.get(d.prompt_column)
        chosen, rejected = row[d.chosen_column], row[d.rejected_column]
        c_msgs = _as_messages(chosen, d.chosen_column, at)
        r_msgs = _as_messages(rejected, d.rejected_column, at)
        if (c_msgs is None) != (r_msgs is None):
            raise ClmtuneError(f"{at}: one of {d.chosen_column}/{d.rejected_column} is text and the other a message "
                               "list; give both the same way")
        if c_msgs is None:  # a text pair
            if d.prompt_column not in row:
                raise ClmtuneError(f"data.prompt_column={d.prompt_column!r} is not a column of {where} "
                                   f"(columns: {list(row)}); set data.prompt_column")
            prompt, c, r = cell_text(prompt_value), cell_text(chosen), cell_text(rejected)
            if not c.strip() or not r.strip():
                return None
            return PreferencePair(id=rid, prompt=prompt, label=None, text=prompt, target=c, rejected=r)
        p_msgs = _as_messages(prompt_value, d.prompt_column, at)
        if p_msgs is None:
            text = cell_text(prompt_value)
            p_msgs = [{"role": "user", "content": text}] if text.strip() else []
        shared, c, r = split_conversations(p_msgs, c_msgs, r_msgs, at)
        last_user = next((m["content"] for m in reversed(shared) if m["role"] == "user"), "")
        return PreferencePair(id=rid, prompt=last_user, label=None, text=last_user, target=c[-1]["content"],
                              rejected=r[-1]["content"], messages=shared, chosen_messages=c, rejected_messages=r)

    def example_columns(self, examples: list[Example]) -> dict[str, list]:
        cols = {"prompt": [e.prompt for e in examples], "target": [e.target for e in examples],
                "rejected": [e.rejected for e in examples]}
        if any(getattr(e, "messages", None) for e in examples):  # Arrow lists of {role, content} structs
            cols.update(messages=[e.messages or [] for e in examples],
                        chosen_messages=[e.chosen_messages or [] for e in examples],
                        rejected_messages=[e.rejected_messages or [] for e in examples])
        return cols

    def encode(self, batch, tokenizer, prefix, end_id, d) -> dict:
        """Each pair -> chosen ``input_ids``/``labels`` and ``rejected_input_ids``/``rejected_labels``; a pair
        that cannot fit is left out (a batched ``datasets.map`` may return fewer rows), counted in
        ``finish_split``."""
        prompts, chosen, rejected = texts(batch, tokenizer)
        p_ids, c_ids, r_ids = (token_ids(tokenizer, x) for x in (prompts, chosen, rejected))
        out = {"input_ids": [], "labels": [], "rejected_input_ids": [], "rejected_labels": [], "truncated": [],
               "prompt_len": [], "target_len": []}
        for p, c, r in zip(p_ids, c_ids, r_ids):
            enc = encode_pair(p, c, r, prefix, end_id, d.max_length, d.truncation_side)
            if enc is None:
                continue
            (ci, cl), (ri, rl), cut = enc
            out["input_ids"].append(ci)
            out["labels"].append(cl)
            out["rejected_input_ids"].append(ri)
            out["rejected_labels"].append(rl)
            out["truncated"].append(cut)
            out["prompt_len"].append(len(ci) - len(c) - 1)
            out["target_len"].append(len(c) + 1)
        return out

    def finish_split(self, ds, stats, d):
        stats["pairs"] = stats["rows"]
        stats["dropped_too_long"] = stats["rows"] - len(ds)
        if stats["dropped_too_long"]:
            log.warning("%d preference pairs do not fit data.max_length=%d even with a one-token prompt (their "
                        "responses are never cut); dropped", stats["dropped_too_long"], d.max_length)
        return ds


def texts(batch: dict[str, list], tokenizer) -> tuple[list[str], list[str], list[str]]:
    """(prompt, chosen, rejected) texts of a batch; conversation pairs rendered by the tokenizer's chat template."""
    if not any(batch.get("messages") or []):
        return batch["prompt"], batch["target"], batch["rejected"]
    if not getattr(tokenizer, "chat_template", None):
        raise ClmtuneError("conversation pairs need a chat template and the tokenizer has none; set "
                           "data.chat_template (e.g. zh for Chinese character tokenizers, or chatml)")
    bos = getattr(tokenizer, "bos_token", None)

    def render(msgs, generation_prompt=False) -> str:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return text[len(bos):] if bos and text.startswith(bos) else text  # the encoder adds the BOS itself

    prompts, chosen, rejected = [], [], []
    for shared, c, r in zip(batch["messages"], batch["chosen_messages"], batch["rejected_messages"]):
        prompt = render(shared, True)
        full_c, full_r = render(shared + c), render(shared + r)
        # the prompt rendered alone is normally a prefix of prompt + answer; where a template renders it
        # differently, the answer starts where the texts diverge (TRL's common_prefix_length, on text)
        k = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r))
        prompts.append(prompt[:k])
        chosen.append(full_c[k:])
        rejected.append(full_r[k:])
    return prompts, chosen, rejected


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], prefix: list[int],
                end_id: int, max_length: int, truncation_side: str = "left",
                ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], bool] | None:
    """((chosen ids, labels), (rejected ids, labels), prompt was cut), or None when the longer response plus its
    end token and one prompt token (after the prefix) do not fit ``max_length``. Only the prompt is cut, the same
    way for both, so they keep sharing it."""
    c, r = list(chosen_ids) + [end_id], list(rejected_ids) + [end_id]
    prompt = list(prefix) + list(prompt_ids)
    room = max_length - max(len(c), len(r))
    if room < len(prefix) + 1:
        return None
    cut = len(prompt) > room
    if cut:
        prompt = cut_prompt(prompt, room, truncation_side, len(prefix))
    mask = [IGNORE_INDEX] * len(prompt)
    return (prompt + c, mask + c), (prompt + r, mask + r), cut
