"""Output folders that ``--overwrite`` may replace (``clmtune prepare --save``, ``export --to``, ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from clmtune.errors import ClmtuneError
from clmtune.run.files import ADAPTER, CHECKPOINTS, CONFIG, MODEL, SUMMARY, TOKENIZER, TRAIN_LOG

# Output folders that --overwrite may replace. Rule: only a folder of the same kind that clmtune wrote (it carries
# ``marker``), never a file, never a folder holding the data read, never a run folder or anything inside one. A
# refusal names a new path as the fix, not --overwrite, unless the folder is one --overwrite may replace.


def enclosing_run(path: str | Path) -> Path | None:
    """The run folder that ``path`` is or lies in (a folder with ``config.yaml`` and a run's outputs), or None."""
    p = Path(os.path.abspath(path))
    for d in (p, *p.parents):
        if (d / CONFIG).is_file() and any((d / n).exists() for n in (ADAPTER, MODEL, SUMMARY, TRAIN_LOG, CHECKPOINTS,
                                                                      TOKENIZER)):
            return d
    return None


def check_replace_target(dest: str | Path, overwrite: bool, *, option: str, marker: str, kind: str,
                         sources: Iterable[str | Path] = ()) -> Path:
    """Refuse ``dest`` as the output of ``option`` unless writing there loses nothing the user did not ask to.

    ``marker``: the file every ``kind`` folder clmtune writes carries; ``sources``: paths read by the same command
    (a folder holding one of them is never replaced)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ClmtuneError(f"{option} {dest} is a file, not a folder; give a new folder path (a file is never "
                           "replaced)")
    run = enclosing_run(dest)
    if run is not None and dest.exists() and any(dest.iterdir()):
        where = "is the run folder" if run == Path(os.path.abspath(dest)) else f"lies inside the run folder {run}"
        raise ClmtuneError(f"{option} {dest} {where}; give a new folder outside it (a run's files are never "
                           "replaced from here)")
    here = Path(os.path.abspath(dest))
    for src in sources:
        s = Path(os.path.abspath(src))
        if s == here or here in s.parents:
            raise ClmtuneError(f"{option} {dest} holds the data source {src}; give a new folder path")
    if dest.is_dir() and any(dest.iterdir()):
        if not (dest / marker).is_file():
            raise ClmtuneError(f"{option} {dest} exists and was not written by {kind} (no {marker}); give a "
                               "new folder path")
        if not overwrite:
            raise ClmtuneError(f"{option} {dest} holds an earlier {kind} output; give a new folder path, or "
                               "pass --overwrite to replace it")
    return dest
