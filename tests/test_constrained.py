"""Constrained decoding over the label prefix tree: always a label, the same as a naive greedy walk of the tree."""

from __future__ import annotations

import pytest
import torch

from clmtune.config import ModelConfig
from clmtune.evaluate.constrained import Trie, constrained_decode
from clmtune.models import load_model, load_tokenizer

LABELS = ["card arrival", "card linking", "card payment fee charged", "cash withdrawal", "no complaint"]
PROMPTS = ["Query : my card has not arrived yet label : ", "Query : why was I charged twice label : ",
           "Query : hi label : ", "Query : I want to withdraw money from an ATM near my home label : ",
           "Tweet text : @united you lost my bag again label : "]


def _setup(name: str):
    torch.manual_seed(0)
    cfg = ModelConfig(f"builtin:{name}")
    model, tok = load_model(cfg).eval(), load_tokenizer(cfg)
    end = tok.eos_token_id
    conts = [tok(" " + lab, add_special_tokens=False).input_ids + [end] for lab in LABELS]
    prompts = [tok(p).input_ids for p in PROMPTS]
    return model, tok, prompts, conts


@torch.no_grad()
def _naive(model, prompt: list[int], conts: list[list[int]]) -> int:
    """Greedy walk of the tree with a full forward of the whole sequence per step, full-vocabulary logits."""
    seq, alive = list(prompt), list(range(len(conts)))
    k = 0
    while len(alive) > 1:
        allowed = sorted({conts[j][k] for j in alive})
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        tok = allowed[int(logits[allowed].argmax())] if len(allowed) > 1 else allowed[0]
        alive = [j for j in alive if conts[j][k] == tok]
        seq.append(tok)
        k += 1
    return alive[0]


def test_trie_knows_where_a_single_label_is_left():
    t = Trie.build([[5, 6, 9], [5, 7, 9], [8, 9]])
    assert t.label[0] == -1 and t.label[t.children[0][5]] == -1
    assert t.label[t.children[0][8]] == 2 and t.label[t.children[t.children[0][5]][7]] == 1
    assert t.n_nodes == 1 + 7  # the root + 5, 5-6, 5-6-9, 5-7, 5-7-9, 8, 8-9
    assert Trie.build([[5, 6, 9], [5, 7, 9], [8, 9]]).children[0].keys() == {5, 8}


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2", "tiny-bloom", "tiny-llama"])
def test_constrained_equals_the_naive_greedy_walk_in_batches(name):
    model, tok, prompts, conts = _setup(name)
    want = [_naive(model, p, conts) for p in prompts]
    assert constrained_decode(model, prompts, conts, tok.pad_token_id, batch_size=1) == want
    assert constrained_decode(model, prompts, conts, tok.pad_token_id, batch_size=4) == want  # left padding
    assert all(0 <= j < len(LABELS) for j in want)


def test_the_head_is_restored_after_decoding():
    model, tok, prompts, conts = _setup("tiny-opt")
    ids = torch.tensor([prompts[0]])
    before = model(input_ids=ids).logits
    constrained_decode(model, prompts[:2], conts, tok.pad_token_id, batch_size=2)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert "forward" not in vars(model.get_output_embeddings())


@pytest.mark.slow
def test_auto_picks_constrained_for_banking77_and_rank_for_two_labels(tmp_path):
    """eval.method auto: banking_77's 77 labels make a tree far above the threshold -> constrained, whose
    predictions are all labels; twitter_complaints' two labels -> rank. eval.json names both."""
    import json

    from clmtune.config import from_dict
    from clmtune.data import Encoder, load_task
    from clmtune.evaluate import evaluate_examples
    from clmtune.evaluate.predict import CONSTRAINED_ABOVE_NODES, label_tree_nodes, resolve_method

    model, tok, _, _ = _setup("tiny-opt")
    bank = from_dict({"model": {"name_or_path": "builtin:tiny-opt"},
                      "data": {"source": "builtin:raft/banking_77", "template": "Query : {Query} label : ",
                               "label_column": "Label", "id_column": "ID", "end_token": "eos",
                               "max_length": 64}}).validate()
    task = load_task(bank.data)
    enc = Encoder(tok, bank.data)
    assert label_tree_nodes(enc, task.labels) > CONSTRAINED_ABOVE_NODES
    assert resolve_method("auto", enc, task.labels) == "constrained"
    assert resolve_method("rank", enc, task.labels) == "rank"
    result = evaluate_examples(model, tok, bank, task.train[:6], task.labels, "auto", tmp_path / "bank", False)
    assert result["method"] == "constrained" and result["method_asked"] == "auto" and result["invalid"] == 0
    saved = json.loads((tmp_path / "bank" / "eval.json").read_text())
    assert saved["method"] == "constrained" and saved["n"] == 6
    tweets = from_dict({"model": {"name_or_path": "builtin:tiny-opt"}}).validate()
    tw = load_task(tweets.data)
    assert resolve_method("auto", Encoder(tok, tweets.data), tw.labels) == "rank"
