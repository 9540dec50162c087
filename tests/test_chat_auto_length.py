"""``data.max_length: auto`` on chat data measures what is trained: each conversation rendered by the chat
template (issue 26 item 5). Measuring the conversation's JSON text chose 112 tokens for these five conversations
with the OPT tokenizer and the ChatML template, while the longest one renders to 139: its oldest turn was left out
of training without a word."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "6"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "Of Italy?"},
     {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "Of Spain?"},
     {"role": "assistant", "content": "Madrid"}],
    [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}],
]


def _cfg(tmp_path: Path):
    from clmtune.config import load_config

    src = tmp_path / "five.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return load_config(REPO / "configs" / "chat_zh.yaml", {
        "data": {"source": str(src), "chat_template": "chatml", "max_length": None, "eval_fraction": 0.0},
        "model": {"name_or_path": "builtin:tiny-opt"},
        "train": {"output_dir": str(tmp_path / "run")}}).validate()


def test_auto_max_length_keeps_every_turn_of_a_chat_run(tmp_path):
    from clmtune.data import prepare_data
    from clmtune.defaults import resolve_run
    from clmtune.models import load_tokenizer
    from clmtune.tasks import get_task
    from clmtune.tasks.chat_encoding import tokens_and_mask

    resolved = resolve_run(_cfg(tmp_path), announce=False)
    cfg = resolved.cfg
    tokenizer = load_tokenizer(cfg.model)
    get_task("chat").prepare_tokenizer(tokenizer, cfg.data)
    rendered = [len(tokens_and_mask(tokenizer, c)[0]) for c in CONVERSATIONS]
    assert max(rendered) == 139
    assert cfg.data.max_length == 144  # the longest rendering rounded up to a multiple of 8
    assert resolved.auto["data.max_length"]["longest_tokens"] == 139
    prep = prepare_data(tokenizer, cfg.data, task=resolved.examples)
    stats = prep.report["splits"]["train"]
    assert (stats["conversations"], stats["turns"]) == (5, 8)
    assert (stats["truncated"], stats["turns_dropped"], stats["dropped_too_long"]) == (0, 0, 0)
    assert sorted(len(x) for x in prep.train["input_ids"]) == sorted(rendered)


def test_the_examples_read_to_resolve_auto_are_the_ones_tokenized(tmp_path):
    """Resolved once: the chat examples read for ``auto`` are typed conversations, handed on, not re-read."""
    from clmtune.defaults import resolve_run
    from clmtune.tasks.examples import Conversation, Message

    resolved = resolve_run(_cfg(tmp_path), announce=False)
    first = resolved.examples.train[0]
    assert isinstance(first.conversation, Conversation) and first.target is None
    assert {c.conversation.as_dicts()[-1]["content"] for c in resolved.examples.train} == {
        c[-1]["content"] for c in CONVERSATIONS}
    assert Message("user", "x").as_dict() == {"role": "user", "content": "x"}
