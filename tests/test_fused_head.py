"""The fused frozen-head cross-entropy (``clmtune.train.fusedhead``): the loss and the hidden-state gradient of
today's path (logits, fp32 cross-entropy) up to rounding, over several vocabulary blocks; LoRA gradients through
a real model; training with it lowers the loss, leaves the base weights alone, and falls back where it must."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from bf16lora import lora_model
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

import clmtune.train.fusedhead as fh
from clmtune.config import ModelConfig
from clmtune.data import IGNORE_INDEX
from clmtune.models.head import head_returns_hidden
from clmtune.models import load_model
from clmtune.train import bf16_unsupported_reason, causal_lm_loss, head_positions, train
from clmtune.train.loss import supervised_targets


def reference_loss(hidden, weight, targets):
    """The library path for the same rows (logits, fp32 cross-entropy, summed): what the fused loss must equal."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def reference(h, w, t, bf16: bool):
    """The library path: (summed loss, gradient for h)."""
    h = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = reference_loss(h, w, t)
    loss.backward()
    return loss.detach(), h.grad


def fused(h, w, t, bf16: bool):
    h = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = fh.frozen_head_loss(h, w, t)
    (2.5 * loss).backward()  # the upstream gradient (training's 1 / supervised tokens) scales the result
    return loss.detach(), h.grad / 2.5


@pytest.mark.parametrize("bf16", [False, True])
def test_fused_loss_and_gradient_equal_the_logits_path(bf16, one_thread):
    torch.manual_seed(0)
    vocab, d, n = 1000, 48, 7  # 256-row blocks: 4 blocks, the last one short
    w = torch.randn(vocab, d) * 0.3
    w[17] += 2.0  # one token far more likely for every row
    h = torch.randn(n, d)
    w[600] = 3.0 * h[0]  # row 0's logit ~150 in the third block: exp overflows unless the running maximum moves
    t = torch.tensor([600, 0, 999, 255, 256, 512, 17])  # targets at block edges
    if bf16:
        w = w.to(torch.bfloat16)
    old = fh.BLOCK_WEIGHT_BYTES
    fh.BLOCK_WEIGHT_BYTES = 1  # the smallest block: 256 rows
    try:
        loss, grad = fused(h, w, t, bf16)
    finally:
        fh.BLOCK_WEIGHT_BYTES = old
    ref_loss, ref_grad = reference(h, w, t, bf16)
    assert loss.dtype == torch.float32 and grad.shape == h.shape
    if bf16:  # today's logits are bf16 products and its gradient a bf16 product of a bf16 softmax: rounding only
        torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=2e-2 * float(ref_grad.abs().max()))
    else:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not fh.PackedHead.available(), reason="no oneDNN packed-weight ops in this torch")
def test_packed_head_gives_the_loss_and_gradient_of_the_bf16_logits_path(one_thread):
    torch.manual_seed(0)
    vocab, d, n = 1000, 48, 7
    w = torch.randn(vocab, d) * 0.3
    h = torch.randn(n, d)
    w[600] = 3.0 * h[0]  # the running maximum must move (third block)
    t = torch.tensor([600, 0, 999, 255, 256, 512, 17])
    old = fh.BLOCK_WEIGHT_BYTES
    fh.BLOCK_WEIGHT_BYTES = 1  # 256-row blocks: 4 of them, the last one short
    try:
        packed = fh.PackedHead(w)  # from the fp32 head, as training keeps it
    finally:
        fh.BLOCK_WEIGHT_BYTES = old
    assert len(packed.forward_blocks) == 4 and packed.nbytes == 2 * 2 * vocab * d
    x = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fh.frozen_head_loss(x, w, t, packed)
    loss.backward()
    ref_loss, ref_grad = reference(h, w.to(torch.bfloat16), t, True)  # today's bf16 path
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=2e-3, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=2e-2 * float(ref_grad.abs().max()))
    exact, exact_grad = reference(h, w.to(torch.bfloat16).float(), t, False)  # fp32 on the bf16 values
    torch.testing.assert_close(loss.detach(), exact, rtol=2e-3, atol=0)
    torch.testing.assert_close(x.grad, exact_grad, rtol=0, atol=1e-2 * float(exact_grad.abs().max()))


def test_a_trainable_head_is_refused():
    with pytest.raises(ValueError, match="frozen"):
        fh.frozen_head_loss(torch.randn(2, 4), torch.randn(8, 4, requires_grad=True), torch.tensor([1, 2]))


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])  # OPT ties the head to the input embedding; LLaMA not
def test_lora_gradients_through_the_fused_head_equal_the_logits_path(name, one_thread):
    model = lora_model(name)
    labels = torch.full((3, 12), IGNORE_INDEX)
    ids = torch.randint(5, 1000, (3, 12))
    labels[:, 8:] = ids[:, 8:]
    labels[1, 8] = IGNORE_INDEX  # rows with different numbers of supervised tokens
    mask = head_positions(labels, "mask")
    head = fh.fused_head_module(model)
    assert fh.fused_head_reason(model, torch.device("cpu"), True, "mask", "fp32") is None

    def run(fused_path: bool):
        model.zero_grad()
        if fused_path:
            with head_returns_hidden(head):
                hidden = model(input_ids=ids, logits_to_keep=mask).logits
            assert hidden.shape == (int(mask.sum()), model.config.hidden_size)
            loss = fh.frozen_head_loss(hidden, head.weight, supervised_targets(labels))
        else:
            loss = causal_lm_loss(model(input_ids=ids, logits_to_keep=mask).logits, labels, reduction="sum")
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = run(False)
    loss, grads = run(True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert any("lora_A" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert head.forward.__func__ is torch.nn.Linear.forward  # the bypass is undone


def test_fused_path_is_refused_where_it_would_be_wrong():
    cpu = torch.device("cpu")
    model = lora_model("tiny-opt")
    assert "full fine-tuning" in fh.fused_head_reason(model, cpu, False, "mask", "fp32")
    assert "mask" in fh.fused_head_reason(model, cpu, True, "last", "fp32")
    assert "DeepSpeed" in fh.fused_head_reason(model, cpu, True, "mask", "fp32", deepspeed=True)
    assert "cuda" in fh.fused_head_reason(model, torch.device("cuda"), True, "mask", "fp32")
    for wrapped in (lora_model("tiny-opt", target_modules=["q_proj", "lm_head"]),  # LoRA on the head
                    lora_model("tiny-opt", modules_to_save=["lm_head"])):  # a trainable copy of the head
        assert "the output head is a" in fh.fused_head_reason(wrapped, cpu, True, "mask", "fp32")
    saved = fh.FUSED_PRECISIONS
    fh.FUSED_PRECISIONS = frozenset({"fp32"})  # as bench/bench_train.py turns it off (_logits configs)
    try:
        assert "bf16 training" in fh.fused_head_reason(model, cpu, True, "mask", "bf16")
        assert fh.fused_head_reason(model, cpu, True, "mask", "fp32") is None
    finally:
        fh.FUSED_PRECISIONS = saved
    gemma_like = load_model(ModelConfig("builtin:tiny-llama"))
    gemma_like.config.model_type = "gemma2"  # final_logit_softcapping after the head
    assert "gemma2" in fh.fused_head_reason(gemma_like, cpu, True, "mask", "fp32")


def test_training_with_the_fused_head_lowers_the_loss_and_keeps_the_base(tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, epochs=3)
    cfg.train.precision = "fp32"
    res = train(cfg, progress=False)
    summary = json.loads((res.output_dir / "train_summary.json").read_text())
    assert summary["lm_head_loss"] == "fused"
    losses = [json.loads(line)["loss"] for line in open(res.output_dir / "train_log.jsonl")]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    base = load_model(ModelConfig("builtin:tiny-opt"))
    trained = res.model.get_base_model() if hasattr(res.model, "get_base_model") else res.model
    fresh = dict(base.named_parameters())
    for n, p in trained.named_parameters():
        if "lora_" not in n:
            key = n.replace("base_layer.", "")
            assert torch.equal(p, fresh[key]), n  # the frozen base (the tied head included) is untouched
    head = trained.get_output_embeddings()
    assert "forward" not in vars(head) and head.weight is trained.get_input_embeddings().weight
    # the memory estimate counts one vocabulary block, not (positions, vocabulary) logits
    assert summary["memory"]["estimate"]["lm_head"] < 2 * 4 * 9 * 4 * 50265


@pytest.mark.skipif(not fh.PackedHead.available() or bf16_unsupported_reason() is not None,
                    reason="bf16 training falls back to fp32 here")
def test_bf16_training_with_the_packed_head_lowers_the_loss(tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, model="builtin:tiny-bloom", epochs=3)
    cfg.train.precision = "bf16"
    res = train(cfg, progress=False)
    summary = json.loads((res.output_dir / "train_summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["lm_head_loss"] == "fused"
    losses = [json.loads(line)["loss"] for line in open(res.output_dir / "train_log.jsonl")]
    assert losses[0] > losses[1] > losses[2]
    base = dict(load_model(ModelConfig("builtin:tiny-bloom")).named_parameters())
    trained = res.model.get_base_model()
    for n, p in trained.named_parameters():
        if "lora_" not in n:
            assert p.dtype == torch.float32 and torch.equal(p, base[n.replace("base_layer.", "")]), n


def test_full_fine_tuning_keeps_the_logits_path(tmp_path, one_thread):
    cfg = tiny_cfg(tmp_path, method="full", epochs=1)
    cfg.train.precision = "fp32"
    res = train(cfg, progress=False)
    assert json.loads((res.output_dir / "train_summary.json").read_text())["lm_head_loss"] == "logits"
