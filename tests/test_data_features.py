"""Issue 3, tokenizing: the three task shapes (classify / sft / lm), four tokenizer families (BERT characters,
GPT-2 byte-level BPE, LLaMA-style sentencepiece, BLOOM-style), the leading-space pitfall, and saved splits."""

from __future__ import annotations

import json

import pytest
import torch

from clmtune.config import DataConfig
from clmtune.data import (IGNORE_INDEX, ClassificationEncoder, Example, TaskData, collate, load_task, prepare_data,
                          save_prepared)
from clmtune.data.features import build_sft_example, context_check
from clmtune.errors import ClmtuneError
from clmtune.models import opt_bpe_tokenizer, bert_chinese_tokenizer, ensure_pad_token

TWEETS = "Tweet text : {Tweet text} label : "


@pytest.fixture(scope="module")
def opt_tok():
    return opt_bpe_tokenizer()


@pytest.fixture(scope="module")
def bert_zh_tok():
    """The whole BERT Chinese character tokenizer (21,128 entries), as Chinese GPT-2 models ship it."""
    return bert_chinese_tokenizer()


@pytest.fixture(scope="module")
def gpt2_tok():
    """GPT-2 byte-level BPE (the real OPT/GPT-2 vocabulary) as GPT-2 ships it: no pad token of its own."""
    from transformers import GPT2Tokenizer

    tok = opt_bpe_tokenizer()
    tok = GPT2Tokenizer(vocab=tok.get_vocab(), merges=[tuple(m.split()) for m in _merges()], bos_token="</s>",
                        eos_token="</s>", unk_token="<unk>")
    assert tok.pad_token_id is None
    ensure_pad_token(tok)
    return tok


def _merges():
    from clmtune.data import assets_path

    return [x for x in assets_path("vocab/opt-bpe/merges.txt").read_text(encoding="utf-8").splitlines()
            if x and not x.startswith("#version")]


def _corpus() -> list[str]:
    from clmtune.data import assets_path, read_table

    return [r["Tweet text"] for r in read_table(assets_path("raft/twitter_complaints/test_unlabeled.csv"))[:1500]]


@pytest.fixture(scope="module")
def llama_tok():
    """LLaMA-style: sentencepiece-like BPE ('▁' for spaces, byte fallback), <s> added in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ensure_pad_token(tok)  # LLaMA has no pad token either
    return tok


@pytest.fixture(scope="module")
def bloom_tok():
    """BLOOM-style: byte-level BPE with <unk>=0, <s>=1, </s>=2, <pad>=3, padding on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>",
                                                                                         "<pad>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>")
    ensure_pad_token(tok)
    return tok


def _target_part(feature) -> list[int]:
    return [t for t in feature["labels"] if t != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------------------------
# Task shapes


def test_classify_multiclass_labels_of_several_tokens(opt_tok):
    cfg = DataConfig(source="builtin:raft/banking_77", template="Query : {Query} label : ", max_length=64)
    prep = prepare_data(opt_tok, cfg)
    task = load_task(cfg)
    assert len(prep.labels) == 77 and prep.test is None  # RAFT test rows have no labels: nothing to learn
    multi = 0
    for ex, feat in zip(task.train, prep.train):
        label_ids = opt_tok(ex.label, add_special_tokens=False).input_ids
        assert _target_part(feat) == label_ids + [opt_tok.eos_token_id]
        assert feat["input_ids"][-len(label_ids) - 1:] == label_ids + [opt_tok.eos_token_id]
        multi += len(label_ids) >= 3
    assert multi >= 10
    assert prep.report["splits"]["train"]["target_tokens"]["max"] >= 6


@pytest.mark.slow
def test_end_token_pad_or_eos(bert_zh_tok):
    for end, want in (("eos", "[SEP]"), ("pad", "[PAD]")):
        cfg = DataConfig(source="builtin:chnsenticorp/ChnSentiCorp_htl_all.csv", template="{review}评价：",
                         label_column="label", labels=["差评", "好评"], end_token=end, max_length=48)
        prep = prepare_data(bert_zh_tok, cfg)
        end_id = bert_zh_tok.convert_tokens_to_ids(want)
        assert prep.end_id == end_id and prep.report["end_token"]["token"] == want
        feat = prep.train[0]
        assert feat["input_ids"][-1] == end_id and feat["labels"][-1] == end_id  # the end token is learned
        assert bert_zh_tok.convert_ids_to_tokens(feat["input_ids"][-3:-1]) in (["好", "评"], ["差", "评"])
        assert len(feat["input_ids"]) <= 48
    assert prep.report["splits"]["train"]["truncated"] > 0  # max_length 48 cuts long reviews, and says so


def test_sft_loss_on_the_response_only(tmp_path, bert_zh_tok):
    rows = [{"instruction": "把这句话翻译成英文：你好", "output": "Hello"},
            {"instruction": "酒店怎么样？", "output": "房间干净，早餐丰富。"},
            {"instruction": "", "output": "没有问题的回答"},
            {"instruction": "只有问题", "output": ""}]
    f = tmp_path / "sft.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(f), task="sft", template="问：{instruction} 答：", response_template="{output}",
                     eval_fraction=0, max_length=64)
    prep = prepare_data(bert_zh_tok, cfg)
    assert len(prep.train) == 2 and prep.report["data"]["dropped_empty"]["train"] == 2
    feat = prep.train[1]
    prompt = bert_zh_tok("问：酒店怎么样？ 答：", add_special_tokens=False).input_ids
    response = bert_zh_tok("房间干净，早餐丰富。", add_special_tokens=False).input_ids
    assert feat["input_ids"] == prompt + response + [bert_zh_tok.sep_token_id]
    assert feat["labels"] == [IGNORE_INDEX] * len(prompt) + response + [bert_zh_tok.sep_token_id]


def test_sft_truncation_keeps_half_the_prompt_then_cuts_the_response():
    prompt, response = list(range(100, 130)), list(range(200, 230))  # 30 + 30 (+ end) tokens into 20
    ids, labels, cut = build_sft_example(prompt, response, 2, 20, "left")
    assert cut and ids == list(range(120, 130)) + list(range(200, 210))
    assert labels == [IGNORE_INDEX] * 10 + list(range(200, 210))
    ids, labels, cut = build_sft_example([1] + prompt, response[:5], 2, 20, "left", keep_prefix=1)
    assert cut and ids == [1] + list(range(117, 130)) + response[:5] + [2]  # BOS kept, end token kept


def test_lm_packing_exact_blocks_and_labels(tmp_path, bert_zh_tok):
    texts = ["房间很大", "早餐一般般", "", "服务员态度很好，下次还来"]
    f = tmp_path / "lm.csv"
    f.write_text("id,text\n" + "\n".join(f"{i},{t}" for i, t in enumerate(texts)) + "\n", encoding="utf-8")
    cfg = DataConfig(source=str(f), task="lm", eval_fraction=0, block_size=8)
    prep = prepare_data(bert_zh_tok, cfg)
    sep = bert_zh_tok.sep_token_id
    stream = [i for t in texts if t for i in bert_zh_tok(t, add_special_tokens=False).input_ids + [sep]]
    assert len(stream) == 24
    assert [f["input_ids"] for f in prep.train] == [stream[0:8], stream[8:16], stream[16:24]]
    assert all(f["labels"] == f["input_ids"] for f in prep.train)  # loss on every real token
    assert bert_zh_tok.cls_token_id not in stream and prep.report["prefix_tokens"] == []  # no [CLS] anywhere
    assert prep.report["data"]["dropped_empty"]["train"] == 1
    # a remainder becomes a last, shorter block; collate pads it on the left with [PAD] and -100
    cfg.block_size = 10
    prep = prepare_data(bert_zh_tok, cfg)
    assert [len(f["input_ids"]) for f in prep.train] == [10, 10, 4]
    batch = collate(list(prep.train), prep.pad_id)
    assert batch["input_ids"][2].tolist() == [bert_zh_tok.pad_token_id] * 6 + stream[20:]
    # the row's first real token is not a target: only a pad position stands before it
    assert batch["labels"][2].tolist() == [IGNORE_INDEX] * 7 + stream[21:]


@pytest.mark.slow
def test_lm_labels_give_the_models_own_loss(tmp_path, bert_zh_tok):
    """The training loss on a left-padded batch of packed blocks equals transformers' own loss for these labels."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from clmtune.data import assets_path
    from clmtune.models import forward_inputs
    from clmtune.train import causal_lm_loss

    cfg = DataConfig(source=str(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv")), task="lm",
                     text_column="review", block_size=32, eval_fraction=0)
    prep = prepare_data(bert_zh_tok, cfg)
    feats = [prep.train[i] for i in range(3)] + [prep.train[len(prep.train) - 1]]  # last block is shorter
    assert len(feats[-1]["input_ids"]) < 32
    batch = collate(feats, prep.pad_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(bert_zh_tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with torch.no_grad():
        inputs = forward_inputs(model, batch)
        out = model(**inputs, labels=batch["labels"])
        ours = causal_lm_loss(out.logits, batch["labels"])
    assert torch.allclose(out.loss, ours, atol=1e-6)
    n_real = int(batch["attention_mask"].sum())
    # every real token but each row's first (nothing before it to predict it from) is a target
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == n_real - len(feats)


def test_lm_without_packing_one_text_per_row_truncation_counted(tmp_path, bert_zh_tok):
    f = tmp_path / "lm.csv"
    f.write_text("text\n房间很大\n服务员态度很好，下次还来\n", encoding="utf-8")
    prep = prepare_data(bert_zh_tok, DataConfig(source=str(f), task="lm", eval_fraction=0, packing=False, max_length=8))
    sep = bert_zh_tok.sep_token_id
    assert [x["input_ids"] for x in prep.train] == [
        bert_zh_tok("房间很大", add_special_tokens=False).input_ids + [sep],
        bert_zh_tok("服务员态度很好，下次还来", add_special_tokens=False).input_ids[:8]]
    assert prep.report["splits"]["train"]["truncated"] == 1


def test_block_size_larger_than_the_context_is_an_error():
    with pytest.raises(ClmtuneError) as exc:
        context_check(DataConfig(task="lm", block_size=1024), 512)
    assert "data.block_size=1024" in str(exc.value) and "at most 512" in str(exc.value)
    with pytest.raises(ClmtuneError) as exc:
        context_check(DataConfig(max_length=600), 512)
    assert "data.max_length=600" in str(exc.value)
    context_check(DataConfig(task="lm", block_size=512), 512)
    context_check(DataConfig(max_length=10_000), None)  # no position table (ALiBi): no limit


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer families and the leading-space pitfall


def _classify_cfg(**kw) -> DataConfig:
    return DataConfig(template=TWEETS, max_length=64, **kw)


@pytest.mark.parametrize("name", ["opt_tok", "gpt2_tok", "llama_tok", "bloom_tok", "bert_zh_tok"])
def test_target_tokens_identical_in_training_and_evaluation(name, request):
    """'label : ' + 'complaint': the target's ids in the training features are exactly what evaluation scores
    (ClassificationEncoder.label_ids) after exactly the prompt ids evaluation feeds (encode_prompts)."""
    tok = request.getfixturevalue(name)
    cfg = _classify_cfg()
    task = load_task(cfg)
    prep = prepare_data(tok, cfg, task)
    enc = ClassificationEncoder(tok, cfg)
    label_ids = dict(zip(task.labels, enc.label_ids(task.labels)))
    reserve = max(len(v) for v in label_ids.values()) + 1
    prompts, _ = enc.encode_prompts(task.eval, reserve=reserve)
    compared = 0
    for ex, feat, prompt in zip(task.eval, prep.eval, prompts):
        target = label_ids[ex.label] + [enc.end_id]
        assert _target_part(feat) == target and feat["input_ids"][-len(target):] == target
        full = enc.prefix + tok(ex.prompt, add_special_tokens=False).input_ids
        if len(full) + reserve <= cfg.max_length:  # evaluation did not cut this prompt: all ids are the same
            assert feat["input_ids"] == prompt + target
            compared += 1
    assert compared >= 5
    if name in ("opt_tok", "gpt2_tok", "bloom_tok"):  # byte-level BPE: joint tokenization would differ
        joint = tok("label : complaint", add_special_tokens=False).input_ids
        split = tok("label : ", add_special_tokens=False).input_ids + label_ids["complaint"]
        assert joint != split


def test_gpt2_without_pad_pads_with_the_end_token_and_still_learns_it(gpt2_tok):
    eos = gpt2_tok.eos_token_id
    assert gpt2_tok.pad_token_id == eos
    cfg = _classify_cfg()
    prep = prepare_data(gpt2_tok, cfg)
    assert prep.pad_id == eos and prep.end_id == eos
    feats = [prep.train[i] for i in range(4)]
    batch = collate(feats, prep.pad_id)
    for row, f in enumerate(feats):
        n_pad = batch["input_ids"].shape[1] - len(f["input_ids"])
        assert batch["input_ids"][row, :n_pad].tolist() == [eos] * n_pad
        assert batch["labels"][row, :n_pad].tolist() == [IGNORE_INDEX] * n_pad  # pad: no loss
        assert batch["labels"][row, -1].item() == eos  # the same id at the end: learned
        assert batch["attention_mask"][row].tolist() == [0] * n_pad + [1] * len(f["input_ids"])


def test_llama_style_bos_once_in_front_and_kept_when_truncated(llama_tok):
    bos = llama_tok.bos_token_id
    cfg = _classify_cfg()
    prep = prepare_data(llama_tok, cfg)
    assert prep.report["prefix_tokens"] == ["<s>"]
    for f in prep.train:
        assert f["input_ids"][0] == bos and f["input_ids"].count(bos) == 1
        assert f["input_ids"][-1] == llama_tok.eos_token_id
    cfg = _classify_cfg()
    cfg.max_length = 12
    task = load_task(cfg)
    short = prepare_data(llama_tok, cfg, task)
    assert short.report["splits"]["train"]["truncated"] > 0
    enc = ClassificationEncoder(llama_tok, cfg)
    prompts, _ = enc.encode_prompts(task.train, reserve=max(len(x) for x in enc.label_ids(task.labels)) + 1)
    assert all(len(body) > 12 for body in llama_tok([e.prompt for e in task.train], add_special_tokens=False).input_ids)
    for f, ex, p in zip(short.train, task.train, prompts):
        target = enc.label_ids([ex.label])[0] + [enc.end_id]
        body = llama_tok(ex.prompt, add_special_tokens=False).input_ids
        # left truncation cuts the prompt's beginning but keeps <s> in front, as evaluation does (p[0])
        assert f["input_ids"] == [bos] + body[-(12 - len(target) - 1):] + target
        assert p[0] == bos


def test_bloom_style_pads_with_id_3_on_the_left(bloom_tok):
    assert bloom_tok.pad_token_id == 3 and bloom_tok.padding_side == "left"
    prep = prepare_data(bloom_tok, _classify_cfg())
    assert prep.pad_id == 3 and prep.end_id == 2
    feats = [prep.train[i] for i in range(3)]
    batch = collate(feats, prep.pad_id)
    longest = max(len(f["input_ids"]) for f in feats)
    expected = torch.tensor([[3] * (longest - len(f["input_ids"])) + f["input_ids"] for f in feats])
    assert torch.equal(batch["input_ids"], expected)
    # the tokenizer's own left padding agrees with ours
    hf = bloom_tok.pad({"input_ids": [f["input_ids"] for f in feats]}, return_tensors="pt")
    assert torch.equal(hf["input_ids"], batch["input_ids"]) and torch.equal(hf["attention_mask"],
                                                                            batch["attention_mask"])


# ---------------------------------------------------------------------------------------------------------------
# Saved splits


def test_saved_splits_reload_identically_and_refuse_other_settings(tmp_path, opt_tok, bert_zh_tok, monkeypatch):
    cfg = _classify_cfg()
    prep = prepare_data(opt_tok, cfg)
    out = save_prepared(prep, tmp_path / "prep", cfg, opt_tok)
    again = prepare_data(opt_tok, DataConfig(**{**cfg.__dict__, "prepared": str(out)}))
    assert list(again.train) == list(prep.train) and list(again.eval) == list(prep.eval)
    assert again.labels == prep.labels and again.pad_id == prep.pad_id
    with pytest.raises(ClmtuneError, match="data.max_length=64 there, 32 here"):
        prepare_data(opt_tok, DataConfig(**{**cfg.__dict__, "prepared": str(out), "max_length": 32}))
    with pytest.raises(ClmtuneError, match="another tokenizer"):
        prepare_data(bert_zh_tok, DataConfig(**{**cfg.__dict__, "prepared": str(out)}))
    with pytest.raises(ClmtuneError, match="holds an earlier `clmtune prepare --save` output"):
        save_prepared(prep, out, cfg, opt_tok)
    # a failure half-way leaves neither a half-written folder nor a temporary one behind
    import clmtune.data.features as features

    def boom(_tok):
        raise RuntimeError("disk full")

    monkeypatch.setattr(features, "tokenizer_fingerprint", boom)
    with pytest.raises(RuntimeError):
        save_prepared(prep, tmp_path / "fresh", cfg, opt_tok)
    with pytest.raises(RuntimeError):
        save_prepared(prep, out, cfg, opt_tok, overwrite=True)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]
    assert (out / "clmtune_prepared.json").is_file()  # the old folder is untouched


def test_example_without_target_has_no_features(opt_tok):
    ex = [Example(id="0", prompt="Tweet text : hi label : ", label=None, text="hi")]
    task = TaskData(train=[Example(id="1", prompt="p", label="complaint", text="p", target="complaint")], eval=[],
                    test=ex, labels=["complaint"], report={"dropped_empty": {}, "dropped_duplicate": {}})
    prep = prepare_data(opt_tok, _classify_cfg(), task)
    assert prep.test is None and prep.eval is None and len(prep.train) == 1
