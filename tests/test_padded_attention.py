"""Left-padded training batches under SDPA: no fully masked attention row (models.peft_methods.self_attending_mask).

On an H200, fine-tuning head-dim-64 GPT-2 models stopped with a NaN gradient norm at the first padded batch whose
length was a multiple of 32: CUDA's memory-efficient SDPA kernel gives NaN for a fully masked query row (a left pad
sees no real key under the causal mask), and the NaN reaches the real rows through their 0 attention weights on the
pads. The CPU kernels return 0 for such rows, so here a stand-in SDPA with the same NaN behaviour (a plain softmax
over nothing) shows what the mask prevents.
"""

from __future__ import annotations

import pytest
import torch

import clmtune.models.peft_methods as peft_methods
from clmtune.config import ModelConfig, PeftSettings
from clmtune.data import collate
from clmtune.errors import ClmtuneError
from clmtune.models import apply_peft, forward_inputs, load_model, load_tokenizer, self_attending_mask
from clmtune.train import causal_lm_loss, train
from tinyrun import one_thread, tiny_cfg  # noqa: F401 - fixture


def nan_on_empty_rows_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, scale=None, is_causal=False, **kw):
    """SDPA as a plain softmax: a row with no allowed key gives NaN (as CUDA's memory-efficient kernel does)."""
    scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return scores.softmax(-1) @ value


def test_self_attending_mask_exact():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    got = self_attending_mask(mask)
    assert got.shape == (2, 1, 4, 4) and got.dtype == torch.bool
    assert got[0, 0].int().tolist() == [[1, 0, 0, 0],   # pad: itself only (else a fully masked row)
                                        [0, 1, 0, 0],   # pad
                                        [0, 0, 1, 0],   # first real token: real keys up to itself
                                        [0, 0, 1, 1]]
    assert torch.equal(got[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())


def _padded_batch(tok):
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in ("short", "a longer training row here")]
    batch = collate([{"input_ids": i, "labels": i} for i in ids], tok.pad_token_id)  # an lm batch
    assert not batch["attention_mask"].all()  # left padding in row 0
    return batch, batch.pop("labels")


@pytest.fixture
def mask_everywhere(monkeypatch):
    """The mask is on for GPUs by default (CPU kernels do not NaN); here it is tested on the CPU."""
    monkeypatch.setattr(peft_methods, "SELF_ATTENDING_PADS", True)


def test_off_on_the_cpu_by_default():
    tok = load_tokenizer(ModelConfig(name_or_path="builtin:tiny-gpt2"))
    batch, _ = _padded_batch(tok)
    assert peft_methods.SELF_ATTENDING_PADS is None
    model = load_model(ModelConfig(name_or_path="builtin:tiny-gpt2"))
    assert forward_inputs(model, batch, backward=True)["attention_mask"].dim() == 2


@pytest.mark.parametrize("name", ["builtin:tiny-gpt2", "builtin:tiny-llama", "builtin:tiny-opt"])
def test_training_mask_keeps_loss_and_gradients(name, one_thread, mask_everywhere):
    """The 4D mask changes nothing for the real positions: loss and LoRA gradients equal to transformers' own
    padding mask (CPU SDPA), and it is used only where it should be."""
    tok = load_tokenizer(ModelConfig(name_or_path=name))
    torch.manual_seed(0)
    model = apply_peft(load_model(ModelConfig(name_or_path=name)), PeftSettings(method="lora", r=4)).eval()  # no dropout
    assert model.config._attn_implementation == "sdpa"
    batch, labels = _padded_batch(tok)
    grads = []
    for backward in (False, True):
        inputs = forward_inputs(model, batch, backward=backward)
        assert inputs["attention_mask"].dim() == (4 if backward else 2)
        model.zero_grad()
        loss = causal_lm_loss(model(**inputs).logits, labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    full = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9, 10]}], tok.pad_token_id)
    assert forward_inputs(model, full, backward=True)["attention_mask"].dim() == 2  # no padding: nothing to fix


def test_bloom_and_eager_keep_the_2d_mask(mask_everywhere):
    bloom = ModelConfig(name_or_path="builtin:tiny-bloom")
    batch, _ = _padded_batch(load_tokenizer(bloom))
    assert forward_inputs(load_model(bloom), batch, backward=True)["attention_mask"].dim() == 2
    eager = load_model(ModelConfig(name_or_path="builtin:tiny-gpt2", attn_implementation="eager"))
    assert forward_inputs(eager, batch, backward=True)["attention_mask"].dim() == 2


@pytest.mark.slow
def test_training_survives_a_kernel_that_nans_fully_masked_rows(tmp_path, monkeypatch, one_thread):
    """With the stand-in kernel, training a GPT-2 on left-padded batches stops on a NaN gradient norm unless the
    pads attend to themselves."""
    import transformers.integrations.sdpa_attention as sdpa_module

    monkeypatch.setattr(sdpa_module.torch.nn.functional, "scaled_dot_product_attention", nan_on_empty_rows_sdpa)
    monkeypatch.setattr(peft_methods, "SELF_ATTENDING_PADS", False)
    with pytest.raises(ClmtuneError, match="training stopped at step 1: the loss is nan"):
        train(tiny_cfg(tmp_path, model="builtin:tiny-gpt2", name="off", epochs=1), progress=False)
    monkeypatch.setattr(peft_methods, "SELF_ATTENDING_PADS", True)
    result = train(tiny_cfg(tmp_path, model="builtin:tiny-gpt2", name="on", epochs=2), progress=False)
    assert torch.isfinite(torch.tensor([result.first_loss, result.final_loss])).all()
    assert result.final_loss < result.first_loss
