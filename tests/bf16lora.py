"""Shared by the bf16 LoRA training tests (test_packed, test_head_layout): a tiny LoRA model whose gradients reach
every adapter weight, and its bf16-autocast loss and gradients on fixed dropout masks."""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType, get_peft_model

from clmtune.config import ModelConfig
from clmtune.models import load_model


def lora_model(name: str, frozen_bf16: bool = False, **lora):
    """builtin:NAME with LoRA r=4 (peft's default targets unless ``lora`` says otherwise), in train mode.
    ``frozen_bf16``: the frozen matrices stored in bf16, as ``train.precision: bf16`` stores them."""
    torch.manual_seed(0)
    model = load_model(ModelConfig(f"builtin:{name}"))
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                                             **lora))
    if frozen_bf16:
        for p in model.parameters():
            if not p.requires_grad and p.dim() == 2:
                p.data = p.data.to(torch.bfloat16)
    for n, p in model.named_parameters():  # LoRA B starts at zero: give it values so gradients reach A
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def loss_and_grads(model, ids):
    """(loss, {name: gradient}) of next-token cross-entropy on ``ids`` under bf16 autocast; gradients zeroed after."""
    torch.manual_seed(1)  # the same dropout masks in every call
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads
