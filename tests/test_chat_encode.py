"""Chat encoding: exact token ids and loss masks written out by hand, templates, truncation by whole turns."""

from __future__ import annotations

import pytest

from clmtune.chat_templates import (BUILTIN_TEMPLATES, builtin_template, has_generation_blocks, install_chat_template,
                                    resolve_chat_template)
from clmtune.config import ModelConfig
from clmtune.tasks.chat_encoding import encode_conversation, encode_conversations, tokens_and_mask
from clmtune.errors import ClmtuneError
from clmtune.models import opt_bpe_tokenizer, load_tokenizer

X = -100
ZH_CHAT = [{"role": "system", "content": "你是客服"},
           {"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"},
           {"role": "user", "content": "几点了"}, {"role": "assistant", "content": "三点"}]
EN_CHAT = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]


@pytest.fixture(scope="module")
def zh_small_chat_tok():
    """builtin:gpt2-zh-small's tokenizer (BERT characters cut to 7,996 entries) with the built-in ``zh`` template."""
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:gpt2-zh-small"))  # BERT characters, 7,996 entries
    assert install_chat_template(tok, "zh") == "zh"
    return tok


@pytest.fixture(scope="module")
def bpe_tok():
    tok = opt_bpe_tokenizer()  # the shipped OPT/GPT-2 BPE files
    install_chat_template(tok, "chatml")
    return tok


def test_zh_template_bert_characters_exact(zh_small_chat_tok):
    # 你是客服\n用户：你好\n助手：您好！[SEP]\n用户：几点了\n助手：三点[SEP]\n  (BERT drops the newlines)
    # 你 346 是 2046 客 1260 服 2103 用 2880 户 1724 ： 4979 好 1126 助 592 手 1731 您 1627 ！ 4958 [SEP] 3
    # 几 522 点 2669 了 240 三 175  (vocab.txt order: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3)
    system = [346, 2046, 1260, 2103]
    user1 = [2880, 1724, 4979, 346, 1126, 592, 1731, 4979]  # 用户：你好 助手：
    reply1 = [1627, 1126, 4958, 3]  # 您好！[SEP]
    user2 = [2880, 1724, 4979, 522, 2669, 240, 592, 1731, 4979]  # 用户：几点了 助手：
    reply2 = [175, 2669, 3]  # 三点[SEP]
    enc = encode_conversation(zh_small_chat_tok, ZH_CHAT)
    assert enc.input_ids == system + user1 + reply1 + user2 + reply2
    assert enc.labels == [X] * 12 + reply1 + [X] * 9 + reply2
    assert zh_small_chat_tok.convert_ids_to_tokens(reply1) == ["您", "好", "！", "[SEP]"]
    last = encode_conversation(zh_small_chat_tok, ZH_CHAT, train_on="last")
    assert last.input_ids == enc.input_ids
    assert last.labels == [X] * 25 + reply2


def test_chatml_gpt2_bpe_exact(bpe_tok):
    start = [41552, 15483, 757, 1215, 13124, 15483, 15698]  # < | im _ start | >
    end = [41552, 15483, 757, 1215, 1397, 15483, 15698]     # < | im _ end | >
    nl, system, user, assistant = 50118, [19675], [12105], [2401, 33388]  # Ċ, system, user, ass istant
    # "Be brief.<|im_end|>": BPE merges '.' and '<' into one token '.<' (49069); so does "Bye.<|im_end|>".
    ids = (start + system + [nl, 9325, 4315, 49069] + end[1:] + [nl]                # Be brief.<|im_end|>
           + start + user + [nl, 30086] + end + [nl]                                  # Hi
           + start + assistant + [nl] + [31414, 328] + end + [nl]                     # Hello!<|im_end|>
           + start + user + [nl, 2765, 242] + end + [nl]                              # Bye
           + start + assistant + [nl] + [2765, 242, 49069] + end[1:] + [nl])          # Bye.<|im_end|>
    n_first = len(start + system) + 4 + 6 + 1 + len(start + user) + 2 + 7 + 1 + len(start + assistant) + 1
    reply1 = [31414, 328] + end
    n_second = 1 + len(start + user) + 3 + 7 + 1 + len(start + assistant) + 1
    reply2 = [2765, 242, 49069] + end[1:]
    labels = [X] * n_first + reply1 + [X] * n_second + reply2 + [X]
    enc = encode_conversation(bpe_tok, EN_CHAT)
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert bpe_tok.decode(reply1) == "Hello!<|im_end|>"


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("which", ["zh", "bpe"])
def test_mask_equals_transformers_assistant_mask(name, which):
    if which == "zh":
        tok, chat = load_tokenizer(ModelConfig(name_or_path="builtin:gpt2-zh-small")), ZH_CHAT
    else:
        tok, chat = opt_bpe_tokenizer(), EN_CHAT
    install_chat_template(tok, name)
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = tokens_and_mask(tok, chat)
    assert ids == out["input_ids"] and mask == out["assistant_masks"] and sum(mask) > 0
    enc = encode_conversation(tok, chat)
    assert enc.labels == [i if m else X for i, m in zip(out["input_ids"], out["assistant_masks"])]


def test_template_without_generation_blocks_masks_by_prefix(zh_small_chat_tok):
    """A model's own template rarely has {% generation %}: the spans come from prefix renderings instead."""
    plain = BUILTIN_TEMPLATES["zh"].replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    assert not has_generation_blocks(plain)
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:gpt2-zh-small"))
    tok.chat_template = plain
    assert resolve_chat_template(tok) == (plain, "tokenizer")  # the tokenizer's own template is used
    assert encode_conversation(tok, ZH_CHAT).labels == encode_conversation(zh_small_chat_tok, ZH_CHAT).labels


def test_no_template_is_one_clear_error():
    tok = opt_bpe_tokenizer()
    assert tok.chat_template is None
    with pytest.raises(ClmtuneError, match="has no chat template and data.chat_template is not set; set "
                                           "data.chat_template to one of chatml, alpaca, zh"):
        install_chat_template(tok)
    with pytest.raises(ClmtuneError, match="data.chat_template='vicuna' is neither a built-in template"):
        install_chat_template(tok, "vicuna")


def test_bos_is_put_in_front_when_the_tokenizer_adds_one():
    import json

    from transformers import GPT2Tokenizer

    from clmtune.data.sources import assets_path

    folder = assets_path("vocab/opt-bpe")  # OPT's own tokenizer puts </s> in front of every text
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    tok = GPT2Tokenizer(vocab=json.loads((folder / "vocab.json").read_text(encoding="utf-8")), merges=merges,
                        bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    assert builtin_template("zh", tok).startswith("{{- bos_token }}")
    assert not builtin_template("zh", opt_bpe_tokenizer()).startswith("{{- bos_token }}")
    install_chat_template(tok, "chatml")
    ids, mask = tokens_and_mask(tok, EN_CHAT)
    assert ids[:2] == [2, 41552] and ids.count(2) == 1 and mask[0] == 0


def _pairs(n):
    chat = [{"role": "system", "content": "你是客服"}]
    for i in range(n):
        chat += [{"role": "user", "content": f"问题{i}好"}, {"role": "assistant", "content": f"回答{i}好"}]
    return chat


def test_truncation_drops_oldest_whole_turns_keeps_system_and_last_reply(zh_small_chat_tok):
    # system 4 tokens; each pair: 用户：问题N好 助手： (10) + 回答N好[SEP] (5) = 15 tokens
    full = encode_conversation(zh_small_chat_tok, _pairs(3))
    assert len(full.input_ids) == 4 + 3 * 15 and full.turns_dropped == 0
    cut = encode_conversation(zh_small_chat_tok, _pairs(3), max_length=4 + 2 * 15)
    assert cut.turns_dropped == 1
    kept = [_pairs(3)[0]] + _pairs(3)[3:]
    assert cut.input_ids == encode_conversation(zh_small_chat_tok, kept).input_ids  # system + pairs 1 and 2, whole
    assert zh_small_chat_tok.decode(cut.input_ids[:4]).replace(" ", "") == "你是客服"
    assert cut.labels[-5:] == cut.input_ids[-5:] and cut.labels[4:14] == [X] * 10
    assert encode_conversation(zh_small_chat_tok, _pairs(3), max_length=4 + 15).turns_dropped == 2
    assert encode_conversation(zh_small_chat_tok, _pairs(3), max_length=4 + 14) is None  # even the last pair does not fit


def test_encode_conversations_counts_everything(zh_small_chat_tok):
    convs = [_pairs(1), _pairs(3), _pairs(2), ZH_CHAT]
    feats, stats = encode_conversations(zh_small_chat_tok, convs, max_length=4 + 2 * 15)
    assert len(feats) == 4
    d = stats.as_dict()
    assert d["conversations"] == 4 and d["encoded"] == 4 and d["truncated"] == 1 and d["turns_dropped"] == 1
    assert d["assistant_turns"] == 1 + 2 + 2 + 2
    assert d["tokens"] == 19 + 34 + 34 + 28
    assert d["supervised_tokens"] == 5 + 10 + 10 + 7
    assert d["tokens_per_turn"] == {"mean": 16.8, "p50": 17, "p95": 19, "max": 19}  # 19, 17, 17, 14 per pair
    # 18 tokens: system + last pair is 19 for the _pairs conversations (dropped), 16 for ZH_CHAT (its last pair)
    feats, stats = encode_conversations(zh_small_chat_tok, convs, max_length=18)
    assert stats.dropped_too_long == 3 and stats.encoded == 1 and stats.truncated == 1
    assert feats == [{"input_ids": encode_conversation(zh_small_chat_tok, ZH_CHAT[:1] + ZH_CHAT[3:]).input_ids,
                      "labels": encode_conversation(zh_small_chat_tok, ZH_CHAT[:1] + ZH_CHAT[3:]).labels}]
    with pytest.raises(ClmtuneError, match="data.train_on='first'"):
        encode_conversation(zh_small_chat_tok, ZH_CHAT, train_on="first")
