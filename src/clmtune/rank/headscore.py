"""Log-probabilities of chosen tokens straight from the final hidden states, without a (rows, V) logits tensor.

``rank`` needs, for every scored position, ``log p(token) = logit[token] - logsumexp(logits)``: the normaliser over
the whole vocabulary. Run through the model's own head, that is one (rows, V) fp32 tensor per batch (16 rows x 33
label-tree nodes x OPT's 50,265 tokens: 106 MB; BLOOM's 250,880 tokens: 5x that), and ``torch.logsumexp`` makes
three more of that size (the shifted copy, its exp, ...). On a CPU most of that time is the kernel handing out and
zeroing fresh pages, not arithmetic: profiled on tiny-opt with 10 labels, the head's matmul ran at
26 GFLOP/s and logsumexp's ``sub`` alone took a quarter of the evaluation.

Here the head's weight is read block by block along the vocabulary (an online log-sum-exp: running max and sum of
exponentials per row, as flash attention does over keys), each block's logits a few MB that the allocator reuses,
and the wanted tokens' logits are picked from the block that holds them. The result equals
``log_softmax(head(hidden)).gather(token)`` up to float summation order. torch has no fused "log-sum-exp of a
matmul" on CPU, hence this loop.

Only for a head that is a plain linear map (``linear_head``), and only for models whose forward applies no further
map to the head's output (the architectures rank's one pass supports: GPT-2, OPT, LLaMA, Mistral, Qwen, BLOOM);
anything else is scored through its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clmtune.models.head import head_returns_hidden  # noqa: F401 - re-exported: rank's callers enter it

BLOCK_BYTES = 4 << 20
"""Size of one block of fp32 logits (rows x vocabulary block): small enough to stay in the caches and be reused by
the allocator (no fresh pages), large enough for an efficient matmul. Measured on tiny-opt's head (528 rows x 64 x
50,265, one thread): fp32 78 GFLOP/s with 4 MB blocks, 50 with 16 MB, 24 for the whole (R, V) at once."""


def linear_head(model):
    """(module, weight (V, d), bias or None) when the output head is a plain linear map that may be bypassed
    (``head_returns_hidden``) and run here, else None (an adapter on the head, a custom head)."""
    from clmtune.packed import PackedLinear

    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear or isinstance(head, PackedLinear):
        return head, head.weight, head.bias
    return None


@torch.no_grad()
def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor,
                   tokens: torch.Tensor) -> torch.Tensor:
    """(S,) fp32 ``log_softmax(hidden @ weight.T + bias)[rows, tokens]``.

    hidden (R, d) final hidden states (the head's input), weight (V, d), rows/tokens (S,) long: which row's
    distribution scores which token. Cost: the R x d x V matmul once, in vocabulary blocks of ~``BLOCK_BYTES`` of fp32
    logits; memory: one block, not (R, V).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    block = max(256, min(vocab, BLOCK_BYTES // (4 * max(n_rows, 1))))
    run_max = torch.full((n_rows,), float("-inf"), device=hidden.device)  # (R,)
    run_sum = torch.zeros(n_rows, device=hidden.device)  # (R,) sum of exp(logit - run_max)
    picked = torch.zeros(rows.shape[0], device=hidden.device)  # (S,)
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        logits = F.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1]).float()  # (R, v1-v0)
        here = (tokens >= v0) & (tokens < v1)
        if here.any():
            picked[here] = logits[rows[here], tokens[here] - v0]
        new_max = torch.maximum(run_max, logits.amax(-1))
        run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(-1)
        run_max = new_max
    return picked - (run_max + run_sum.log())[rows]


def logprobs(out: torch.Tensor, bypass, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(S,) fp32 log p(tokens[s]) at row rows[s] of ``out``: (R, d) hidden states when the head was bypassed
    (``bypass = linear_head(model)``, run under ``head_returns_hidden``), else the model's (R, V) logits."""
    if bypass:
        return token_logprobs(out, bypass[1], bypass[2], rows, tokens)
    logits = out.float()
    return logits[rows, tokens] - logits.logsumexp(-1)[rows]
