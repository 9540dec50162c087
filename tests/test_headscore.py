"""``clmtune.rank.headscore``: token log-probabilities from hidden states, head run in vocabulary blocks."""

from __future__ import annotations

import pytest
import torch

import clmtune.rank.headscore as headscore
from clmtune.evaluate import label_scores
from test_eval_methods import CASES, _load, _naive_scores, _prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_equal_log_softmax_over_the_whole_vocabulary(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(7, 16, generator=g) * 3).to(dtype)  # (R, d): spread-out logits, so max-shifting matters
    weight = torch.randn(1000, 16, generator=g).to(dtype)  # (V, d)
    bias = torch.randn(1000, generator=g).to(dtype)
    rows = torch.tensor([0, 0, 3, 6, 6, 2])
    tokens = torch.tensor([0, 999, 255, 256, 511, 700])  # both ends of the vocabulary and of a block
    monkeypatch.setattr(headscore, "BLOCK_BYTES", 4 * 7 * 256)  # 256-token blocks: 4 of them, the last partial
    calls = []
    real_linear = headscore.F.linear
    monkeypatch.setattr(headscore.F, "linear", lambda *a: calls.append(a[1].shape[0]) or real_linear(*a))
    got = headscore.token_logprobs(hidden, weight, bias, rows, tokens)
    assert calls == [256, 256, 256, 232]  # never the (R, V) logits at once
    want = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float(), -1)[rows, tokens]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["builtin:tiny-opt", "builtin:tiny-bloom"])  # the one pass; the shared-cache path
def test_rank_runs_the_head_in_blocks_and_matches_naive(name, monkeypatch):
    model, tok = _load(name)
    labels, texts = CASES[name]
    enc, prompts = _prompts(tok, texts)
    conts = [ids + [enc.end_id] for ids in enc.label_ids(labels)]
    head = model.get_output_embeddings()
    widths = []
    head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    monkeypatch.setattr(headscore, "BLOCK_BYTES", 1 << 16)  # many blocks even for these tiny batches
    got = label_scores(model, enc, prompts, labels, batch_size=2)
    hidden = model.config.hidden_size
    vocab, groups = head.weight.shape[0], (len(texts) + 1) // 2
    if "bloom" in name:  # per group of 2 prompts: the prompt pass (head on its last position), then the labels'
        assert widths == [vocab, hidden] * groups
    else:  # one pass per group, prompt + label tree, head bypassed
        assert widths == [hidden] * groups
    torch.testing.assert_close(got, _naive_scores(model, prompts, conts), atol=1e-4, rtol=1e-5)
