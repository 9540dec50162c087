"""The fast training path: length-grouped batches, LM head only on labelled positions, per-token loss
across gradient accumulation, pad_to_multiple_of, bf16 fallback. Each trick must leave the loss unchanged."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tinyrun import LABELS, one_thread, tiny_cfg  # noqa: F401  (fixture)

import clmtune.train.setup as setup_mod
from clmtune.config import DataConfig, ModelConfig, PeftSettings, load_config
from clmtune.data import IGNORE_INDEX, collate, prepare_data
from clmtune.errors import ConfigError
from clmtune.models import apply_peft, forward_inputs, load_model, load_tokenizer, resolve_model_path
from clmtune.train import (EpochSampler, causal_lm_loss, head_trim_support, logits_to_keep, supervised_tokens,
                           train)

METHODS = ["lora", "prefix_tuning", "prompt_tuning", "p_tuning", "ia3", "full"]


def test_logits_to_keep_counts_from_the_first_labelled_column():
    labels = torch.tensor([[-100, -100, -100, 5, 6, 2],
                           [-100, -100, -100, -100, 7, 2]])  # (B=2, T=6); first labelled column 3
    assert logits_to_keep(labels) == 4  # positions 2..5: position 2 predicts label 3
    assert supervised_tokens(labels) == 5
    lm = torch.tensor([[4, 5, 6], [-100, 8, 9]])
    assert logits_to_keep(lm) == 3  # column 0 supervised: every position


@pytest.fixture(scope="module")
def real_batch():
    """Five real tweets, tokenized and left-padded as training does: (B=5, T) with different label lengths."""
    model_cfg = ModelConfig(name_or_path="builtin:tiny-opt")
    tok = load_tokenizer(model_cfg)
    data = prepare_data(tok, DataConfig(source="builtin:raft/twitter_complaints", eval_fraction=0.0, labels=LABELS, max_length=64),
                        progress=False)
    feats = [{"input_ids": data.train[i]["input_ids"], "labels": data.train[i]["labels"]} for i in range(5)]
    return model_cfg, collate(feats, data.pad_id)


@pytest.mark.parametrize("method", METHODS)
def test_loss_on_kept_logits_equals_full_logits_loss(real_batch, one_thread, method):
    model_cfg, batch = real_batch
    torch.manual_seed(0)
    model = apply_peft(load_model(model_cfg), PeftSettings(method=method, lora_dropout=0.0),
                       tokenizer_path=resolve_model_path(model_cfg.name_or_path))
    assert head_trim_support(model) == ("mask", None)
    for p in model.parameters():  # LoRA B / IA3 start at the identity: perturb so the adapter matters
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    model.train()  # no dropout in tiny-opt and lora_dropout=0: train mode is deterministic

    def loss_and_grads(keep):
        model.zero_grad()
        inputs = forward_inputs(model, batch)
        if keep is not None:
            inputs["logits_to_keep"] = keep
        logits = model(**inputs).logits
        loss = causal_lm_loss(logits, batch["labels"], reduction="sum")
        loss.backward()
        return logits.shape[1], loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    k = logits_to_keep(batch["labels"])
    T = batch["input_ids"].shape[1]
    assert k < T / 3  # the head really runs on few positions (label words + end + 1)
    n_full, full_loss, full_grads = loss_and_grads(None)
    n_kept, kept_loss, kept_grads = loss_and_grads(k)
    assert n_kept == k and n_full >= T
    torch.testing.assert_close(kept_loss, full_loss, atol=1e-5, rtol=1e-6)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # the supervised tokens are really scored: the mean is the sum over their count
    mean = causal_lm_loss(model(**forward_inputs(model, batch)).logits, batch["labels"])
    torch.testing.assert_close(mean, full_loss / supervised_tokens(batch["labels"]), atol=1e-6, rtol=1e-6)


def test_models_without_logits_to_keep_get_full_logits_with_a_reason():
    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    mode, reason = head_trim_support(Plain())
    assert mode is None and "Plain.forward has no logits_to_keep" in reason


def test_length_grouped_order_is_shuffled_grouped_and_resumable():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 200, (103,), generator=g).tolist()
    s = EpochSampler(103, seed=3, lengths=lengths, batch_size=8, mega_batches=4)
    order = s.order()
    assert sorted(order) == list(range(103))  # every row once
    assert s.order() == order  # pure function of (seed, epoch)
    s.set_epoch(1)
    assert s.order() != order  # reshuffled every epoch
    s.set_epoch(0)
    batches = [order[k:k + 8] for k in range(0, 103, 8)]
    assert len(batches[-1]) == 103 % 8  # the partial batch is last, so DataLoader chunks are these batches
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    plain = EpochSampler(103, seed=3).order()
    plain_padding = padding([plain[k:k + 8] for k in range(0, 103, 8)])
    assert padding(batches) < 0.5 * plain_padding
    one_group = EpochSampler(103, seed=3, lengths=lengths, batch_size=8).order()  # 103 rows < 50 batches
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b))
                   for b in (one_group[k:k + 8] for k in range(0, 103, 8)))
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))  # sorted, then cut
    assert padding([one_group[k:k + 8] for k in range(0, 103, 8)]) < 0.15 * plain_padding
    s.skip_rows(16)  # resuming after 2 batches: the rest of the same order
    assert list(s) == order[16:] and len(s) == 87


def test_pad_to_multiple_of_rounds_up_and_bad_values_are_refused():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9] * 9, "labels": [9] * 9}],
                    pad_id=1, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][0].tolist() == [1] * 13 + [5, 6, 7]
    assert batch["attention_mask"][0].tolist() == [0] * 13 + [1] * 3
    assert batch["labels"][0, :13].eq(IGNORE_INDEX).all()
    for bad in (0, -8):
        with pytest.raises(ConfigError, match=f"data.pad_to_multiple_of={bad} must be a positive integer"):
            load_config(overrides={"data": {"pad_to_multiple_of": bad}})


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the gradients it is asked to apply."""

    seen: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        _RecordingAdamW.seen.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]})
        return super().step(closure)


@pytest.mark.slow
def test_accumulating_two_batches_of_4_gives_the_gradient_of_one_batch_of_8(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    grads = {}
    for name, bs, ga in (("b8", 8, 1), ("b4x2", 4, 2)):
        _RecordingAdamW.seen = []
        # plain shuffle: both runs see the same first 8 rows (length grouping depends on the batch size).
        # lm rows (one tweet each, every token supervised): the rows carry different numbers of loss tokens
        cfg = tiny_cfg(tmp_path, name=name, batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                       group_by_length=False, peft={"lora_dropout": 0.0}, precision="fp32",  # exact comparison
                       data={"task": "lm", "text_column": "Tweet text", "packing": False, "labels": None})
        train(cfg, progress=False)
        assert len(_RecordingAdamW.seen) == 1
        grads[name] = list(_RecordingAdamW.seen[0].values())
    assert len(grads["b8"]) == len(grads["b4x2"]) > 0
    assert any(g.abs().sum() > 0 for g in grads["b8"])
    for a, b in zip(grads["b4x2"], grads["b8"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)

    # the check can fail: the two half batches carry different numbers of label tokens, so the mean of per-batch
    # means (what accumulating per-batch mean losses gives) is a different gradient
    tok = load_tokenizer(cfg.model)
    data = prepare_data(tok, cfg.data, progress=False)
    rows = EpochSampler(len(data.train), cfg.train.seed).order()[:8]
    counts = [sum(1 for x in data.train[i]["labels"][1:] if x != IGNORE_INDEX) for i in rows]
    assert sum(counts[:4]) != sum(counts[4:])


@pytest.mark.slow
def test_fast_path_trains_to_the_same_losses_as_full_logits(tmp_path, one_thread):
    """logits_to_keep (and the fused head loss) + length groups + pad_to_multiple_of vs full logits on
    exactly-padded batches, in fp32 (in bf16 the fused loss rounds differently: tests/test_fused_head.py)."""
    fast = train(tiny_cfg(tmp_path, name="fast", data={"pad_to_multiple_of": 16}, precision="fp32"), progress=False)
    slow = train(tiny_cfg(tmp_path, name="slow", logits_on_labels_only=False, precision="fp32"), progress=False)
    a = [json.loads(x)["loss"] for x in (fast.output_dir / "train_log.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (slow.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert a == pytest.approx(b, abs=1e-4)
    assert json.loads((fast.output_dir / "train_summary.json").read_text())["lm_head_positions"] == "mask"
    assert json.loads((slow.output_dir / "train_summary.json").read_text())["lm_head_positions"] == "all"


def test_bf16_on_a_cpu_without_bf16_falls_back_to_fp32_with_a_warning(tmp_path, one_thread, monkeypatch, caplog):
    monkeypatch.setattr(setup_mod, "bf16_unsupported_reason", lambda: "this CPU (DEFAULT) has no fast bf16 matmuls")
    cfg = tiny_cfg(tmp_path, name="nobf16", precision="bf16", max_steps=1)
    with caplog.at_level(logging.WARNING, logger="clmtune"):
        train(cfg, progress=False)
    assert any("train.precision=bf16 asked for, but this CPU (DEFAULT) has no fast bf16 matmuls; training in fp32"
               in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "nobf16" / "train_summary.json").read_text())["precision"] == "fp32"
