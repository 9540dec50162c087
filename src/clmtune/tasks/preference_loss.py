"""Preference losses (DPO, IPO, ORPO, SimPO) and the log-probabilities they read, shared by training and evaluation.

The formulas are TRL's (1.x), so a clmtune run and a TRL run on the same batch and weights log the same numbers
(tests/test_preference_trl.py checks it against TRL, or against its committed fixture):

    logps     sum over a response's tokens of log p(token | everything before it)   (DPOTrainer)
    dpo       d = (pc - rc) - (pr - rr);  loss = -(1-ls) logsig(beta d) - ls logsig(-beta d)
              rewards = beta (pc - rc), beta (pr - rr)
    ipo       d = (pc - rc)/nc - (pr - rr)/nr;  loss = (d - 1/(2 beta))^2;  rewards as dpo  (DPOTrainer "ipo")
    orpo      ac = pc/nc, ar = pr/nr (token means);  o = (ac - ar) - (log(1-e^ac) - log(1-e^ar))
              loss = NLL(chosen prompt + response, token mean over the batch) - lambda mean(logsig(o))
              rewards = lambda ac, lambda ar                                          (ORPOTrainer)
    simpo     ac, ar token means;  z = ac - ar - gamma/beta;  loss = -(1-ls) logsig(beta z) - ls logsig(-beta z)
              rewards = beta ac, beta ar                               (CPOTrainer loss_type simpo, cpo_alpha 0)

p: the policy, r: the reference (the same weights with the adapter switched off, a frozen copy, or precomputed),
c/r suffix: chosen/rejected, n: response tokens (the end token included). A batch holds the B chosen sequences
followed by the B rejected ones (one forward pass for both).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clmtune.tasks.examples import IGNORE_INDEX

REFERENCE_LOSSES = ("dpo", "ipo")
"""The losses that compare with a reference model."""
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")
"""TRL's names of the per-step metrics (means over the pairs of the step)."""


@dataclass
class SequenceScores:
    """Per sequence of a (2B, T) batch: ``logps`` the summed response log-probabilities, ``tokens`` the response
    tokens; ``nll`` (ORPO only) the mean NLL of the chosen sequences' every real token after the first."""

    logps: torch.Tensor
    tokens: torch.Tensor
    nll: torch.Tensor | None = None


def scored_positions(batch: dict[str, torch.Tensor], with_prompt: bool) -> torch.Tensor:
    """(2B, T) bool: the positions whose logits are needed, position t predicting token t+1: the responses'
    tokens, and (ORPO, ``with_prompt``) every real token of the chosen half."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    if with_prompt:
        half = labels.shape[0] // 2
        real = batch["attention_mask"].bool()
        keep[:half, :-1] |= real[:half, :-1] & real[:half, 1:]
    return keep


def score_sequences(logits: torch.Tensor, batch: dict[str, torch.Tensor], keep: torch.Tensor,
                    with_nll: bool = False) -> SequenceScores:
    """Response log-probabilities per sequence from ``logits``: (2B, T, V) for every position, or (N, V) for the
    positions of ``keep`` only (row-major, as transformers returns them for a boolean ``logits_to_keep``)."""
    ids, labels = batch["input_ids"], batch["labels"]
    if logits.dim() == 3:
        logits = logits[:, -ids.shape[1]:][keep]
    rows = keep.nonzero()[:, 0]
    targets = ids[:, 1:][keep[:, :-1]]
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,), fp32 under bf16 autocast
    response = (labels[:, 1:] != IGNORE_INDEX)[keep[:, :-1]]
    n = ids.shape[0]
    logps = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, rows[response], token_logps[response])
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    nll = None
    if with_nll:
        chosen = rows < n // 2
        nll = -token_logps[chosen].mean()
    return SequenceScores(logps, tokens, nll)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler 2012; TRL's ``log1mexp``)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_losses(loss: str, scores: SequenceScores, ref_logps: torch.Tensor | None, beta: float,
                label_smoothing: float = 0.0, lam: float = 0.1, gamma: float = 0.5,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair losses (B,), whose mean is the batch loss; per-pair metrics under TRL's names)."""
    half = scores.logps.shape[0] // 2
    pc, pr = scores.logps[:half], scores.logps[half:]
    nc, nr = scores.tokens[:half].clamp(min=1), scores.tokens[half:].clamp(min=1)
    if loss in REFERENCE_LOSSES:
        if ref_logps is None:
            raise ValueError(f"preference.loss={loss} needs the reference log-probabilities")
        rc, rr = ref_logps[:half], ref_logps[half:]
        chosen_ratio, rejected_ratio = pc - rc, pr - rr
        if loss == "dpo":
            d = chosen_ratio - rejected_ratio
            losses = (-F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing)
        else:
            d = chosen_ratio / nc - rejected_ratio / nr
            losses = (d - 1 / (2 * beta)) ** 2
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        logp_c, logp_r = pc, pr
    elif loss == "orpo":
        ac, ar = pc / nc, pr / nr
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        losses = scores.nll - lam * F.logsigmoid(log_odds)
        chosen_rewards, rejected_rewards = lam * ac.detach(), lam * ar.detach()
        logp_c, logp_r = ac, ar
    elif loss == "simpo":
        ac, ar = pc / nc, pr / nr
        z = ac - ar - gamma / beta
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
        chosen_rewards, rejected_rewards = beta * ac.detach(), beta * ar.detach()
        logp_c, logp_r = ac, ar
    else:
        raise ValueError(f"unknown preference loss {loss!r}")
    metrics = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/margins": chosen_rewards - rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
               "logps/chosen": logp_c.detach(), "logps/rejected": logp_r.detach()}
    return losses, metrics


def reference_context(model):
    """The reference model of an adapter run: the same weights with the adapter switched off (peft's
    ``disable_adapter``), no second copy in memory."""
    from clmtune.models import unwrap  # lazy: models imports data, which imports tasks

    inner = unwrap(model)
    return inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()


def takes_head_mask(model) -> bool:
    """The model's forward takes a boolean ``logits_to_keep`` (transformers' ``slice_logits_to_keep``)."""
    import inspect
    import sys

    from clmtune.models import unwrap

    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return ("logits_to_keep" in inspect.signature(base.forward).parameters
            and getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None) is not None)


def forward_scores(model, batch: dict[str, torch.Tensor], with_nll: bool = False, head_mask: bool = False,
                   backward: bool = False) -> SequenceScores:
    """One forward pass of a (2B, T) pair batch -> its sequences' scores. ``head_mask``: the model takes a boolean
    ``logits_to_keep`` (transformers' ``slice_logits_to_keep``): the LM head runs on the scored positions only."""
    from clmtune.models import forward_inputs

    inputs = forward_inputs(model, batch, backward=backward)
    keep = scored_positions(batch, with_nll)
    if head_mask:
        inputs["logits_to_keep"] = keep
    logits = model(**inputs).logits
    return score_sequences(logits, batch, keep, with_nll)
