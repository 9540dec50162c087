"""Put a model into the precision chosen for inference (generation, evaluation): fp32 as loaded, or bf16.

bf16 on a CPU with native bf16 units (see ``clmtune.device``): the weights are cast to bf16 and every
``nn.Linear`` / GPT-2 ``Conv1D`` runs on a weight that oneDNN has packed once into its own blocked layout
(``clmtune.packed.PackedLinear``, which says why and what it gains).

Inference only: ``PackedLinear`` has no backward, and the model should not be trained or saved afterwards (the
fp32 weights are gone; reload it for that).
"""

from __future__ import annotations

import logging

import torch

from clmtune.device import resolve_precision
from clmtune.models import merge_adapter
from clmtune.packed import PackedLinear

log = logging.getLogger("clmtune")


def _packable(module) -> tuple[torch.Tensor, torch.nn.Parameter] | None:
    """(weight as out x in, the parameter to keep) for a plain Linear or GPT-2 Conv1D, else None."""
    from transformers.pytorch_utils import Conv1D

    if type(module) is torch.nn.Linear:
        return module.weight.data, module.weight
    if type(module) is Conv1D:  # weight stored in x out
        return module.weight.data.t(), module.weight
    return None


def pack_linears(model) -> int:
    """Replace every plain ``nn.Linear``/``Conv1D`` of a bf16 CPU model with a ``PackedLinear``; returns how many."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            got = _packable(child)
            if got is not None and got[0].dtype == torch.bfloat16 and got[0].device.type == "cpu":
                swaps.append((parent, name, child, got))
    for parent, name, child, (weight, param) in swaps:
        setattr(parent, name, PackedLinear(weight, child.bias, weight_param=param if type(child) is torch.nn.Linear
                                           else None))
    return len(swaps)


# Modules whose forward applies an activation module to the output of a linear layer and uses that output nowhere
# else (transformers 5 source): (linear attribute, activation attribute) by the module's class name.
_LINEAR_THEN_ACT = {"GPT2MLP": ("c_fc", "act"), "BloomMLP": ("dense_h_to_4h", "gelu_impl"),
                    "OPTDecoderLayer": ("fc1", "activation_fn")}
# transformers' activation modules and the oneDNN post-op that computes the same function.
_ONEDNN_ACT = {"NewGELUActivation": ("gelu", "tanh"), "GELUTanh": ("gelu", "tanh"), "BloomGelu": ("gelu", "tanh"),
               "FastGELUActivation": ("gelu", "tanh"), "GELUActivation": ("gelu", "none"), "ReLU": ("relu", "")}
MULTI_OP_TANH_GELU = frozenset({"NewGELUActivation", "BloomGelu", "FastGELUActivation"})
"""transformers' tanh-GELU modules written as several elementwise ops: ``TanhGELU`` computes them as one (here where
they cannot be fused, and in bf16 training, ``clmtune.train.precision.one_op_tanh_gelu``)."""


class TanhGELU(torch.nn.Module):
    """GELU, tanh approximation, as one op. transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``) and BLOOM's
    ``BloomGelu`` write it as 5-6 elementwise ops, each a pass over the (rows x 4*hidden) activations in bf16:
    on GPT-2 12 x 768 they were 25 % of bf16 rank evaluation's time in a profile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model) -> int:
    """bf16 inference on a CPU: where a packed linear layer feeds only an activation (GPT-2/BLOOM MLP, OPT layer),
    oneDNN applies it in the same call (on the fp32 result, before rounding to bf16) and the activation module
    becomes ``Identity``; a tanh-GELU that cannot be fused (an adapter wraps its linear layer) becomes one op
    (``TanhGELU``). The function computed is the same; only bf16 rounding differs. Returns how many were fused."""
    fused = 0
    for module in list(model.modules()):
        names = _LINEAR_THEN_ACT.get(type(module).__name__)
        if names is None:
            continue
        linear, act = (getattr(module, n, None) for n in names)
        post = _ONEDNN_ACT.get(type(act).__name__)
        if isinstance(linear, PackedLinear) and post is not None and linear.activation == ("none", ""):
            linear.activation = post
            setattr(module, names[1], torch.nn.Identity())
            fused += 1
        elif type(act).__name__ in MULTI_OP_TANH_GELU:
            setattr(module, names[1], TanhGELU())
    return fused


def model_precision(model) -> str:
    """``bf16`` when the model's floating-point weights are bf16, else ``fp32``."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return "bf16" if p is not None and p.dtype == torch.bfloat16 else "fp32"


def for_inference(model, choice: str = "auto"):
    """The model in the precision ``choice`` (``auto``/``fp32``/``bf16``) resolves to on its device, in place;
    returns (model, precision, reason). Call once, right after loading, before any inference. bf16 on a CPU merges a
    LoRA-like adapter into the weights first (``merge_adapter``; the returned model is then the plain base model),
    so that its matmuls are packed and its activations fused as a plain model's are."""
    device = next(model.parameters()).device
    precision, why = resolve_precision(choice, device)
    if precision == "fp32" or getattr(model, "_clmtune_precision", None) == "bf16":
        return model, model_precision(model), why
    merged = False
    if device.type == "cpu":  # LoRA layers wrap the base matmuls: merged, they are packed and fused like a plain model's
        plain = merge_adapter(model)
        merged, model = plain is not model, plain
    model.to(torch.bfloat16)
    packed = fused = 0
    if device.type == "cpu":
        try:
            packed = pack_linears(model)
            fused = fuse_activations(model)
        except (RuntimeError, AttributeError) as exc:  # a torch build without these oneDNN ops: plain bf16 still works
            log.warning("bf16 inference without packed matmuls (%s)", exc)
    model._clmtune_precision = "bf16"
    log.info("inference in bf16 (%s; %s%d matmuls packed by oneDNN, %d activations fused into them)", why,
             "adapter merged into the weights, " if merged else "", packed, fused)
    return model, "bf16", why
