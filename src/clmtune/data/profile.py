"""What the data looks like, for choosing defaults: its script (share of CJK characters) and its token lengths.

Used by ``clmtune.defaults`` (``model.name_or_path: auto``, ``data.max_length: auto``) and by ``prepare``'s report.
"""

from __future__ import annotations

import math
import random
import re
from typing import Sequence

from clmtune.tasks import Task, get_task
from clmtune.tasks.examples import Example

_CJK_IDEOGRAPH = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
CJK_THRESHOLD = 0.3
"""Text counts as Chinese when at least this share of its letters are CJK ideographs (Chinese reviews: ~0.95;
English tweets: 0; a Chinese text with many Latin brand names and numbers stays well above 0.3)."""
SAMPLE_ROWS = 500
AUTO_PERCENTILE = 99
AUTO_MULTIPLE = 8


def cjk_share(texts: Sequence[str]) -> float:
    """Share of CJK ideographs among the letters (``str.isalpha``: Latin, CJK, kana, ...) of ``texts``; 0 when
    there are no letters."""
    letters = cjk = 0
    for t in texts:
        letters += sum(1 for c in t if c.isalpha())
        cjk += len(_CJK_IDEOGRAPH.findall(t))
    return cjk / letters if letters else 0.0


def text_sample(examples: Sequence[Example], seed: int, n: int = SAMPLE_ROWS) -> list[str]:
    """The row texts (the template's filled-in values, or an ``lm`` text) of up to ``n`` rows drawn with ``seed``."""
    rows = list(examples) if len(examples) <= n else random.Random(seed).sample(list(examples), n)
    return [e.text for e in rows]


def sequence_lengths(tokenizer, cfg, examples: Sequence[Example], shape: Task | None = None) -> list[int]:
    """Tokens of each training row before any cut, measured as the task encodes it (``Task.sequence_lengths``:
    prompt + target + end token; a chat conversation rendered by its template). A chat tokenizer must have its
    template installed (``Task.prepare_tokenizer``) first."""
    return (shape or get_task(cfg.task)).sequence_lengths(tokenizer, cfg, list(examples))


def percentile(values: Sequence[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile (a value that occurs; ``q=99``: 99 % of the values are at most it)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def auto_max_length(lengths: Sequence[int], context: int | None) -> tuple[int, dict]:
    """``data.max_length: auto``: the 99th percentile of ``lengths`` rounded up to a multiple of 8, at most the
    model's ``context``. Returns (value, facts for the log and the summary: percentile, context, rows cut)."""
    p99 = percentile(lengths, AUTO_PERCENTILE)
    value = -(-p99 // AUTO_MULTIPLE) * AUTO_MULTIPLE
    if context is not None:
        value = min(value, context)
    cut = sum(1 for n in lengths if n > value)
    return value, {"value": value, "p99_tokens": p99, "longest_tokens": max(lengths), "model_context": context,
                   "rows": len(lengths), "rows_cut": cut}
