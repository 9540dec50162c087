"""Put a model into the precision chosen for inference (generation, evaluation): fp32 as loaded, or bf16.

bf16 on a CPU with native bf16 units (see ``clmtune.device``): the weights are cast to bf16 and every
``nn.Linear`` / GPT-2 ``Conv1D`` runs on a weight that oneDNN has packed once into its own blocked layout
(``PackedLinear``). Measured on an AMD EPYC with avx512_bf16 (bench/README.md): a 768 x 3072 matmul of one row
takes ~90 us packed against ~200 us in fp32 and ~190-270 us as a plain bf16 ``F.linear`` (PyTorch's bf16
matrix-vector path converts to fp32 and gains nothing); with 8-32 rows the packed bf16 matmul is 3x fp32.
Hand-written because the library route to the same kernels, ``torch.compile`` with inductor's ``freezing``,
compiles for minutes on a small CPU before the first token, and recompiles for every new shape without a static
cache; the packing here takes well under a second.

Inference only: ``PackedLinear`` has no backward, and the model should not be trained or saved afterwards (the
fp32 weights are gone; reload it for that).
"""

from __future__ import annotations

import logging

import torch

from clmtune.device import resolve_precision

log = logging.getLogger("clmtune")


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with W packed by oneDNN for bf16 (forward only).

    Keeps ``weight`` (the bf16 tensor, shared with a tied embedding) so code that reads ``.weight`` (peft, tied
    heads) still finds it; the packed copy is a plain attribute, not a parameter or buffer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_param=None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = weight_param if weight_param is not None else torch.nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            x = x.to(torch.bfloat16)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed by oneDNN"


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


def model_precision(model) -> str:
    """``bf16`` when the model's floating-point weights are bf16, else ``fp32``."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return "bf16" if p is not None and p.dtype == torch.bfloat16 else "fp32"


def for_inference(model, choice: str = "auto"):
    """The model in the precision ``choice`` (``auto``/``fp32``/``bf16``) resolves to on its device, in place;
    returns (model, precision, reason). Call once, right after loading, before any inference."""
    device = next(model.parameters()).device
    precision, why = resolve_precision(choice, device)
    if precision == "fp32" or getattr(model, "_clmtune_precision", None) == "bf16":
        return model, model_precision(model), why
    model.to(torch.bfloat16)
    packed = 0
    if device.type == "cpu":
        try:
            packed = pack_linears(model)
        except (RuntimeError, AttributeError) as exc:  # a torch build without these oneDNN ops: plain bf16 still works
            log.warning("bf16 inference without packed matmuls (%s)", exc)
    model._clmtune_precision = "bf16"
    log.info("inference in bf16 (%s; %d matmuls packed by oneDNN)", why, packed)
    return model, "bf16", why
