"""bf16 matmuls on weights packed once by oneDNN (CPU): for inference (``PackedLinear``) and for the frozen base
weights of bf16 LoRA training (``pack_frozen_linears``).

Why hand-written: PyTorch's own bf16 ``F.linear`` on a CPU re-lays out the weight for every call or, for few rows,
takes a matrix-vector path that converts to fp32 and gains nothing over fp32. oneDNN's packed weight
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, the kernels inductor uses for frozen bf16
linears under ``torch.compile(freezing)``) does the layout once. Measured on an AMD EPYC with avx512_bf16, one
thread (bench/README.md): 768 x 3072 with one row ~90 us packed against ~200 us fp32 and ~190-270 us plain bf16;
BLOOM's 250,880 x 1024 LM head on 24 rows: forward 74 ms packed vs 103 ms, backward (input gradient) 68 ms packed
vs 151 ms. ``torch.compile`` itself compiles for minutes on a small CPU (and crashed on generation with a static
cache in our test), so it is not the default route.
These are private torch ops: every caller falls back to the plain path when they are missing.
"""

from __future__ import annotations

import types

import torch

def mkldnn_ops():
    return torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise

def pack(weight_out_in: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of a bf16 (out, in) weight."""
    return mkldnn_ops()[0](weight_out_in.contiguous())

def packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  activation: tuple[str, str] = ("none", "")) -> torch.Tensor:
    """``x @ W^T + b`` in bf16 for any leading dimensions of x, then ``activation`` (oneDNN's post-op: ``("gelu",
    "tanh")``, ``("gelu", "none")`` = exact erf GELU, ``("relu", "")``) applied to the fp32 result before rounding."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return mkldnn_ops()[1](x.contiguous(), packed, bias, activation[0], [], activation[1])

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
        self.packed = pack(weight)
        self.activation = ("none", "")
        """A fused activation (``clmtune.inference.fuse_activations``), applied by the same oneDNN call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(x, self.packed, self.bias, self.activation)

    def extra_repr(self) -> str:
        act = "" if self.activation[0] == "none" else f", then {'/'.join(a for a in self.activation if a)} fused"
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed by oneDNN{act}"

class _FrozenPackedMatmul(torch.autograd.Function):
    """y = x W^T + b on a frozen W: forward with W packed, backward (gradient of x only) with W^T packed."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, bias):
        ctx.packed_t = packed_t
        return packed_matmul(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        return packed_matmul(grad, ctx.packed_t, None), None, None, None

def weight_out_in(module) -> torch.Tensor | None:
    """The (out, in) weight of a plain ``nn.Linear`` or GPT-2 ``Conv1D`` (stored in x out), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":
        return module.weight.t()
    return None

class PackedFrozen:
    """What ``pack_frozen_linears`` changed; ``undo()`` puts the modules' own forward back."""

    def __init__(self):
        self.modules: list = []

    def undo(self) -> None:
        for m in self.modules:
            del m.forward
            del m._packed
        self.modules.clear()

def pack_frozen_linears(model) -> PackedFrozen:
    """For bf16 training on a CPU: every frozen bf16 ``nn.Linear``/``Conv1D`` (weight and bias without gradient)
    runs forward and backward on oneDNN-packed copies of W and W^T (memory: 2 more bf16 copies of those weights).
    Gradients flow to the input exactly as through the module itself (no weight gradient: it is frozen)."""
    done = PackedFrozen()
    for module in model.modules():
        w = weight_out_in(module)
        if w is None or w.requires_grad or w.dtype != torch.bfloat16 or w.device.type != "cpu":
            continue
        bias = module.bias
        if bias is not None and bias.requires_grad:
            continue
        b16 = None if bias is None else bias.detach().to(torch.bfloat16)
        module._packed = (pack(w.detach()), pack(w.detach().t()), b16)

        def forward(self, x):
            p, pt, b = self._packed
            return _FrozenPackedMatmul.apply(x, p, pt, b)

        module.forward = types.MethodType(forward, module)
        done.modules.append(module)
    return done
