"""What the estimate reads off a built model: the inputs of LoRA-adapted layers, whether they have dropout, and the
extra weight copies that bf16 training keeps (its fp32 originals, autocast's casts)."""

from __future__ import annotations

import torch


def lora_inputs(model) -> int:
    """Input features of every LoRA-adapted linear layer (the sizes their dropout keeps)."""
    total = 0
    for _, module in model.named_modules():
        if hasattr(module, "lora_dropout") and hasattr(module, "base_layer"):
            base = module.base_layer
            w = getattr(base, "weight", None)
            if hasattr(base, "in_features"):
                total += int(base.in_features)
            elif w is not None and w.dim() == 2:  # GPT-2's Conv1D stores (in, out)
                total += int(w.shape[0] if type(base).__name__ == "Conv1D" else w.shape[1])
    return total


def has_lora_dropout(model) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for n, m in model.named_modules()
               if ".lora_dropout." in f".{n}." or n.endswith("lora_dropout"))


def swapped_originals_bytes(swapped, device: torch.device | str) -> int:
    """Bytes of the fp32 originals that bf16 training keeps of the frozen matmul weights
    (``clmtune.train.precision.frozen_matmul_weights_to_bf16``: (parameter, fp32 data) pairs), counted only when they
    live on the training device. On a GPU they do not: the swap happens before the model moves to the device, so
    only the bf16 copies go there and the originals stay in host memory (BLOOM-560m: 2.2 GB the GPU estimate
    counted and the GPU never held)."""
    kind = torch.device(device).type
    return sum(d.numel() * d.element_size() for _, d in swapped if d.device.type == kind)


def frozen_fp32_matmul_params(model) -> int:
    """Parameters of the frozen fp32 Linear/Conv1D weights: what bf16 adapter training stores a bf16 copy of
    (``clmtune.train.precision.frozen_matmul_weights_to_bf16``), keeping the fp32 originals in host memory."""
    seen, total = set(), 0
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        w = module.weight
        if not w.requires_grad and w.dtype == torch.float32 and id(w) not in seen:
            seen.add(id(w))
            total += w.numel()
    return total


def autocast_weight_copies_bytes(model) -> int:
    """bf16 autocast casts every trainable fp32 matmul weight to bf16 at the forward, and the matmul keeps the
    cast for its backward: 2 bytes per such parameter until the backward frees them (full fine-tuning of
    BLOOM-560m: 1.1 GB). Frozen weights are stored in bf16 already (no copy)."""
    seen, total = set(), 0
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        w = module.weight
        if w.requires_grad and w.dtype == torch.float32 and id(w) not in seen:
            seen.add(id(w))
            total += 2 * getattr(w, "ds_numel", w.numel())
    return total
