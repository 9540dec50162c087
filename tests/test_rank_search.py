"""``rank`` by best-first search over the label tree (clmtune.rank.search) equals scoring every label."""

from __future__ import annotations

import pytest
import torch

from clmtune.evaluate import LabelTree
from clmtune.rank import predict
from clmtune.rank.predict import predict_rank
from clmtune.rank.search import search_batch
from clmtune.tasks.examples import Example
from test_eval_methods import CASES, _load, _naive_scores, _prompts


@pytest.mark.parametrize("name", [n for n in CASES if "bloom" not in n])  # the models that take a 4D mask
def test_search_finds_the_naive_argmax(name, monkeypatch):
    model, tok = _load(name)
    labels, texts = CASES[name]
    enc, prompts = _prompts(tok, texts)
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    best = _naive_scores(model, prompts, conts).argmax(1).tolist()
    nodes = len(LabelTree.build(conts).token)
    # random weights: every label about equally likely, so the search may have to expand every node (one a step)
    assert search_batch(model, prompts, conts, enc.pad_id, budget=nodes) == (best, 0)  # one left-padded batch
    assert [search_batch(model, [p], conts, enc.pad_id, budget=nodes)[0][0] for p in prompts] == best
    # too few steps: the rows it cannot prove are left open, the others are still right ...
    short, n_open = search_batch(model, prompts, conts, enc.pad_id, budget=1, finish=False)
    assert n_open == short.count(None) > 0 and all(s is None or s == b for s, b in zip(short, best))
    # ... and then scored over the whole tree on top of the prompts' cache
    for budget in (0, 1, 2):
        assert search_batch(model, prompts, conts, enc.pad_id, budget=budget)[0] == best
    examples = [Example(id=str(i), prompt=f"{t} label : ", label=None, text=t) for i, t in enumerate(texts)]
    calls = []
    monkeypatch.setattr(predict, "search_batch", lambda *a, **k: calls.append(1) or search_batch(*a, **k))
    monkeypatch.setattr(predict, "SEARCH_GIVES_UP", 1.0)  # random weights leave rows open: keep searching
    for steps, searched in ((predict.SEARCH_STEPS, False), (0.5, True)):  # a smaller budget: these trees qualify
        monkeypatch.setattr(predict, "SEARCH_STEPS", steps)
        for search in (True, False):  # what `clmtune eval` runs: search where it pays, else the one pass
            calls.clear()
            got = predict_rank(model, enc, examples, labels, batch_size=2, search=search).predicted
            assert got == [labels[j] for j in best]
            assert bool(calls) == (search and searched)


def test_a_confident_model_needs_few_steps(monkeypatch):
    """A model that strongly prefers one continuation: the search stops after that label's tokens, without
    running the other branches (counted forward calls)."""
    model, tok = _load("builtin:tiny-gpt2-zh")
    labels = ["好", "不好", "一般般", "很好", "非常不好"]
    enc, prompts = _prompts(tok, ["房间很干净", "服务差"])
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    target = conts[2]  # 一般般 + end: make every token of it far more likely than anything else
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untie from the input embedding
        bias = torch.zeros(head.weight.shape[0])
        bias[list(set(target))] = 30.0
        head.bias = torch.nn.Parameter(bias)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    assert search_batch(model, prompts, conts, enc.pad_id, budget=len(target) + 1) == ([2, 2], 0)
    assert len(calls) == 1 + len(target) - 1  # the prefill, then one step per label token before the end token
