"""bf16 matmuls on weights packed once by oneDNN (CPU): for inference (``PackedLinear``) and for the frozen LM
head's vocabulary blocks in the fused training loss (``clmtune.train.fusedhead``). The other frozen weights of bf16
training are not packed: forward and backward on packed copies of W and W^T cost more CPU time per epoch than
bf16 autocast on the plain weights, and two more copies of memory.

Why hand-written: PyTorch's own bf16 ``F.linear`` on a CPU re-lays out the weight for every call or, for few rows,
takes a matrix-vector path that converts to fp32 and gains nothing over fp32. oneDNN's packed weight
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, the kernels inductor uses for frozen bf16
linears under ``torch.compile(freezing)``) does the layout once. Measured on an AMD EPYC with avx512_bf16, one
thread: 768 x 3072 with one row ~90 us packed against ~200 us fp32 and ~190-270 us plain bf16;
BLOOM's 250,880 x 1024 LM head on 24 rows: forward 74 ms packed vs 103 ms, backward (input gradient) 68 ms packed
vs 151 ms. ``torch.compile`` itself compiles for minutes on a small CPU (and crashed on generation with a static
cache in our test), so it is not the default route.
These are private torch ops: every caller falls back to the plain path when they are missing.
"""

from __future__ import annotations

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
