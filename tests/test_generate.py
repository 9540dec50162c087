"""Generation: clean Chinese text, batching with left padding, sampling controls, stop strings, streaming, bad input."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from clmtune import cli
from clmtune.config import GenerateConfig, ModelConfig
from clmtune.errors import ClmtuneError
from clmtune.decoding import decode, encode_prompts, stop_token_ids
from clmtune.generate import generate, read_prompts_file, stream
from clmtune.models import bert_chinese_tokenizer, load_model, load_tokenizer
from clmtune.text import clean_text, edit_distance, nearest_label

ZH_PROMPTS = ["房间很干净", "我们去游泳池和健身房吧，然后吃饭", "好"]


def _tiny(name: str):
    cfg = ModelConfig(f"builtin:{name}")
    return load_model(cfg).eval(), load_tokenizer(cfg)


@pytest.fixture(scope="module")
def zh():
    return _tiny("tiny-gpt2-zh")


@pytest.fixture(scope="module")
def opt():
    return _tiny("tiny-opt")


def test_clean_text_joins_cjk_and_keeps_latin_spaces():
    assert clean_text("游 泳 池 和 健 身 房") == "游泳池和健身房"
    assert clean_text("我 喜 欢 New York 的 天 气 。") == "我喜欢 New York 的天气。"
    assert clean_text(" hello  world ") == "hello  world"
    assert clean_text("第 一 行\n第 二 行") == "第一行\n第二行"  # line breaks are kept


def test_edit_distance_and_nearest_label():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("complaint", "complaint") == 0
    assert nearest_label("no complain", ["complaint", "no complaint"]) == "no complaint"
    assert nearest_label("complaints", ["complaint", "no complaint"]) == "complaint"


def test_bert_decoding_has_no_special_tokens_or_cjk_spaces():
    tok = bert_chinese_tokenizer()
    ids = tok("游泳池和健身房").input_ids  # [CLS] ... [SEP] with add_special_tokens
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.decode(ids[1:-1]) == "游 泳 池 和 健 身 房"  # what the tutorial printed
    stops = stop_token_ids(tok)
    assert tok.sep_token_id in stops and tok.pad_token_id in stops
    row = ids + [tok.pad_token_id] * 3 + tok("后面", add_special_tokens=False).input_ids
    text = decode(tok, row, stops, [])
    assert text == "游泳池和健身房"
    # without a stop id in the way the special tokens are still never written
    assert decode(tok, row, [], []) == "游泳池和健身房后面"


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(zh):
    model, tok = zh
    s = GenerateConfig(max_new_tokens=8, temperature=0, batch_size=3)
    batched = [g.outputs for g in generate(model, tok, ZH_PROMPTS, s)]
    single = [generate(model, tok, [p], s)[0].outputs for p in ZH_PROMPTS]
    assert batched == single
    assert all(len(o) == 1 and o[0] for o in batched)
    assert not any(re.search(r"[\u4e00-\u9fff] [\u4e00-\u9fff]", o[0]) for o in batched)


def test_sampling_is_reproducible_with_a_seed(zh):
    model, tok = zh
    s = GenerateConfig(max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9, num_return_sequences=2, seed=7)
    a = [g.outputs for g in generate(model, tok, ZH_PROMPTS[:2], s)]
    b = [g.outputs for g in generate(model, tok, ZH_PROMPTS[:2], s)]
    c = [g.outputs for g in generate(model, tok, ZH_PROMPTS[:2], GenerateConfig(**{**s.__dict__, "seed": 8}))]
    assert a == b
    assert a != c
    assert all(len(o) == 2 for o in a)


def test_repetition_penalty_changes_greedy_output(opt):
    model, tok = opt
    plain = generate(model, tok, ["Hello, my name is"], GenerateConfig(max_new_tokens=12, temperature=0))
    # random tiny OPT repeats itself greedily ("341 341 341 ..."); a strong penalty must break that
    pen = generate(model, tok, ["Hello, my name is"],
                   GenerateConfig(max_new_tokens=12, temperature=0, repetition_penalty=5.0))
    words = plain[0].outputs[0].split()
    assert len(set(words)) < len(words)
    assert pen[0].outputs[0] != plain[0].outputs[0]


SAMPLED = dict(max_new_tokens=12, temperature=1.0, top_k=10, seed=3)  # varied text (greedy repeats one token)


def _stop_inside(text: str) -> str:
    """A 2-character piece that first occurs where at least 3 characters (spaces stripped) come before it."""
    return next(text[i:i + 2] for i in range(3, len(text) - 1)
                if text.find(text[i:i + 2]) == i and len(text[:i].rstrip()) >= 3)


def test_stop_string_cuts_and_stops(zh):
    model, tok = zh
    full = generate(model, tok, [ZH_PROMPTS[0]], GenerateConfig(**SAMPLED))[0].outputs[0]
    stop = _stop_inside(full)
    expected = full[:full.find(stop)].rstrip()
    got = generate(model, tok, [ZH_PROMPTS[0]], GenerateConfig(**SAMPLED, stop=["never-there", stop]))
    assert got[0].outputs[0] == expected and len(expected) >= 3


@pytest.mark.parametrize("stop", [[], ["__x__"], None])
def test_stream_writes_the_same_text_piece_by_piece(zh, stop):
    model, tok = zh
    full = generate(model, tok, [ZH_PROMPTS[1]], GenerateConfig(**SAMPLED))[0].outputs[0]
    if stop is None:  # a real stop string taken from the middle of the output
        stop = [_stop_inside(full)]
    settings = GenerateConfig(**SAMPLED, stop=stop)
    expected = generate(model, tok, [ZH_PROMPTS[1]], settings)[0].outputs[0]
    chunks: list[str] = []
    result = stream(model, tok, ZH_PROMPTS[1], settings, write=chunks.append)
    assert result.outputs[0] == expected
    assert "".join(chunks) == expected + "\n"
    assert len(chunks) >= 3  # text came out as it was generated, not at the end


def test_sampled_stream_matches_generate_with_the_same_seed(opt):
    model, tok = opt
    s = GenerateConfig(max_new_tokens=10, temperature=0.8, top_k=10, seed=3)
    chunks: list[str] = []
    got = stream(model, tok, "The weather today", s, write=chunks.append)
    assert got.outputs == generate(model, tok, ["The weather today"], s)[0].outputs
    assert "".join(chunks).rstrip("\n") == got.outputs[0]


def test_long_prompt_is_cut_on_the_left_or_rejected(zh, caplog):
    model, tok = zh
    prompt = "一二三四五六七八九十" * 5  # 50 characters -> 50 tokens
    s = GenerateConfig(max_new_tokens=500, temperature=0)  # context 512 -> 12 prompt tokens fit
    with caplog.at_level(logging.WARNING, logger="clmtune"):
        g = generate(model, tok, [prompt], s)[0]
    assert g.truncated and g.prompt_tokens == 12
    assert "prompt #1 has 50 tokens" in caplog.text
    ids, cut = encode_prompts(tok, [prompt], 12)
    assert ids[0] == tok(prompt[-12:], add_special_tokens=False).input_ids and cut == [True]  # the end is kept
    with pytest.raises(ClmtuneError, match=r"prompt #1 has 50 tokens but only 12 fit"):
        generate(model, tok, [prompt], GenerateConfig(max_new_tokens=500, truncate=False))
    with pytest.raises(ClmtuneError, match=r"max_new_tokens=512 leaves no room"):
        generate(model, tok, ["好"], GenerateConfig(max_new_tokens=512))


def test_prompts_file_reading(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("第一个\n\nsecond one\n", encoding="utf-8")
    assert read_prompts_file(txt) == ["第一个", "second one"]
    csv = tmp_path / "p.csv"
    csv.write_text("id,text\n1,你好\n2,\"a, b\"\n", encoding="utf-8")
    assert read_prompts_file(csv, "text") == ["你好", "a, b"]
    with pytest.raises(ClmtuneError, match="--column 'body' is not a column"):
        read_prompts_file(csv, "body")
    with pytest.raises(ClmtuneError, match="name the prompt column with --column"):
        read_prompts_file(csv)
    csv.write_text("id,text\n1,你好\n2,\n", encoding="utf-8")
    with pytest.raises(ClmtuneError, match=r"row 3: column 'text' is empty"):
        read_prompts_file(csv, "text")


def test_cli_prompts_file_to_jsonl(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(ZH_PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    rc = cli.main(["generate", "--model", "builtin:tiny-gpt2-zh", "--prompts-file", str(prompts), "--output",
                   str(out), "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ZH_PROMPTS
    assert all(len(r["outputs"]) == 1 and "[" not in r["outputs"][0] for r in rows)
    assert "wrote 3 prompts" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["  "], "prompt #1 is empty"),
    (["hi", "--top-p", "1.5"], "--top-p: generate.top_p=1.5 must be in (0, 1]"),
    (["hi", "--top-p", "0"], "--top-p: generate.top_p=0.0 must be in (0, 1]"),
    (["hi", "--temperature", "-0.5"], "--temperature: generate.temperature=-0.5 must be >= 0"),
    (["hi", "--temperature", "0", "--num-return-sequences", "2"], "needs sampling"),
    (["a", "b", "--stream"], "--stream prints one prompt"),
    (["hi", "--device", "gpu"], "--device: generate.device='gpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
    ([], "no prompt given"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, capsys):
    rc = cli.main(["generate", "--model", "builtin:tiny-opt", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and err[-1].startswith("clmtune: error:")
