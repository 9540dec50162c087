"""Frozen bf16 matmuls on oneDNN-packed weights (clmtune.packed): same loss and LoRA gradients as bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch

from peft import LoraConfig, TaskType, get_peft_model

from clmtune.config import ModelConfig
from clmtune.device import native_bf16
from clmtune.models import load_model
from clmtune.packed import pack_frozen_linears

pytestmark = pytest.mark.skipif(not native_bf16("cpu")[0], reason="this CPU has no native bf16 matrix units")


def _lora(name: str):
    torch.manual_seed(0)
    model = load_model(ModelConfig(f"builtin:{name}"))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0))
    for p in model.parameters():  # the frozen weights in bf16, as train.precision=bf16 stores them
        if not p.requires_grad and p.dim() == 2:
            p.data = p.data.to(torch.bfloat16)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so gradients reach A
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def _loss_and_grads(model, ids):
    torch.manual_seed(1)  # the same dropout masks in every call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2-zh"])  # nn.Linear and GPT-2 Conv1D
def test_packed_frozen_matmuls_give_the_same_loss_and_gradients(name):
    model = _lora(name)
    ids = torch.randint(5, 1000, (3, 12))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    packed_model = copy.deepcopy(model)
    handle = pack_frozen_linears(packed_model)
    assert len(handle.modules) >= 4  # the frozen base layers (and the LM head)
    loss, grads = _loss_and_grads(packed_model, ids)
    assert abs(float(loss) - float(loss_ref)) < 1e-2 * max(1.0, abs(float(loss_ref)))
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for n in grads:
        num = (grads[n] - grads_ref[n]).norm()
        assert num <= 0.05 * grads_ref[n].norm() + 1e-6, n  # bf16 rounding, not a different gradient
    handle.undo()
    assert "forward" not in vars(handle.modules[0]) if handle.modules else True
    loss_back, _ = _loss_and_grads(packed_model, ids)
    assert torch.equal(loss_back, loss_ref)  # undo() restores the modules' own forward exactly
