"""Frozen bf16 matmuls on oneDNN-packed weights (clmtune.packed): same loss and LoRA gradients as bf16 autocast."""

from __future__ import annotations

import copy

import pytest
import torch
from bf16lora import lora_model, loss_and_grads

from clmtune.device import native_bf16
from clmtune.packed import pack_frozen_linears

pytestmark = pytest.mark.skipif(not native_bf16("cpu")[0], reason="this CPU has no native bf16 matrix units")


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-gpt2-zh"])  # nn.Linear and GPT-2 Conv1D
def test_packed_frozen_matmuls_give_the_same_loss_and_gradients(name):
    model = lora_model(name, frozen_bf16=True)
    ids = torch.randint(5, 1000, (3, 12))
    loss_ref, grads_ref = loss_and_grads(model, ids)
    packed_model = copy.deepcopy(model)
    handle = pack_frozen_linears(packed_model)
    assert len(handle.modules) >= 4  # the frozen base layers (and the LM head)
    loss, grads = loss_and_grads(packed_model, ids)
    assert abs(float(loss) - float(loss_ref)) < 1e-2 * max(1.0, abs(float(loss_ref)))
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for n in grads:
        num = (grads[n] - grads_ref[n]).norm()
        assert num <= 0.05 * grads_ref[n].norm() + 1e-6, n  # bf16 rounding, not a different gradient
    handle.undo()
    assert "forward" not in vars(handle.modules[0]) if handle.modules else True
    loss_back, _ = loss_and_grads(packed_model, ids)
    assert torch.equal(loss_back, loss_ref)  # undo() restores the modules' own forward exactly
