"""Data stage: exact tensors of the tutorial's worked example, truncation, BERT character tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from clmtune.config import DataConfig
from clmtune.data import IGNORE_INDEX, ClassificationEncoder, Example, build_train_example, collate, left_pad, load_task
from clmtune.errors import ClmtuneError

# The peft causal-LM tutorial's first twitter_complaints row, tokenized by BLOOM (pad/end id 3).
PROMPT_IDS = [227985, 5484, 915, 5673, 473, 11229, 2213, 2670, 35307, 28629, 461, 2566, 2765, 1531, 3470, 47134, 10144,
              2765, 1531, 427, 2909, 17918, 6782, 27268, 4390, 1517, 17, 3904, 632, 267, 6497, 483, 361, 2670, 101848,
              17, 32465, 9585, 2566, 37, 2481, 2566, 37, 2481, 12384, 19248, 915, 210]
TARGET_IDS = [16449, 5952]


class StubTokenizer:
    """Returns fixed ids for known texts, like BLOOM's tokenizer would (the BLOOM files are not available here)."""

    pad_token_id = eos_token_id = 3
    bos_token_id = None

    def __init__(self, table: dict[str, list[int]]):
        self.table = table

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        if isinstance(texts, str):
            return SimpleNamespace(input_ids=self.table[texts])
        return SimpleNamespace(input_ids=[self.table[t] for t in texts])


def tutorial_encoder(max_length=64, **kw):
    tok = StubTokenizer({"PROMPT": PROMPT_IDS, "no complaint": TARGET_IDS})
    return ClassificationEncoder(tok, DataConfig(max_length=max_length, **kw))


def test_tutorial_example_exact_tensors():
    enc = tutorial_encoder()
    ex = Example(id="0", prompt="PROMPT", label="no complaint", text="")
    feats, truncated = enc.encode_train([ex])
    assert truncated == 0
    batch = collate(feats, enc.pad_id, length=64)
    expected_ids = [3] * 13 + PROMPT_IDS + [16449, 5952, 3]
    assert batch["input_ids"].tolist() == [expected_ids]
    assert batch["attention_mask"].tolist() == [[0] * 13 + [1] * 51]
    assert batch["labels"].tolist() == [[-100] * 61 + [16449, 5952, 3]]
    assert batch["input_ids"].dtype == torch.long

    prompts, cut = enc.encode_prompts([ex])
    assert cut == 0
    assert left_pad(prompts, 3, 64).tolist() == [[3] * 16 + PROMPT_IDS]
    assert left_pad([[1] * len(p) for p in prompts], 0, 64).tolist() == [[0] * 16 + [1] * 48]


def test_dynamic_padding_pads_to_longest_row_on_the_left():
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(feats, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]  # a first token has no context
    assert collate(feats, pad_id=0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)


def test_truncation_cuts_the_prompt_never_the_target():
    ids, labels, cut = build_train_example(list(range(100, 150)), [7, 8], end_id=3, max_length=20)
    assert cut and len(ids) == 20
    assert ids[-3:] == [7, 8, 3] and labels[-3:] == [7, 8, 3]
    assert ids[:17] == list(range(133, 150))  # left side cut: the prompt's end (next to the label) is kept
    assert labels[:17] == [IGNORE_INDEX] * 17
    ids, _, _ = build_train_example(list(range(100, 150)), [7, 8], end_id=3, max_length=20, truncation_side="right")
    assert ids[:17] == list(range(100, 117))


def test_truncated_rows_are_counted_and_eval_prompts_leave_room_for_the_label():
    enc = tutorial_encoder(max_length=32)
    exs = [Example(id=str(i), prompt="PROMPT", label="no complaint", text="") for i in range(3)]
    feats, truncated = enc.encode_train(exs)
    assert truncated == 3
    assert all(len(f["input_ids"]) == 32 and f["input_ids"][-3:] == [16449, 5952, 3] for f in feats)
    prompts, cut = enc.encode_prompts(exs, reserve=3)
    assert cut == 3 and prompts[0] == PROMPT_IDS[-29:] == feats[0]["input_ids"][:29]


def test_max_length_too_small_for_the_target_is_an_error():
    enc = tutorial_encoder(max_length=3)
    with pytest.raises(ClmtuneError, match="data.max_length=3 .*at least 4"):
        enc.encode_train([Example(id="0", prompt="PROMPT", label="no complaint", text="")])


def test_bert_character_tokenizer_has_no_cls_or_sep_inside():
    from clmtune.models import bert_chinese_tokenizer

    tok = bert_chinese_tokenizer()  # the shipped copy of bert-chinese-vocab.txt (Chinese GPT-2's tokenizer)
    assert len(tok) == 21128 and tok.cls_token_id == 101 and tok.sep_token_id == 102 and tok.pad_token_id == 0
    cfg = DataConfig(template="评论：{review} 情感：", max_length=64)
    enc = ClassificationEncoder(tok, cfg)
    ex = Example(id="0", prompt="评论：早餐太差，无论去多少人 情感：", label="差评", text="")
    (feat,), _ = enc.encode_train([ex])
    ids = feat["input_ids"]
    assert 101 not in ids and 102 not in ids[:-1] and ids[-1] == 102  # [SEP] only as the end token
    assert ids[-3:-1] == tok.convert_tokens_to_ids(["差", "评"])
    assert feat["labels"][-3:] == ids[-3:] and set(feat["labels"][:-3]) == {IGNORE_INDEX}
    (prompt,), _ = enc.encode_prompts([ex])
    assert prompt == ids[:-3]  # evaluation feeds exactly the training prompt


def _csv(tmp_path, text):
    p = tmp_path / "d.csv"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_rows_with_empty_text_are_dropped_and_counted(tmp_path):
    src = _csv(tmp_path, "text,Label\nhello,a\n,b\n  ,a\nworld,b\n")
    task = load_task(DataConfig(source=src, template="T: {text} L: ", eval_fraction=0))
    assert [e.prompt for e in task.train] == ["T: hello L: ", "T: world L: "]
    assert task.report["dropped_empty"]["train"] == 2 and task.labels == ["a", "b"]


@pytest.mark.parametrize("text,cfg,match", [
    ("text,Label\nx,a\n", dict(template="{tweet}"), r"uses placeholder\(s\) \['tweet'\]"),
    ("text,Label\nx,a\ny,zzz\n", dict(template="{text}", labels=["a", "b"]), r"label 'zzz' is not in the label set"),
    ("text,Label\n,a\n", dict(template="{text}"), r"no training rows left"),
    ("text,Label\nx,a\n", dict(template="{text}", label_column="y"), r"label_column='y'"),
])
def test_bad_data_is_a_clear_error(tmp_path, text, cfg, match):
    with pytest.raises(ClmtuneError, match=match):
        load_task(DataConfig(source=_csv(tmp_path, text), eval_fraction=0, **cfg))


def test_raft_folder_labels_and_split():
    task = load_task(DataConfig())  # the shipped twitter_complaints task
    assert task.labels == ["complaint", "no complaint"]
    assert (len(task.train), len(task.eval), len(task.test)) == (40, 10, 3399)
    assert task.train[0].prompt.startswith("Tweet text : ") and task.train[0].prompt.endswith(" label : ")
    again = load_task(DataConfig())
    assert [e.id for e in again.eval] == [e.id for e in task.eval]  # deterministic split

