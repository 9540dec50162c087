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


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: 2 for wide and full-width characters (CJK, full-width punctuation), 0 for
    combining marks, 1 otherwise (``unicodedata.east_asian_width``, as terminals lay text out)."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad_to_width(text: str, width: int, align: str = "<") -> str:
    """``text`` padded with spaces to ``width`` terminal columns (``str.ljust`` counts characters, so a column of
    Chinese text comes out too wide); ``align`` ``<`` (left) or ``>`` (right)."""
    fill = " " * max(0, width - display_width(text))
    return fill + text if align == ">" else text + fill


def format_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A plain-text table aligned by display width: header, a dashed rule, the rows. ``align``: one ``<``/``>``
    per column (default: all left). The one table helper of the CLI and the scripts."""
    cells = [[str(c) for c in r] for r in [head, *rows]]
    widths = [max(display_width(r[i]) for r in cells) for i in range(len(head))]
    align = align or "<" * len(head)
    lines = ["  ".join(pad_to_width(c, w, a) for c, w, a in zip(r, widths, align)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 turn``, ``2 turns``, ``0 conversations`` (``many``: the plural where it is not ``word + "s"``)."""
    return f"{n} {word if n == 1 else many or word + 's'}"
