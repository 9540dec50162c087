"""How one row picks its next token: greedy or sampled (temperature, top-k, top-p, repetition penalty), with the
row's own ``torch.Generator``, so a seeded row writes the same text alone or inside any batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Sampling:
    """The decoding settings of one row (``GenerateConfig`` holds them for a whole stage, see ``of``)."""

    max_tokens: int
    temperature: float = 1.0
    """0: greedy."""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    """The row ends once its cleaned text contains one of these; the text is cut before it."""
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    """Token ids that end this row besides the model's end tokens (a chat template's end marker)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    repetition_penalty: float = 1.0
    """Logits of tokens already in the row (prompt included, as ``transformers``) divided by this (1: off)."""

    @classmethod
    def of(cls, settings, stop: list[str] | None = None, stop_ids: list[int] | None = None) -> "Sampling":
        """The settings of a ``GenerateConfig`` (``stop``: the stop strings to use instead of ``settings.stop``)."""
        return cls(max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                   top_k=settings.top_k or 0, repetition_penalty=settings.repetition_penalty,
                   stop=list(settings.stop if stop is None else stop), seed=settings.seed, stop_ids=list(stop_ids or []))

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a penalty: the whole batch's next tokens are one argmax on the device."""
        return self.temperature == 0 and self.repetition_penalty == 1.0


def row_seed(seed: int | None, choice: int) -> int:
    """The generator seed of choice ``choice`` of a prompt: ``seed`` itself for the first choice, a mix of both for
    the others (so choice 1 of seed 5 is not choice 0 of seed 6); fresh entropy without a seed."""
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
    if choice == 0:
        return seed & 0x7FFF_FFFF_FFFF_FFFF
    return int(np.random.SeedSequence([seed & 0xFFFF_FFFF_FFFF_FFFF, choice]).generate_state(1, np.uint64)[0] >> 1)


def penalize(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """``transformers``' ``RepetitionPenaltyLogitsProcessor`` on one row's (vocab,) logits: the logits of the
    ``seen`` tokens divided by ``penalty`` (multiplied where negative)."""
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    score = logits.gather(0, idx)
    return logits.scatter(0, idx, torch.where(score < 0, score * penalty, score / penalty))


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator, seen: list[int]) -> int:
    """Next token of one row from its (vocab,) float32 CPU logits: greedy at temperature 0, else a draw from the
    distribution that ``transformers`` samples from (penalty, temperature, top-k, then top-p) with the row's own
    generator.

    Inverse-CDF draw in float64 (one uniform number from the row's generator; ``torch.multinomial`` costs ~1 ms a
    call on a CPU). A batched forward gives logits that differ from the same row alone by float rounding (~3e-6 on
    gpt2-zh-small); a token can then only change when the uniform number falls that close to a boundary of the
    cumulative distribution. In float32 the CDF itself is coarse (7,000 tiny probabilities summed, 6e-8 steps
    at 0.6) and such flips showed up once in ~1,000 tokens; in float64 they are ~1e-6 per token.
    """
    if s.repetition_penalty != 1.0 and seen:
        logits = penalize(logits, seen, s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    x = logits.double() / s.temperature
    keep = None
    if 0 < s.top_k < x.numel():  # only the top-k candidates (ties included), in vocabulary order
        keep = (x >= torch.topk(x, s.top_k).values[-1]).nonzero()[:, 0]
        x = x[keep]
    probs = torch.softmax(x, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= s.top_p  # tokens after the nucleus; the first one always stays
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    cdf = probs.cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    i = torch.searchsorted(cdf, u, right=True).clamp(max=probs.numel() - 1)
    return int(i if keep is None else keep[i])
