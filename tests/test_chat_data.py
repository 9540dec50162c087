"""Conversation data: the three formats load to the same conversations; every bad input gives one clear line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clmtune.data.conversations import conversation_files, load_conversations
from clmtune.tasks.conversations import detect_format, to_conversations
from clmtune.errors import ClmtuneError

EXPECTED = [
    [{"role": "system", "content": "你是客服"},
     {"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"},
     {"role": "user", "content": "几点了\n下午"}, {"role": "assistant", "content": "三点"}],
    [{"role": "user", "content": "再见"}, {"role": "assistant", "content": "再见！"}],
]
ALPACA = [
    {"instruction": "几点了", "input": "下午", "output": "三点", "system": "你是客服", "history": [["你好", "您好！"]]},
    {"instruction": "再见", "input": "", "output": "再见！"},  # optional keys may be missing
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "你是客服"}, {"from": "human", "value": "你好"},
                       {"from": "gpt", "value": "您好！"}, {"from": "human", "value": "几点了\n下午"},
                       {"from": "gpt", "value": "三点"}]},
    {"conversations": [{"from": "human", "value": "再见"}, {"from": "gpt", "value": "再见！"}]},
]
OPENAI = [{"messages": conv} for conv in EXPECTED]


def _write(path, records):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("records,fmt", [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (OPENAI, "openai")])
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_every_format_and_file_type_loads_the_same_conversations(tmp_path, records, fmt, suffix):
    path = _write(tmp_path / f"data{suffix}", records)
    got = load_conversations(path)
    assert got.format == fmt
    assert got.conversations == EXPECTED
    assert got.rows == 2 and got.dropped == {"final_user_message": 0}
    assert load_conversations(path, fmt=fmt).conversations == EXPECTED  # forced format, same result


def test_mapped_column_names(tmp_path):
    renamed = [{"prompt": r["instruction"], "query": r["input"], "answer": r["output"],
                **({"sys": r["system"], "turns": r["history"]} if "system" in r else {})} for r in ALPACA]
    path = _write(tmp_path / "renamed.jsonl", renamed)
    with pytest.raises(ClmtuneError, match="cannot tell the conversation format"):
        load_conversations(path)
    columns = {"instruction": "prompt", "input": "query", "output": "answer", "system": "sys", "history": "turns"}
    assert load_conversations(path, columns=columns).conversations == EXPECTED
    # role/content keys inside messages
    chats = [{"dialog": [{"speaker": m["role"], "text": m["content"]} for m in conv]} for conv in EXPECTED]
    got = to_conversations(chats, columns={"messages": "dialog", "role": "speaker", "content": "text"})
    assert got.format == "openai" and got.conversations == EXPECTED


def test_final_unanswered_user_message_is_dropped_and_counted():
    rows = [{"messages": EXPECTED[1] + [{"role": "user", "content": "还在吗"}]}, {"messages": EXPECTED[0]}]
    got = to_conversations(rows)
    assert got.conversations == [EXPECTED[1], EXPECTED[0]]
    assert got.dropped == {"final_user_message": 1}


def _error(rows, fmt=None) -> str:
    with pytest.raises(ClmtuneError) as info:
        to_conversations(rows, fmt=fmt, where="chats.jsonl")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_bad_conversations_each_give_one_line_naming_rows_and_fix():
    good = {"messages": EXPECTED[1]}
    msg = _error([good, {"messages": [{"role": "user", "content": "a"}]}])
    assert msg == ("chats.jsonl (openai): row 2: no assistant turn (give every conversation at least one assistant "
                   "reply (nothing is learned without one))")
    msg = _error([good, {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
                                      {"role": "assistant", "content": "c"}]}, good,
                  {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}]}])
    assert msg.startswith("chats.jsonl (openai): rows 2, 4: roles out of order (start with an optional system "
                          "message, then alternate user and assistant")
    msg = _error([{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "f()"},
                                     {"from": "gpt", "value": "b"}]}])
    assert msg.startswith("chats.jsonl (sharegpt): row 1: unknown role (use the roles system, user, assistant")
    msg = _error([good, good, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}])
    assert msg == ("chats.jsonl (openai): row 3: empty message (give every message some text, or remove the empty "
                   "message)")
    msg = _error([{"instruction": "a", "output": ""}])
    assert msg.startswith("chats.jsonl (alpaca): row 1: empty message")
    # several problems in one file: all of them in the one line
    msg = _error([{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "bot", "content": "a"}]}])
    assert "row 1: no assistant turn" in msg and "row 2: unknown role" in msg


def test_many_bad_rows_are_summarised():
    rows = [{"messages": [{"role": "user", "content": "a"}]}] * 8
    assert "rows 1, 2, 3, 4, 5 and 3 more: no assistant turn" in _error(rows)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(OPENAI[0], ensure_ascii=False) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(ClmtuneError, match=r"chats.jsonl \(openai\): row 3: no assistant turn"):
        load_conversations(path)
    path.write_text("{not json}\n", encoding="utf-8")
    with pytest.raises(ClmtuneError, match="line 1 is not valid JSON"):
        load_conversations(path)
    with pytest.raises(ClmtuneError, match="data.format='chatgpt' is not a conversation format"):
        to_conversations(OPENAI, fmt="chatgpt")
    with pytest.raises(ClmtuneError, match="row 1 has no column 'messages'"):
        to_conversations(ALPACA, fmt="openai")


def test_detect_format():
    assert detect_format(ALPACA) == "alpaca"
    assert detect_format(SHAREGPT) == "sharegpt"
    assert detect_format(OPENAI) == "openai"


def test_shipped_chatterbot_zh():
    files = conversation_files("builtin:chat/chatterbot-zh")
    assert list(files) == ["train"]
    data = load_conversations(files["train"])
    assert data.format == "openai"
    assert len(data.conversations) == 467 and data.turns() == 1012  # 1,019 in the corpus minus 7 unanswered
    assert data.conversations[0] == [{"role": "user", "content": "什么是ai"},
                                      {"role": "assistant", "content": "人工智能是工程和科学的分支,致力于构建具有思维的机器。"}]
    assert max(len(c) for c in data.conversations) == 26
    card = (files["train"].parent / "DATA_CARD.md").read_text(encoding="utf-8")
    stats = json.loads((files["train"].parent / "stats.json").read_text(encoding="utf-8"))
    assert stats["conversations"] == 467 and stats["turns"] == 1012 and len(stats["topics"]) == 17
    assert "467 conversations, 1,012 turns" in card
    assert "BSD 3-Clause" in (files["train"].parent / "NOTICE.md").read_text(encoding="utf-8")


def _prepare(capsys, *argv):
    from clmtune.cli import main

    code = main(["prepare", "--config", str(REPO_CONFIG), *argv])
    out, err = capsys.readouterr()
    return code, out, err


REPO_CONFIG = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "chat_zh.yaml"


@pytest.mark.parametrize("rows,args,needle", [
    ([{"messages": [{"role": "user", "content": "a"}]}], [], "row 5: no assistant turn"),
    ([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}], [],
     "row 5: roles out of order"),
    ([{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}], [],
     "row 5: unknown role"),
    ([{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}], [],
     "row 5: empty message"),
    ([], ["--data.chat_template", "null", "--model.name_or_path", "builtin:tiny-opt"],
     "has no chat template and data.chat_template is not set; set data.chat_template to one of chatml"),
    ([], ["--data.format", "chatgpt", "--data.train_on", "first"], "2 problems"),
    ([], ["--data.columns", "{prompt: x}"], "data.columns has unknown field(s) ['prompt']"),
])
def test_cli_bad_chat_input_is_one_line_exit_2(tmp_path, capsys, rows, args, needle):
    path = _write(tmp_path / "chats.jsonl", OPENAI * 2 + rows + OPENAI * 2)  # a bad row is row 5
    code, out, err = _prepare(capsys, "--data.source", str(path), *args)
    assert code == 2, err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("clmtune: error")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in err


def test_cli_prepare_reports_chat_statistics(tmp_path, capsys):
    code, out, err = _prepare(capsys, "--data.max_length", "48")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("train: 373 conversations"))
    assert "tokens per turn p50/p95/max" in line and "dropped (too long even with only their last turn)" in line
