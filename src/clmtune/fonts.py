"""Chinese in every picture: find a CJK-capable font and make matplotlib use it.

matplotlib's default font (DejaVu Sans) has no CJK glyphs, so 好评/差评 come out as empty boxes. ``use_cjk_font()``
looks for an installed CJK font, first in matplotlib's font manager, then through fontconfig (``fc-list``, which
also finds fonts installed after matplotlib built its font cache), and puts it first in ``font.sans-serif`` with
DejaVu Sans behind it as the Latin fallback (matplotlib >= 3.6 falls back per glyph). Given the texts a picture will
show, it warns once (per missing character set) when no configured font can draw some of them, naming the fix
(``scripts/system_deps.sh`` installs Debian's ``fonts-noto-cjk``).
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
import warnings
from typing import Iterable

log = logging.getLogger("clmtune")

# Preferred families, most preferred first: simplified-Chinese faces, then any CJK face found on common systems.
CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN",
                "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK JP", "Noto Sans CJK TC",
                "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC", "Arial Unicode MS", "Droid Sans Fallback")
LATIN_FALLBACK = "DejaVu Sans"  # ships with matplotlib, so it is always there


class MissingGlyphWarning(UserWarning):
    """A picture holds characters that none of the configured fonts can draw (they would show as boxes)."""


_warned: set[frozenset[str]] = set()


def _fontconfig_files() -> list[tuple[str, str]]:
    """(family, file) of the fonts fontconfig knows for Chinese; empty where fontconfig is not installed."""
    if not shutil.which("fc-list"):
        return []
    try:
        out = subprocess.run(["fc-list", ":lang=zh", "family", "file"], capture_output=True, text=True,
                             timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():  # "/usr/share/fonts/.../NotoSansCJK-Regular.ttc: Noto Sans CJK JP,Noto Sans..."
        path, _, families = line.partition(": ")
        for fam in families.split(","):
            if fam.strip():
                found.append((fam.strip(), path.strip()))
    return found


@functools.lru_cache(maxsize=1)
def find_cjk_font() -> str | None:
    """The family name of an installed CJK-capable font that matplotlib can use, or None."""
    from matplotlib import font_manager

    known = {f.name for f in font_manager.fontManager.ttflist}
    for fam in CJK_FAMILIES:
        if fam in known:
            return fam
    # Not in matplotlib's cache (installed after the cache was built, or in a folder it does not scan): ask
    # fontconfig and register the files with matplotlib.
    by_family: dict[str, str] = {}
    for fam, path in _fontconfig_files():  # prefer the regular weight's file (a family lists Bold, Light, ...)
        if fam not in by_family or _weight_rank(path) < _weight_rank(by_family[fam]):
            by_family[fam] = path
    candidates = [fam for fam in CJK_FAMILIES if fam in by_family] + sorted(
        fam for fam in by_family if "mono" not in fam.lower() and "serif" not in fam.lower())
    for fam in candidates:
        try:
            font_manager.fontManager.addfont(by_family[fam])
        except (OSError, RuntimeError, ValueError) as exc:
            log.debug("cannot load font %s (%s): %s", fam, by_family[fam], exc)
            continue
        names = {f.name for f in font_manager.fontManager.ttflist if f.fname == by_family[fam]}
        if names:  # a .ttc registers under its first face's name, e.g. "Noto Sans CJK JP"
            return fam if fam in names else sorted(names)[0]
    return None


def _weight_rank(path: str) -> int:
    return 0 if "regular" in path.lower() else 2 if re.search(r"bold|black|heavy|light|thin|medium", path, re.I) else 1


def use_cjk_font(texts: Iterable[str] = ()) -> str | None:
    """Configure matplotlib's sans-serif fonts: a CJK font first (when one is installed), DejaVu Sans as fallback.

    ``texts``: the strings the picture will show; a ``MissingGlyphWarning`` is issued once per set of characters
    that no configured font can draw. Returns the CJK family used (None when none was found).
    """
    import matplotlib

    family = find_cjk_font()
    matplotlib.rcParams["font.family"] = ["sans-serif"]
    matplotlib.rcParams["font.sans-serif"] = ([family] if family else []) + [LATIN_FALLBACK]
    matplotlib.rcParams["axes.unicode_minus"] = False  # some CJK fonts lack U+2212; "-" is in every font
    missing = missing_glyphs(texts)
    if missing and frozenset(missing) not in _warned:
        _warned.add(frozenset(missing))
        warnings.warn(f"no installed font can draw {''.join(sorted(missing))!r}: they will show as boxes; install a "
                      "font that has them (Chinese, Debian: `apt-get install fonts-noto-cjk`; scripts/system_deps.sh)",
                      MissingGlyphWarning, stacklevel=2)
    return family


def missing_glyphs(texts: Iterable[str]) -> set[str]:
    """The characters of ``texts`` (whitespace aside) that none of matplotlib's current sans-serif fonts has."""
    import matplotlib
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    chars = {c for t in texts for c in str(t) if not c.isspace()}
    if not chars:
        return set()
    fonts = []
    for fam in matplotlib.rcParams["font.sans-serif"]:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=fam), fallback_to_default=False)
        except ValueError:
            continue
        fonts.append(_ft2font(path, FT2Font))
    return {c for c in chars if not any(f.get_char_index(ord(c)) for f in fonts)}


@functools.lru_cache(maxsize=8)
def _ft2font(path: str, cls):
    return cls(path)
