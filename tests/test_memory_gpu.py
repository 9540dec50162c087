"""The memory estimate's parts that differ on a GPU (issue 27: 4.1 GB estimated for a 1.68 GB peak in bf16),
proven on the CPU: where the fp32 originals of the bf16 frozen weights live, and autocast's bf16 weight copies."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clmtune.memory import autocast_weight_copies_bytes, swapped_originals_bytes
from clmtune.train.precision import frozen_matmul_weights_to_bf16, restore_weights


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        max_position_embeddings=64))


def test_fp32_originals_count_only_on_the_device_that_holds_them():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    swapped = frozen_matmul_weights_to_bf16(model)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert swapped and all(d.device.type == "cpu" and d.dtype == torch.float32 for _, d in swapped)
    assert swapped_originals_bytes(swapped, "cpu") == 4 * linear
    # training on a GPU: the swap ran before the model moved there, so the originals stay in host memory
    assert swapped_originals_bytes(swapped, torch.device("cuda", 0)) == 0
    restore_weights(swapped)


def test_autocast_keeps_a_bf16_copy_of_each_trainable_weight_for_the_backward():
    """What autograd saves under bf16 autocast (full fine-tuning): a bf16 tensor of each trainable Linear weight's
    shape, as many bytes as autocast_weight_copies_bytes counts."""
    model = tiny_llama().train()
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    shapes = {tuple(w.shape) for w in weights.values()} | {tuple(w.shape)[::-1] for w in weights.values()}  # W, W^T
    saved = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
            saved[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 96, (3, 7))  # 21 tokens: no activation has a weight's shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(input_ids=ids).logits.float().sum().backward()
    assert len(saved) == len(weights)  # one bf16 copy per weight, kept for the backward
    assert sum(saved.values()) == autocast_weight_copies_bytes(model) == 2 * sum(w.numel() for w in weights.values())
    for w in weights.values():  # frozen weights (bf16-stored by training) need no copy
        w.requires_grad_(False)
    assert autocast_weight_copies_bytes(model) == 0
