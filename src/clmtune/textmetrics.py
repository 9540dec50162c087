"""Scores of generated replies against references: character ROUGE-L, BLEU-4 and exact match.

The numbers LLaMA-Factory reports for Chinese generation (``ComputeSimilarity``), on characters:

- **BLEU-4**: NLTK's ``sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)``, i.e.
  uniform weights over 1- to 4-gram clipped precisions, NIST smoothing (the k-th n-gram order with no match gets
  ``1 / (2**k * count)``), brevity penalty ``exp(1 - r/c)`` when the prediction is shorter; 0 when no character
  matches. Every character counts, spaces included (``list(text)``).
- **ROUGE-L**: the F1 of the longest common subsequence, ``2PR / (P + R)`` with ``P = LCS/len(prediction)``,
  ``R = LCS/len(reference)``, as ``rouge_chinese`` computes it for one sentence pair; whitespace is not a token
  (rouge splits on it). LLaMA-Factory feeds rouge jieba words; clmtune feeds characters, which needs no word
  segmenter and is the usual choice for character tokenizers.
- **Exact match**: prediction == reference after stripping surrounding whitespace.

All three are in [0, 1] per pair; ``score_texts`` averages them and reports them x100, as LLaMA-Factory does.
Hand-written (about 60 lines) rather than depending on nltk + rouge_chinese + jieba for three formulas; the tests
check them against hand computations.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction: str, reference: str) -> float:
    """Character BLEU-4 with NLTK's smoothing method 3 (0..1)."""
    hyp, ref = list(prediction), list(reference)
    if not hyp:
        return 0.0
    numerators, denominators = [], []
    for n in range(1, 5):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        numerators.append(sum(min(c, r[g]) for g, c in h.items()))
        denominators.append(max(1, sum(h.values())))  # NLTK: max(1, ...) so a short prediction divides by 1
    if numerators[0] == 0:
        return 0.0
    k, log_sum = 1, 0.0
    for num, den in zip(numerators, denominators):
        if num == 0:  # smoothing method 3 (NIST): 1 / (2^k * den), k counting the orders without a match
            p = 1.0 / (2 ** k * den)
            k += 1
        else:
            p = num / den
        log_sum += 0.25 * math.log(p)
    c, r = len(hyp), len(ref)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_sum)


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Character ROUGE-L F1 (0..1); whitespace is ignored; 0 when either side is empty."""
    hyp = [ch for ch in prediction if not ch.isspace()]
    ref = [ch for ch in reference if not ch.isspace()]
    if not hyp or not ref:
        return 0.0
    lcs = _lcs(hyp, ref)
    p, r = lcs / len(hyp), lcs / len(ref)
    return 0.0 if lcs == 0 else 2 * p * r / (p + r)


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def score_texts(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ``rouge_l``, ``bleu4`` and ``exact_match`` over the pairs, x100 (LLaMA-Factory's scale), and ``n``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"rouge_l": 0.0, "bleu4": 0.0, "exact_match": 0.0, "n": 0}

    def mean(fn) -> float:
        return round(100 * sum(fn(p, r) for p, r in zip(predictions, references)) / n, 4)

    return {"rouge_l": mean(rouge_l), "bleu4": mean(bleu4), "exact_match": mean(exact_match), "n": n}
