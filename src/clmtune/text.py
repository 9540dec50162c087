"""Text helpers (a foundation): clean decoded text, and match free text to a label set.

Both the evaluate and the generate stage decode model output; stages don't import each other, so the shared
string handling lives here.
"""

from __future__ import annotations

import re
from typing import Sequence

# CJK radicals/symbols/punctuation, kana, CJK ideographs (+ ext. A, compatibility) and full-width forms.
_CJK = r"\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}])[ \t]+(?=[{_CJK}])")


def clean_text(text: str, strip: bool = True) -> str:
    """Remove the spaces a character tokenizer puts between CJK characters (``游 泳 池`` -> ``游泳池``).

    BERT-style decoding joins every token with a space; spaces between Latin words (and between a CJK character and
    a Latin word) stay. ``strip=False`` keeps leading/trailing whitespace (used while streaming).
    """
    text = _SPACE_BETWEEN_CJK.sub("", text)
    return text.strip() if strip else text


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert/delete/substitute, cost 1 each).

    Hand-written: the standard library has none (difflib's ratio is a different measure) and label names are
    short, so the O(len(a) * len(b)) dynamic programme costs nothing.
    """
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest_label(text: str, labels: Sequence[str]) -> str:
    """The label with the smallest edit distance to ``text`` (ties: the first in ``labels``)."""
    return min(labels, key=lambda lab: edit_distance(text, lab))
