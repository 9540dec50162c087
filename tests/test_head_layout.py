"""bf16 LoRA training on a CPU stores the frozen LM head's bf16 copy column-major (faster input gradient): the
same values, the same loss and LoRA gradients, tying kept, and the base weights back unchanged afterwards.
And transformers' multi-op tanh-GELU modules run as one op: the same function up to bf16 rounding, put back after."""

from __future__ import annotations

import copy

import pytest
import torch
from bf16lora import lora_model, loss_and_grads
from safetensors.torch import load_file
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

import clmtune.train as train_mod
import clmtune.train.setup as setup_mod
from clmtune.train import train
from clmtune.inference import TanhGELU
from clmtune.train.precision import (bf16_unsupported_reason, column_major_bf16, frozen_matmul_weights_to_bf16,
                                     one_op_tanh_gelu, output_head_weight, restore_modules, restore_weights)


def test_column_major_copy_has_the_same_values():
    w = torch.randn(101, 24)
    c = column_major_bf16(w, rows=8)  # 101 rows: the last block is short
    assert c.shape == w.shape and c.dtype == torch.bfloat16 and c.stride() == (1, 101)
    assert torch.equal(c, w.to(torch.bfloat16))


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])  # OPT ties the head to the input embedding; LLaMA not
def test_column_major_head_gives_the_same_loss_and_gradients(name, one_thread):
    row = lora_model(name)
    col = copy.deepcopy(row)
    before = {n: p.detach().clone() for n, p in col.named_parameters()}
    ids = torch.randint(5, 1000, (3, 12))
    swapped_row = frozen_matmul_weights_to_bf16(row)
    swapped_col = frozen_matmul_weights_to_bf16(col, column_major_head=True)
    head = output_head_weight(col)
    assert head is not None and head.dtype == torch.bfloat16 and head.stride() == (1, head.shape[0])
    assert torch.equal(head, output_head_weight(row))
    tied = col.get_input_embeddings().weight is head
    assert tied == (name == "tiny-opt")  # tying is kept: the embedding reads the same (column-major) tensor
    loss_row, grads_row = loss_and_grads(row, ids)
    loss_col, grads_col = loss_and_grads(col, ids)
    assert grads_row.keys() == grads_col.keys() and any("lora_A" in n for n in grads_col)
    # the same bf16 products: PyTorch's mm gave bit-identical results for both layouts here and on the bench
    assert torch.equal(loss_col, loss_row)
    for n in grads_row:
        assert torch.equal(grads_col[n], grads_row[n]), n
    restore_weights(swapped_col)
    restore_weights(swapped_row)
    after = dict(col.named_parameters())
    for n, p in before.items():  # the base weights (fp32, row-major) are back, untouched
        assert after[n].dtype == p.dtype and after[n].is_contiguous() and torch.equal(after[n], p), n


def test_a_trained_or_wrapped_head_is_left_alone():
    assert output_head_weight(lora_model("tiny-opt", target_modules=["q_proj", "lm_head"])) is None  # LoRA on the head
    model = lora_model("tiny-opt", modules_to_save=["lm_head"])  # a trainable copy of the head
    assert output_head_weight(model) is None
    swapped = frozen_matmul_weights_to_bf16(model, column_major_head=True)
    assert all(w.is_contiguous() for w, _ in swapped)
    restore_weights(swapped)


@pytest.mark.slow
@pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="train() falls back to fp32 on this CPU")
def test_training_with_the_column_major_head_writes_the_same_adapter(tmp_path, one_thread, monkeypatch):
    """train() in bf16 on a CPU uses the column-major head where the loss is not fused (fp32 training does not);
    forcing the row-major one gives the same adapter, bit for bit."""
    import clmtune.train.fusedhead as fh

    monkeypatch.setattr(fh, "FUSED_PRECISIONS", frozenset())  # the logits path, whose head is column-major
    real = setup_mod.frozen_matmul_weights_to_bf16
    seen = []

    def spy(model, column_major_head=False, keep=()):
        seen.append(column_major_head)
        return real(model, column_major_head, keep)

    monkeypatch.setattr(setup_mod, "frozen_matmul_weights_to_bf16", spy)
    train(tiny_cfg(tmp_path, "lora", name="fp32", max_steps=1, precision="fp32"), progress=False)
    assert seen == []  # fp32 keeps its weights as they are
    col = train(tiny_cfg(tmp_path, "lora", model="builtin:tiny-gpt2", name="col", max_steps=3, precision="bf16"),
                progress=False)
    monkeypatch.setattr(setup_mod, "frozen_matmul_weights_to_bf16", lambda m, c=False, keep=(): real(m, False, keep))
    row = train(tiny_cfg(tmp_path, "lora", model="builtin:tiny-gpt2", name="row", max_steps=3, precision="bf16"),
                progress=False)
    assert seen == [True]
    assert not any(isinstance(m, TanhGELU) for m in col.model.modules())  # the returned model has its own modules
    a = load_file(col.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(row.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert col.final_loss == row.final_loss and col.final_loss < col.first_loss
    head = col.model.get_output_embeddings().weight  # the returned model is the fp32 one, as saved
    assert head.dtype == torch.float32 and head.is_contiguous()


@pytest.mark.parametrize("name,act", [("tiny-bloom", "BloomGelu"), ("tiny-gpt2", "NewGELUActivation")])
def test_one_op_tanh_gelu_computes_the_same_function(name, act, one_thread):
    model = lora_model(name)
    ids = torch.randint(5, 1000, (2, 10))
    frozen_matmul_weights_to_bf16(model, column_major_head=True)
    loss_ref, grads_ref = loss_and_grads(model, ids)
    originals = [m for m in model.modules() if type(m).__name__ == act]
    swaps = one_op_tanh_gelu(model)
    assert len(swaps) == len(originals) >= 2 and [m for _, _, m in swaps] == originals
    assert not any(type(m).__name__ == act for m in model.modules())
    assert sum(isinstance(m, TanhGELU) for m in model.modules()) == len(originals)
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(TanhGELU()(x), originals[0](x), atol=1e-6, rtol=1e-6)  # fp32: the same function
    loss, grads = loss_and_grads(model, ids)
    # bf16 rounding apart, no more (measured: loss 4-6e-6 relative, gradient norms 0.4-0.9 %)
    assert abs(float(loss) - float(loss_ref)) < 1e-4 * abs(float(loss_ref))
    for n in grads:
        assert (grads[n] - grads_ref[n]).norm() <= 0.02 * grads_ref[n].norm() + 1e-6, n
    restore_modules(swaps)
    assert [m for m in model.modules() if type(m).__name__ == act] == originals
    loss_back, _ = loss_and_grads(model, ids)
    assert torch.equal(loss_back, loss_ref)


@pytest.mark.skipif(bf16_unsupported_reason() is not None, reason="no native bf16 on this CPU")
def test_bf16_lora_training_runs_tanh_gelu_as_one_op(tmp_path, monkeypatch, one_thread):
    """The recipe swaps GPT-2's multi-op GELU for one op while it trains (the fused head loss's first version
    dropped that call unnoticed: every other test passed) and puts the original modules back afterwards."""
    seen = []

    def recording(model):
        swaps = train_mod.precision.one_op_tanh_gelu(model)
        seen.append(len(swaps))
        return swaps

    monkeypatch.setattr(setup_mod, "one_op_tanh_gelu", recording)
    result = train(tiny_cfg(tmp_path, model="builtin:tiny-gpt2", epochs=1, precision="bf16"), progress=False)
    assert seen and seen[0] >= 2  # one swap per layer's activation
    assert not any(isinstance(m, TanhGELU) for m in result.model.modules())
    assert any(type(m).__name__ == "NewGELUActivation" for m in result.model.modules())
