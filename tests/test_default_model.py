"""The shipped pretrained default (builtin:gpt2-zh-small), its reproduction script's vocabulary cut, and the bad
input around models and corpora: a folder without tokenizer, a tokenizer larger than the embedding, non-UTF-8."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from clmtune.cli import main
from clmtune.config import ModelConfig
from clmtune.errors import ClmtuneError
from clmtune.models import builtin_model_path, load_model, load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "builtin:gpt2-zh-small"


def _pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_default", REPO / "scripts" / "maint" / "pretrain_default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def default_model():
    cfg = ModelConfig(DEFAULT)
    model = load_model(cfg)
    model.eval()
    return model, load_tokenizer(cfg)


def test_default_model_ships_in_the_package_as_gpt2_with_a_cut_bert_vocab(default_model):
    model, tok = default_model
    folder = builtin_model_path("gpt2-zh-small")
    assert folder == REPO / "src" / "clmtune" / "assets" / "models" / "gpt2-zh-small"
    assert resolve_model_path(DEFAULT) == str(folder)  # no cache, no build step: the shipped folder itself
    assert (folder / "model.safetensors").stat().st_size < 25 * 2**20
    assert (folder / "MODEL_CARD.md").is_file() and not list(folder.glob("*.bin"))
    assert type(model).__name__ == "GPT2LMHeadModel" and type(tok).__name__.startswith("BertTokenizer")
    assert len(tok) == model.get_input_embeddings().weight.shape[0]  # the vocabulary was cut, and it matches
    assert tok.eos_token == "[SEP]" and tok.pad_token == "[PAD]"
    # character tokenization as in uer/gpt2-chinese-cluecorpussmall; ASCII survives the cut
    assert tok.tokenize("早餐太差，ok 2") == ["早", "餐", "太", "差", "，", "ok", "2"]
    assert "[UNK]" not in tok.tokenize("ABCxyz!?@#0123456789")


def test_default_model_is_stored_in_bf16_and_loads_in_the_dtype_asked_for():
    """The weights are bf16 on disk (half the fp32 size; the model was pretrained under bf16 autocast); load_model
    converts them to the requested dtype, exactly (every bf16 value is an fp32 value), and keeps wte/lm_head tied."""
    from safetensors import safe_open

    folder = builtin_model_path("gpt2-zh-small")
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    n_params = sum(t.numel() for k, t in stored.items() if k != "lm_head.weight")  # tied to wte if stored
    assert (folder / "model.safetensors").stat().st_size < 2.1 * n_params  # 2 bytes each + header
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(ModelConfig(DEFAULT), dtype=dtype)
        params = dict(model.named_parameters())
        assert {p.dtype for p in params.values()} == {dtype}
        wte = params["transformer.wte.weight"]
        assert torch.equal(wte, stored["transformer.wte.weight"].to(dtype))
        assert model.get_output_embeddings().weight.data_ptr() == wte.data_ptr()  # still tied after the cast


@pytest.mark.slow
def test_default_model_knows_the_test_reviews_it_never_saw(default_model, shared_data):
    """Perplexity on ChnSentiCorp test.tsv (never trained on): far below the random model's, and few [UNK]."""
    from clmtune.evaluate import perplexity

    model, tok = default_model
    with open(shared_data / "chnsenticorp" / "test.tsv", encoding="utf-8", newline="") as fh:
        texts = [r["text_a"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)][:64]
    ids = [tok(t, add_special_tokens=False, truncation=True, max_length=128)["input_ids"] for t in texts]
    unk = sum(i.count(tok.unk_token_id) for i in ids) / sum(map(len, ids))
    assert unk < 0.01, unk
    feats = [{"input_ids": i, "labels": i} for i in ids]
    ppl = perplexity(model, feats, tok.pad_token_id, batch_size=16)["perplexity"]
    # uniform guessing over the vocabulary would be len(tok) (~8,000); a pretrained model must be far below.
    # The shipped model gives 36.3 (the 4 x 256 model before it: 96.2)
    assert ppl < 50, ppl
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    rand = GPT2LMHeadModel(model.config)  # same architecture, random weights: the pretraining makes the difference
    rand_ppl = perplexity(rand.eval(), feats, tok.pad_token_id, batch_size=16)["perplexity"]
    assert ppl < rand_ppl / 20, (ppl, rand_ppl)


def test_cut_vocabulary_tokenizes_like_the_full_bert_vocabulary(tmp_path):
    """The cut keeps every token the full tokenizer produces on the corpus, renumbered in vocab.txt order."""
    from clmtune.models import bert_chinese_tokenizer

    mod = _pretrain_script()
    corpus = tmp_path / "corpus" / "train"
    corpus.mkdir(parents=True)
    lines = ["早餐太差，无论去多少人，那边也不加食品的。", "Hotel 位置很好, wifi 不错!", "房间123号"]
    (corpus / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok, stats = mod.build_tokenizer(tmp_path)
    full = bert_chinese_tokenizer()
    for line in lines:
        assert tok.tokenize(line) == full.tokenize(line)
        assert tok.unk_token_id not in tok(line)["input_ids"]
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id] == [0, 1, 2, 3]  # kept order
    assert stats["vocab_size"] == len(tok) < 200  # specials + ASCII + the corpus' tokens, not 21,128
    assert "丁" not in tok.vocab  # a character the corpus does not use is cut


def test_model_folder_without_tokenizer_exits_2(tmp_path, capsys):
    model = load_model(ModelConfig("builtin:tiny-gpt2-zh"))
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert main(["generate", "--model", str(tmp_path / "m"), "你好"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clmtune: error")]
    assert len(errors) == 1 and str(tmp_path / "m") in errors[0] and "no usable tokenizer" in errors[0]


@pytest.mark.slow
def test_tokenizer_larger_than_the_embedding_names_both_numbers(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(ModelConfig("builtin:tiny-gpt2-zh"))  # 21,128 entries
    torch.manual_seed(0)
    small = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=16, n_layer=1, n_head=2, n_positions=128))
    small.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "你好"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("clmtune: error")]
    assert len(errors) == 1 and "21128 entries" in errors[0] and "1000 rows" in errors[0]
    assert main(["train", "--config", str(REPO / "configs" / "chnsenticorp_lm.yaml"), "--output-dir",
                 str(tmp_path / "run"), "--model.name_or_path", str(tmp_path / "m"), "--train.max_steps", "1"]) == 2
    assert "21128 entries" in capsys.readouterr().err


def test_corpus_that_is_not_utf8_names_file_and_byte_offset(tmp_path):
    from clmtune.config import DataConfig
    from clmtune.data import load_raw

    folder = tmp_path / "corpus"
    folder.mkdir()
    good = "第一行\n第二行\n".encode("utf-8")
    (folder / "ok.txt").write_bytes(good)
    (folder / "bad.txt").write_bytes(good + "坏".encode("gbk") + b"\n")
    with pytest.raises(ClmtuneError) as exc:
        load_raw(DataConfig(source=str(folder), task="lm"))
    msg = str(exc.value)
    assert str(folder / "bad.txt") in msg and f"byte offset {len(good)}" in msg and "line 3" in msg
