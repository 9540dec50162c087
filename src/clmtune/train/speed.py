"""GPU speed paths of the training loop, each behind a ``train.*`` setting and each giving the plain path's loss and
gradients (tests/test_train_gpu_speed.py proves it on tiny models on the CPU; bench/gpu_bench.py measures it).

- ``train.device_loss`` (auto: on CUDA): the loss of each step stays a device tensor and the host reads it only at
  a log line or before a checkpoint (every ``train.log_every`` steps): no host synchronisation per step, so the CPU
  queues the next step's kernels while the GPU runs. Token counts come from the CPU-side collator (``counts``).
  A non-finite loss or gradient norm is still refused before it reaches a checkpoint; with the fused AdamW the
  update of such a step is skipped on the device (``found_inf``, as ``torch.amp.GradScaler`` does).
- ``train.fused_adamw`` (auto: on CUDA): ``torch.optim.AdamW(fused=True)``, one kernel for every parameter's update.
- ``train.compile`` (off): ``torch.compile`` of the model's forward, falling back to eager (logged) when compiling
  fails on the first step.
- ``train.chunked_loss`` (off): on a GPU, the frozen LM head and the cross-entropy in chunks of rows
  (``chunked_head_loss``): the (N, V) logits, their fp32 copy and their gradient never exist whole; the gradient for
  the hidden states is computed chunk by chunk in the forward (the head is frozen), as Liger-Kernel's fused linear
  cross-entropy does with Triton. Written with torch ops, so it runs (and is tested) on a CPU too.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("clmtune")

CHUNK_LOGIT_BYTES = 512 << 20
"""fp32 logits of one chunk of rows (rows x vocabulary x 4 bytes) for ``chunked_head_loss``: BLOOM's 250,880-word
head gives 534 rows per chunk; small next to the activations of a 16k-token step and large enough to keep the GPU's
matrix units busy."""


def resolve_switch(value: bool | None, device: torch.device) -> bool:
    """A ``bool | None`` speed setting: ``None`` (``auto``) means on for CUDA devices only."""
    return device.type == "cuda" if value is None else bool(value)


def make_adamw(params, lr: float, weight_decay: float, fused: bool) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` with the fused (one kernel) implementation where asked; the same update as the
    for-each one up to rounding (PyTorch tests the two against each other)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def skip_update_if_not_finite(optimizer, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """On a fused AdamW, tell its kernel to skip this step when the loss or the gradient norm is not finite
    (``found_inf``, the flag ``GradScaler`` sets), without reading either on the host. False when the optimizer
    cannot (then the check happens on the host at the next log line, before any checkpoint)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not all(g.get("fused") for g in inner.param_groups):
        return False
    bad = ~torch.isfinite(loss)
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm)
    inner.found_inf = bad.float()
    inner.grad_scale = None
    return True


class LossBuffer:
    """The per-step losses and gradient norms as device tensors, read on the host in one go (``flush``)."""

    def __init__(self):
        self.items: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (step, loss per token, grad norm)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.items.append((step, loss.detach(), None if grad_norm is None else grad_norm.detach()))

    def flush(self) -> list[tuple[int, float, float | None]]:
        """(step, loss, grad norm) as floats: one host synchronisation for all steps since the last flush."""
        if not self.items:
            return []
        values = torch.stack([torch.stack([lo.float(), g.float() if g is not None else torch.zeros_like(lo.float())])
                              for _, lo, g in self.items]).tolist()
        out = [(step, v[0], v[1] if g is not None else None) for (step, _, g), v in zip(self.items, values)]
        self.items = []
        return out


def compile_forward(module: torch.nn.Module, **options) -> torch.nn.Module:
    """Compile ``module``'s forward with ``torch.compile``; if compiling (or the compiled code) fails, log why and
    run the eager forward from then on. The first call that fails is re-run eagerly, so a step is never lost.
    Shapes vary from batch to batch: ``dynamic=True`` compiles one graph for them instead of one per shape."""
    eager = module.forward
    compiled = torch.compile(eager, dynamic=options.pop("dynamic", True), **options)
    state = {"ok": True}

    @functools.wraps(eager)
    def forward(*args, **kwargs):
        if state["ok"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001  (any compiler failure: fall back, never fail the run)
                state["ok"] = False
                log.warning("train.compile: torch.compile failed (%s: %s); training without it",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return eager(*args, **kwargs)

    module.forward = forward
    module._clmtune_compile_state = state  # for tests and the run summary
    return module


def compile_ok(module) -> bool | None:
    """Whether ``compile_forward``'s compiled forward is still in use (None: not compiled)."""
    state = getattr(module, "_clmtune_compile_state", None)
    return None if state is None else state["ok"]


def chunk_rows(vocab: int, budget: int = CHUNK_LOGIT_BYTES) -> int:
    return max(1, budget // (4 * vocab))


@torch.no_grad()
def chunked_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of hidden @ weight.T against targets, in fp32; its gradient for hidden), a chunk of
    ``rows`` rows at a time. The products run in weight's dtype (as the plain path's logits), softmax in fp32.
    No host synchronisation: a fixed number of kernels per chunk."""
    n = hidden.shape[0]
    h = hidden.to(weight.dtype)
    grad = torch.empty_like(h)
    loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for r0 in range(0, n, rows):
        hc, tc = h[r0:r0 + rows], targets[r0:r0 + rows]
        z = torch.mm(hc, weight.t()).float()  # (c, V)
        lse = torch.logsumexp(z, 1)
        loss += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
        p = z.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        p.scatter_add_(1, tc[:, None], torch.full_like(tc[:, None], -1, dtype=p.dtype))
        grad[r0:r0 + rows] = torch.mm(p.to(weight.dtype), weight)
    return loss, grad.to(hidden.dtype)


class ChunkedHeadCrossEntropy(torch.autograd.Function):
    """``sum_i cross_entropy(hidden_i @ weight.T, targets_i)`` with the gradient for ``hidden`` computed chunk by
    chunk in the forward; ``weight`` (frozen) gets none."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, grad = chunked_ce_forward(hidden, weight, targets, rows)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the (N, d) supervised hidden states against the frozen (V, d) head, in chunks of
    rows (``CHUNK_LOGIT_BYTES`` of fp32 logits each unless ``rows`` says)."""
    if weight.requires_grad:
        raise ValueError("chunked_head_loss needs a frozen head weight (it returns no gradient for it)")
    return ChunkedHeadCrossEntropy.apply(hidden, weight, targets, rows or chunk_rows(weight.shape[0]))


def chunked_head_bytes(rows: int, weight: torch.Tensor) -> int:
    """Memory of ``chunked_head_loss`` for ``rows`` supervised positions: one chunk's fp32 logits (its softmax
    reuses them) and their cast, and the (rows, d) gradient kept for the backward."""
    vocab, hidden = weight.shape
    c = min(rows, chunk_rows(vocab))
    return c * vocab * (4 + weight.element_size()) + rows * hidden * (weight.element_size() + 4)


def reference_head_loss(hidden, weight, targets) -> torch.Tensor:
    """The plain path for the same rows: logits, fp32 cross-entropy, summed."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


PADDING_FREE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""``train.padding_free``: architectures whose positions come from ``position_ids`` alone and whose attention mask
comes from transformers' ``create_causal_mask``, which turns restarting position ids into one causal block per
sequence when no attention mask is given (``find_packed_sequence_indices``; flash attention takes them as varlen,
FlexAttention as a document mask). Not BLOOM (ALiBi positions come from the attention mask) nor OPT (learned
positions from the mask's cumulative sum); GPT-2 gave another loss than padded batches (transformers 5.25), so it
is left out until that is understood."""


def padding_free_reason(model) -> str | None:
    """``None`` when ``train.padding_free`` can train this (peft-wrapped) model, else why not."""
    import inspect

    from clmtune.models import input_virtual_tokens, unwrap

    unwrapped = unwrap(model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    model_type = getattr(base.config, "model_type", None)
    if model_type not in PADDING_FREE_TYPES:
        return f"model type {model_type!r} does not take packed sequences through position_ids"
    if input_virtual_tokens(unwrapped) or getattr(getattr(unwrapped, "peft_config", {}).get("default"),
                                                  "peft_type", None) == "PREFIX_TUNING":
        return "prompt-learning methods put virtual tokens in front of each row"
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids"
    return None


def pack_rows(feats: list[dict], ignore_index: int) -> dict:
    """One padding-free row (1, N) from a batch of rows: their tokens one after another, ``position_ids``
    restarting at 0 for each, and the first label of each row ignored (the previous row's last position must not
    learn to predict it; in a padded batch that label is never scored either), so the loss and the supervised token
    count equal the padded batch's. ``attention_mask`` is all ones (for the token counts; not given to the model)."""
    import torch

    ids, labels, pos = [], [], []
    for f in feats:
        n = len(f["input_ids"])
        ids += list(f["input_ids"])
        labels += [ignore_index] + list(f["labels"][1:n])
        pos += list(range(n))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def packed_inputs(batch: dict) -> dict:
    """Model inputs of a ``pack_rows`` batch: no attention mask, so transformers derives the per-sequence causal
    mask from the restarting positions; no cache (transformers looks for packed sequences only without one)."""
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
