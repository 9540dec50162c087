"""bf16 training on CPU and GPU: whether this machine has fast bf16 matmuls, and storing frozen matmul weights
in bf16 so autocast does not re-cast them at every forward. On a CPU also (adapter training): the frozen LM head's
bf16 copy column-major (a faster input gradient) where the loss is not fused with the head (``fusedhead``, which
packs the head itself), and transformers' multi-op tanh-GELUs as one op. Everything is
put back after training (``restore_weights``, ``restore_modules``)."""

from __future__ import annotations

import torch


def bf16_unsupported_reason() -> str | None:
    """``None`` when this machine can train with bf16 autocast at speed, else why not (a one-line reason).

    CUDA: the GPU must support bf16 (Ampere or newer). CPU: oneDNN must have bf16 kernels (AVX512-BF16/AMX, or
    AVX512 emulation); without them bf16 matmuls run through slow reference code, slower than fp32.
    """
    if torch.cuda.is_available():
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16 support (needs Ampere or newer)"
    try:
        ok = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        ok = False
    if not ok:
        return (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no fast bf16 matmuls in oneDNN "
                "(needs AVX512-BF16, AMX or at least AVX512)")
    return None


def frozen_matmul_weights_to_bf16(model, column_major_head: bool = False, keep: tuple = ()
                                  ) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Store the frozen Linear/Conv1D weights in bf16 for bf16 autocast; returns (parameter, fp32 data) pairs
    to put back with ``restore_weights``.

    Hidden cost this removes: autocast only caches its bf16 casts of weights that require grad, so it re-casts
    every frozen weight at every forward. For BLOOM's 250,880 x 1024 LM head that is 1 GB read + 0.5 GB written
    per step (0.27 s measured on this 2-core machine), more than the head's matmul on the labelled positions.
    The matmuls see exactly the bf16 weights autocast would have made; a tied input embedding becomes bf16 too
    (as when loading the model in bf16). Trainable weights (the adapter) stay fp32. Memory: the fp32 originals
    are kept, so frozen matmul weights take 1.5x their fp32 size during training.

    ``column_major_head`` (bf16 training on a CPU): the frozen LM head's bf16 copy is laid out column-major
    (``column_major_bf16``), which makes its input gradient ~1.7x faster at no extra memory (see there).
    ``keep``: weights left as they are (the frozen head when the fused loss reads its own packed copy of it).
    """
    swapped, seen = [], {id(w) for w in keep}
    head = output_head_weight(model) if column_major_head else None
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        w = module.weight
        if w.requires_grad or w.dtype != torch.float32 or id(w) in seen:
            continue
        seen.add(id(w))
        swapped.append((w, w.data))
        w.data = column_major_bf16(w.data) if w is head else w.data.to(torch.bfloat16)
    return swapped


def output_head_weight(model) -> torch.nn.Parameter | None:
    """The LM head's (vocabulary, hidden) weight when it is a plain ``nn.Linear`` (peft and transformers models
    answer ``get_output_embeddings``), else None (a LoRA-wrapped or otherwise replaced head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head.weight if type(head) is torch.nn.Linear else None


def column_major_bf16(weight: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """A bf16 copy of a 2-D (out, in) weight with the same values and shape, stored column-major: the (out, in)
    transposed view of a contiguous (in, out) tensor.

    Why (measured on an AMD EPYC with avx512_bf16, one thread): autograd's input
    gradient of ``F.linear(x, W)`` is ``grad @ W``; for BLOOM's 250,880 x 1024 head on 24 labelled rows PyTorch's
    bf16 ``mm`` takes ~150 ms on a row-major W and ~87 ms on a column-major one (then oneDNN reads W as the
    contiguous weight of a linear layer), with bit-identical results; the forward ``x @ W^T`` costs ~7 % more
    (108 vs 101 ms). A tied input embedding reads its rows with a stride then (~5 ms per batch of 464 tokens).
    Written in blocks of ``rows`` rows: no full-size temporary, and ~0.55 s for that head against 0.3 s for a
    plain cast (blocks of 8-48 rows: 0.54-0.78 s; PyTorch's whole-matrix transposing copies took 0.8-5 s).
    """
    out = torch.empty(weight.shape[1], weight.shape[0], dtype=torch.bfloat16, device=weight.device)
    for i in range(0, weight.shape[0], rows):
        out[:, i:i + rows] = weight[i:i + rows].to(torch.bfloat16).t()
    return out.t()


def restore_weights(swapped: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for w, data in swapped:
        w.data = data


def one_op_tanh_gelu(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """bf16 training on a CPU: BLOOM's ``BloomGelu`` and GPT-2's ``NewGELUActivation`` (``gelu_new``) become one
    ``F.gelu(approximate="tanh")`` (``clmtune.inference.TanhGELU``) until ``restore_modules``; returns what to put
    back. The same function: those modules write it as 5-8 elementwise ops forward and ~10 backward, each a pass
    over the (tokens x 4 hidden) activations rounded to bf16, where ``F.gelu`` computes in fp32 inside one kernel
    and rounds once (so results differ from them by bf16 rounding, closer to the fp32 function)."""
    from clmtune.inference import MULTI_OP_TANH_GELU, TanhGELU

    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ in MULTI_OP_TANH_GELU:
                swaps.append((parent, name, child))
    for parent, name, _ in swaps:
        setattr(parent, name, TanhGELU())
    return swaps


def restore_modules(swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]]) -> None:
    for parent, name, module in swaps:
        setattr(parent, name, module)
