"""The training loss and the LM-head trimming: next-token cross-entropy on the supervised positions only, and
which positions the LM head must run on (``logits_to_keep``) so that nothing else is computed."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from clmtune.errors import ClmtuneError
from clmtune.models import input_virtual_tokens, unwrap
from clmtune.tasks.examples import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over supervised positions: their mean, or (``reduction="sum"``) their sum.

    logits: (B, L, V); labels: (B, T). The two are aligned on the right: L < T when the LM head only ran on the
    last positions, L > T when peft prepended virtual tokens (prompt tuning, p-tuning: L = n_virtual + T).
    Position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:] (of the same last T).
    logits (N, V) (the LM head ran only on the supervised positions, see ``head_positions``): row k scores the
    k-th supervised label of labels[:, 1:] in row-major order.
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), supervised_targets(labels), reduction=reduction)
    n = min(logits.shape[1], labels.shape[1])
    logits, labels = logits[:, -n:], labels[:, -n:]
    shift_logits = logits[:, :-1].float()  # (B, n-1, V); fp32 for a stable log-softmax under bf16 autocast
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def supervised_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the supervised next-token targets of labels (B, T) in row-major order, like hidden_states[mask] of
    ``head_positions``' mask: labels[:, 1:] without IGNORE_INDEX."""
    targets = labels[:, 1:]
    return targets[targets != IGNORE_INDEX]


def supervised_tokens(labels: torch.Tensor) -> int:
    """Number of positions that carry loss: labels (B, T) -> count of labels[:, 1:] != IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many last positions the LM head must run on so that every supervised label is predicted.

    labels (B, T), left-padded: label t is predicted by position t-1, so with j the first column where any row
    is supervised, the last T - j + 1 positions suffice (a classification batch: label words + end + 1, ~4 of
    T ~ 40..256). Returns T (every position) when column 0 is supervised (``lm`` rows).
    """
    columns = (labels != IGNORE_INDEX).any(0)  # (T,)
    if not bool(columns.any()):
        return 1
    first = int(columns.float().argmax())
    return int(labels.shape[1]) - max(first - 1, 0)


def head_trim_support(model) -> tuple[str | None, str | None]:
    """How the LM head can be limited to the positions that need it: ``("mask", None)`` when the model slices its
    hidden states with transformers' ``slice_logits_to_keep`` (a boolean (B, L) mask keeps exactly the supervised
    positions), ``("last", None)`` when it takes an integer ``logits_to_keep``, ``(None, reason)`` when it cannot
    (then training computes full logits)."""
    import sys

    unwrapped = unwrap(model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None, f"{type(base).__name__}.forward has no logits_to_keep argument"
    if getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None:
        return "mask", None
    return "last", None


def virtual_tokens(model) -> int:
    """Positions peft puts in front of the input (prompt tuning, p-tuning); prefix tuning's go to the KV cache."""
    return input_virtual_tokens(model)


class HeadMode(NamedTuple):
    """How the LM head is limited during training (``train.logits_on_labels_only``): ``mode`` ``"mask"`` (a boolean
    mask of the supervised positions), ``"last"`` (an integer ``logits_to_keep``) or ``None`` (every position);
    ``n_virtual``: positions peft prepends (prompt tuning, p-tuning), which the mask must cover."""

    mode: str | None = None
    n_virtual: int = 0
    fused: object = None
    """The frozen output head (an ``nn.Linear``) when the loss runs through it fused
    (``clmtune.train.fusedhead``): the model then returns the supervised hidden states, not logits."""
    packed: object = None
    """bf16: the head's oneDNN-packed blocks (``clmtune.train.fusedhead.PackedHead``) the fused loss reads."""
    chunked: bool = False
    """``train.chunked_loss``: the fused head's loss in chunks of rows (``clmtune.train.speed.chunked_head_loss``)."""


def head_positions(labels: torch.Tensor, mode: str, n_virtual: int = 0) -> torch.Tensor | int:
    """``logits_to_keep`` for a left-padded batch. ``last``: the int K of ``logits_to_keep(labels)``.
    ``mask``: a bool (B, n_virtual + T) mask of the positions that predict a label (position t predicts label
    t+1); the model then returns (N, V) logits, N = supervised tokens, and the LM head (a d x V matmul, the
    largest one for big vocabularies) runs on nothing else. The mask makes transformers gather the hidden states
    into one contiguous (N, d) tensor; an int K slices a non-contiguous (B, K, d) view, which F.linear turns into a
    batched matmul against the weight broadcast B times: measured 3x slower than one (N, d) x (d, V) mm."""
    if mode == "last":
        return logits_to_keep(labels)
    mask = torch.zeros(labels.shape[0], n_virtual + labels.shape[1], dtype=torch.bool, device=labels.device)
    mask[:, n_virtual:-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def check_finite(step: int, loss: float, grad_norm: float | None, last_saved: int, checkpoints: Path) -> None:
    """Stop before an optimizer step that would write NaN/inf into the weights (``learning_rate: 1e9``, fp16
    overflow, a broken row): the run would otherwise "finish" and report metrics of a broken model. Nothing of
    this step is saved, so the last checkpoint stays the latest. Under several processes the loss and the norm
    are global, so every process stops at the same step."""
    bad = [f"{name} is {value}" for name, value in (("the loss", loss), ("the gradient norm", grad_norm))
           if value is not None and not math.isfinite(value)]
    if bad:
        kept = (f"the last good checkpoint is step {last_saved} in {checkpoints}" if last_saved > 0
                else "no checkpoint was written")
        raise ClmtuneError(f"training stopped at step {step}: {' and '.join(bad)}; {kept}. Lower "
                           "train.learning_rate, keep train.max_grad_norm set, or check the data")
