"""The chat session behind `clmtune chat`: prompts rendered with the saved template, history within the context,
streamed text equal to the returned reply, and the REPL commands."""

from __future__ import annotations

import pytest

from clmtune.chat import ChatSession, repl
from clmtune.chat_templates import install_chat_template, reply_stops
from clmtune.config import GenerateConfig, ModelConfig
from clmtune.errors import ClmtuneError
from clmtune.models import opt_bpe_tokenizer, load_model, load_tokenizer


@pytest.fixture(scope="module")
def zh_model():
    cfg = ModelConfig(name_or_path="builtin:tiny-gpt2-zh")  # random weights: replies are noise, but deterministic
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    install_chat_template(tok, "zh")
    return model, tok


def _session(zh_model, **kw):
    model, tok = zh_model
    return ChatSession(model, tok, GenerateConfig(max_new_tokens=6, temperature=0), **kw)


def test_prompt_is_the_template_with_generation_prompt(zh_model):
    s = _session(zh_model, system="你是客服")
    s.history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]
    ids = s.prompt_ids("几点了")
    text = s.tokenizer.decode(ids).replace(" ", "")
    assert text == "你是客服用户：你好助手：您好[SEP]用户：几点了助手："
    assert s.left_out == 0


def test_streamed_text_equals_reply_and_history_grows(zh_model):
    s = _session(zh_model)
    pieces = []
    reply = s.send("你好", write=pieces.append)
    assert "".join(pieces) == reply + "\n" and reply
    assert s.history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": reply}]
    second = s.send("你好")  # the history is part of the prompt now
    assert len(s.history) == 4
    s.reset()
    assert s.send("你好") == reply  # greedy, same prompt after /reset: the same reply


def test_history_is_kept_within_the_context(zh_model):
    s = _session(zh_model, system="你是客服")
    for i in range(3):
        s.history += [{"role": "user", "content": f"问题{i}"}, {"role": "assistant", "content": f"回答{i}"}]
    full = len(s.prompt_ids("再见"))
    s.room = full - 1  # one token short: the oldest pair goes, the system prompt stays
    ids = s.prompt_ids("再见")
    assert s.left_out == 1
    assert s.tokenizer.decode(ids).replace(" ", "").startswith("你是客服用户：问题1")
    s.room = 8
    with pytest.raises(ClmtuneError, match="only 8 fit"):
        s.prompt_ids("再见")


def test_repl_commands(zh_model):
    s = _session(zh_model)
    typed = iter(["你好", "/system 你是客服", "/history", "/reset", "/history", "/nope", "", "/exit", "never read"])
    out = []
    n = repl(s, read=lambda prompt: next(typed), write=out.append)
    text = "".join(out)
    assert n == 1
    assert "(system prompt: 你是客服)" in text
    assert "system: 你是客服\nuser: 你好\nassistant: " in text and "(1 turn kept)" in text
    assert "(history cleared)" in text and "(0 turns kept)" in text
    assert "(unknown command /nope;" in text
    assert s.history == [] and s.system == "你是客服"


def test_no_template_and_chatml_stops():
    tok = opt_bpe_tokenizer()
    with pytest.raises(ClmtuneError, match="has no chat template"):
        ChatSession(None, tok)
    install_chat_template(tok, "chatml")
    assert reply_stops(tok) == ([], ["<|im_end|>"])  # not a token of the GPT-2 vocabulary: stop on the text
