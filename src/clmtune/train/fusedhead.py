"""Cross-entropy through a frozen LM head that reads the head's weight once per step (adapter training on a CPU).

Today's path computes ``logits = h @ W^T`` on the N supervised positions (an (N, V) tensor), the loss with
``F.cross_entropy`` on its fp32 copy, and in the backward ``grad_h = grad_logits @ W``: the (V, d) weight is read
twice per step (BLOOM: 250,880 x 1024, 0.5 GB in bf16), and the (N, V) logits, their fp32 copy and their gradient
are written and read in between. Because the head is frozen and the loss is a sum of per-row cross-entropies, the
gradient with respect to ``h`` is known in the forward pass:

    d/dh_i [lse_i - z_i,t_i] = softmax(z_i) @ W - W[t_i]

so this walks the vocabulary in blocks (W_b: a few MB, still in the cache between its two uses), flash-attention
style with an online softmax per row:

    z = h @ W_b^T;  m' = max(m, rowmax z);  e = exp(z - m')
    s = s * exp(m - m') + rowsum e;  acc = acc * exp(m - m') + e @ W_b;  m = m'

then ``loss_i = m + log s - h_i . W[t_i]`` and ``grad_h_i = acc / s - W[t_i]``. Only ``grad_h`` (N, d) is kept for
the backward: no logits tensor, no second pass over W. The idea of Apple's "Cut Cross-Entropy" (Wijmans et al.,
2024) and Liger-Kernel's fused linear cross-entropy (GPU kernels, which torch and transformers do not provide for
CPUs: hence this loop).

Exact in spirit: the same loss definition as ``clmtune.train.loss.causal_lm_loss`` with ``reduction="sum"`` (no
label smoothing, no ignore_index inside: the rows are already the supervised ones). It differs from the logits path by
rounding only: in bf16 the block logits are bf16 products as before, but the target logit and the gradient are
accumulated in fp32 (the logits path's gradient is a bf16 product of bf16-rounded softmax values). Only for a plain linear
head without bias whose weight does not train, on models whose forward applies nothing after the head
(``FUSED_MODEL_TYPES``); ``fused_head_reason`` says why not otherwise, and training then takes the logits path.

Measured on the AMD EPYC (Zen 4, avx512_bf16, no AMX): in fp32 the single pass wins
outright (BLOOM's 24-row head step ~410 ms against ~570 ms). In bf16 it does not by itself: with 24 rows the two
products are bound by the kernel, not by reading W (a cached block is multiplied only ~25 % faster), and PyTorch's
bf16 ``mm`` re-lays out its right operand into oneDNN's pair-interleaved layout at every call. So bf16 training
reads the head from ``PackedHead`` (each block packed once per run, for both products): ~160 ms per 24-row step
against ~210 ms for the logits path on a column-major head, for 2 packed bf16 copies of the head and ~1 s more preparation.
"""

from __future__ import annotations

import torch

BLOCK_WEIGHT_BYTES = 4 << 20
"""Bytes of one vocabulary block of the head's weight: it is read from memory by the first product and must still be
in the cache (L2/L3) for the second. Measured on the AMD EPYC (Zen 4, 1 MB L2 per core, 32 MB L3), BLOOM's head,
24 rows, one thread: blocks of 1-4 MB best."""

BLOCK_LOGIT_BYTES = 16 << 20
"""Upper bound of one block's fp32 logits (rows x block): with thousands of supervised rows (chat, ``lm``) the block
shrinks so that the working set stays small."""

FUSED_MODEL_TYPES = frozenset({"gpt2", "bloom", "llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox"})
"""Architectures whose ``ForCausalLM.forward`` returns ``lm_head(hidden)`` unchanged (checked in transformers 5's
sources): no logit soft-capping (Gemma 2), no logit scale (Cohere), no bias."""


def block_rows(n_rows: int, vocab: int, hidden: int, itemsize: int) -> int:
    """Vocabulary rows per block for ``n_rows`` supervised rows against a (vocab, hidden) weight of ``itemsize``."""
    rows = min(BLOCK_WEIGHT_BYTES // (hidden * itemsize), BLOCK_LOGIT_BYTES // (4 * max(n_rows, 1)))
    return max(256, min(vocab, rows))


def fused_head_bytes(rows: int, weight: torch.Tensor, packed: bool = False) -> int:
    """Memory of this loss for ``rows`` supervised positions (``clmtune.memory``'s LM-head line): one vocabulary
    block's logits and exponentials in fp32, the (rows, hidden) fp32 gradient, accumulator and target rows; no
    (rows, vocabulary) tensor. ``packed``: the blocks of a ``PackedHead`` (bf16) rather than of ``weight``."""
    vocab, hidden = weight.shape
    block = (max(256, min(vocab, BLOCK_WEIGHT_BYTES // (2 * hidden))) if packed
             else block_rows(rows, vocab, hidden, weight.element_size()))
    return 4 * rows * (2 * block + 3 * hidden)


class PackedHead:
    """bf16 training on a CPU: the frozen head's vocabulary blocks packed once by oneDNN, each twice: W_b for
    ``h @ W_b^T`` and W_b^T for ``e @ W_b`` (``clmtune.packed``: PyTorch's plain bf16 ``mm`` re-lays out its right
    operand into oneDNN's pair-interleaved bf16 layout at every call, a pass over the block per product).

    Why both: bf16 dot-product instructions pair elements along the contracted dimension, which is the hidden size
    for the first product and the vocabulary for the second, so no single layout serves both. Memory: 2 bf16
    copies of the head (BLOOM-560m: 2 x 0.5 GB), in place of the one bf16 copy plain bf16 training keeps; the head
    Parameter itself stays fp32 (a tied input embedding reads it as before training). Preparation: ~1.3 s for
    BLOOM's 250,880 x 1024 head on one thread, once per run.
    """

    def __init__(self, weight: torch.Tensor):
        from clmtune.packed import pack

        vocab, hidden = weight.shape
        self.shape = (vocab, hidden)
        self.block = max(256, min(vocab, BLOCK_WEIGHT_BYTES // (2 * hidden)))
        self.forward_blocks, self.backward_blocks = [], []
        # One bf16 buffer and one transposed buffer, reused: fresh temporaries per block interleave with the packed
        # blocks on the heap and stay as holes (measured: 8 MB kept per 4 MB block, 1.9 GB instead of 1 GB here).
        buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for v0 in range(0, vocab, self.block):
                rows = min(self.block, vocab - v0)
                if rows not in buffers:
                    buffers[rows] = (torch.empty(rows, hidden, dtype=torch.bfloat16, device=weight.device),
                                     torch.empty(hidden, rows, dtype=torch.bfloat16, device=weight.device))
                w, w_t = buffers[rows]
                w.copy_(weight[v0:v0 + rows])
                w_t.copy_(w.t())
                self.forward_blocks.append(pack(w))  # oneDNN writes a new tensor: the buffers can be reused
                self.backward_blocks.append(pack(w_t))
        self.weight = weight  # the rows of the targets are read from it

    @property
    def nbytes(self) -> int:
        return 2 * 2 * self.shape[0] * self.shape[1]

    @staticmethod
    def available() -> bool:
        try:
            from clmtune.packed import mkldnn_ops

            mkldnn_ops()
            return True
        except (AttributeError, RuntimeError):
            return False


def _online_cross_entropy(h: torch.Tensor, blocks, target_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The online softmax over vocabulary blocks that both paths share (see the module docstring).

    h (N, d) in the products' dtype; ``blocks`` yields, block after block, its logits z = h @ W_b^T (N, b) and a
    function that adds e @ W_b to the (N, d) fp32 accumulator (e: the block's (N, b) fp32 exponentials);
    target_rows (N, d) fp32: W[target] as the products saw it. Returns (the summed loss, its fp32 gradient for h).
    """
    n, d = h.shape
    run_max = torch.full((n,), float("-inf"), device=h.device)  # (N,)
    run_sum = torch.zeros(n, device=h.device)  # (N,) sum of exp(z - run_max)
    acc = torch.zeros(n, d, device=h.device)  # (N, d) sum of exp(z - run_max) * W[v]
    for k, (z, add_product) in enumerate(blocks):
        block_max = z.amax(1).float()
        # rescale only when some row's maximum grows (after the first blocks: rarely), a few ops fewer per block
        if k == 0 or bool((block_max > run_max).any()):
            new_max = torch.maximum(run_max, block_max)
            rescale = torch.exp(run_max - new_max)  # (N,); 0 at the first block (exp(-inf))
            run_sum.mul_(rescale)
            acc.mul_(rescale[:, None])
            run_max = new_max
        e = torch.sub(z, run_max[:, None]).exp_()  # (N, b) fp32 (bf16 - fp32 promotes)
        run_sum.add_(e.sum(1))
        add_product(acc, e)
    loss = (run_max + run_sum.log() - (h.float() * target_rows).sum(1)).sum()
    return loss, acc.div_(run_sum[:, None]).sub_(target_rows)


@torch.no_grad()
def packed_ce_forward(hidden: torch.Tensor, head: PackedHead, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_ce_forward`` on a ``PackedHead``: bf16 products on the packed blocks, softmax statistics in fp32."""
    from clmtune.packed import packed_matmul

    h = hidden.to(torch.bfloat16)

    def blocks():
        for fwd, bwd in zip(head.forward_blocks, head.backward_blocks):
            yield (packed_matmul(h, fwd, None),  # (N, b) bf16
                   lambda acc, e, bwd=bwd: acc.add_(packed_matmul(e.to(torch.bfloat16), bwd, None)))

    target_rows = head.weight[targets].to(torch.bfloat16).float()  # the bf16 values the products used
    loss, grad = _online_cross_entropy(h, blocks(), target_rows)
    return loss, grad.to(hidden.dtype)


@torch.no_grad()
def fused_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of cross_entropy(hidden @ weight.T, targets) in fp32, its gradient with respect to hidden).

    hidden (N, d) float, weight (V, d) in the compute dtype (bf16 or fp32), targets (N,) long in [0, V). The
    products run in weight's dtype (fp32 accumulation inside the kernels), the softmax statistics in fp32.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    h = hidden.to(weight.dtype)
    block = block_rows(n, vocab, d, weight.element_size())

    def blocks():
        for v0 in range(0, vocab, block):
            w = weight[v0:v0 + block]  # (b, d), a view
            z = torch.mm(h, w.t())  # (N, b) in the compute dtype, as on the logits path
            if weight.dtype == torch.float32:
                yield z, lambda acc, e, w=w: acc.addmm_(e, w)
            else:
                yield z, lambda acc, e, w=w: acc.add_(torch.mm(e.to(w.dtype), w))

    loss, grad = _online_cross_entropy(h, blocks(), weight[targets].float())
    return loss, grad.to(hidden.dtype)


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """``sum_i cross_entropy(hidden_i @ weight.T, targets_i)`` with the gradient for ``hidden`` computed in the
    forward (``fused_ce_forward``); ``weight`` gets no gradient (it must be frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, packed=None):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly above
            loss, grad = (fused_ce_forward(hidden, weight, targets) if packed is None
                          else packed_ce_forward(hidden, packed, targets))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None


def frozen_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     packed: PackedHead | None = None) -> torch.Tensor:
    """Summed cross-entropy of the (N, d) supervised hidden states against the frozen head (see the module);
    ``packed``: the same head as a ``PackedHead`` (bf16 products on its packed blocks)."""
    if weight.requires_grad:
        raise ValueError("frozen_head_loss needs a frozen head weight (it returns no gradient for it)")
    return FrozenHeadCrossEntropy.apply(hidden, weight, targets, packed)


FUSED_PRECISIONS = frozenset({"fp32", "bf16"})
"""Training precisions that take the fused path: those where it measured faster end to end than the logits path
(``bench/bench_train.py``'s ``_logits`` configs empty this set to compare)."""


def fused_head_reason(model, device: torch.device, is_peft: bool, head_mode: str | None, precision: str,
                      deepspeed: bool = False, any_device: bool = False) -> str | None:
    """``None`` when training may take the fused path, else why not (one line, for the log). ``any_device``: the
    loss will be ``train.speed.chunked_head_loss`` (``train.chunked_loss``), which serves every device and precision."""
    from clmtune.models import unwrap

    if device.type != "cpu" and not any_device:
        return f"device {device.type} (the fused head is for CPUs; GPUs keep the library path unless train.chunked_loss)"
    if precision not in FUSED_PRECISIONS and not any_device:
        return f"{precision} training (measured no faster fused on a CPU)"
    if precision == "bf16" and not PackedHead.available() and not any_device:
        return "bf16 without oneDNN's packed-weight ops in this torch"
    if not is_peft:
        return "full fine-tuning trains the head"
    if deepspeed:
        return "DeepSpeed"
    if head_mode != "mask":
        return "the LM head does not run on a mask of the supervised positions"
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    model_type = getattr(base.config, "model_type", None)
    if model_type not in FUSED_MODEL_TYPES:
        return f"model type {model_type!r} is not one whose forward returns the head's output unchanged"
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__} (an adapter on it, or a custom head)"
    if head.bias is not None:
        return "the output head has a bias"
    if head.weight.requires_grad:
        return "the output head's weight trains"
    return None


def fused_head_module(model) -> torch.nn.Linear:
    """The output head the fused path bypasses (call after ``fused_head_reason`` returned None)."""
    from clmtune.models import unwrap

    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return base.get_output_embeddings()
