"""The workspace: the one folder the page may read and write. Every path a request names goes through
``Workspace.resolve``: relative, no ``..``, and (after following symlinks) still inside the workspace.

Layout (everything a browser run writes is a plain file a CLI user would write too)::

    WORKSPACE/
      data/ uploads/         data files (any folder works; uploads land in uploads/)
      configs/<run>.yaml     the YAML each browser run was started with (`clmtune train --config configs/<run>.yaml`)
      runs/<run>/            run folders (train.output_dir), written by `clmtune train`
      exports/<run>-*/       `clmtune export` output
      .clmtune-ui/           the page's own bookkeeping: job logs and records, comparison reports
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from clmtune.errors import ClmtuneError

DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
UPLOADS = "uploads"
CONFIGS = "configs"
RUNS = "runs"
EXPORTS = "exports"
STATE = ".clmtune-ui"
NAME_RE = re.compile(r"^[\w\u4e00-\u9fff][\w.\-\u4e00-\u9fff]{0,79}$")
"""A run or file name: letters (CJK too), digits, ``_ . -``; no slash, no leading dot."""


class PathRefused(ClmtuneError):
    """A path outside the workspace (``..``, absolute, or a symlink that leads out): HTTP 403."""


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name or ""):
        raise ClmtuneError(f"{what} {name!r} is not allowed: use letters, digits, '_', '.' or '-' (at most 80, not "
                           "starting with '.')")
    return name


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (STATE, f"{STATE}/jobs", f"{STATE}/reports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def state(self) -> Path:
        return self.root / STATE

    def resolve(self, rel: str) -> Path:
        """The absolute path of ``rel`` inside the workspace; PathRefused for anything that leaves it."""
        if not isinstance(rel, str) or not rel.strip() or "\x00" in rel:
            raise PathRefused(f"empty or invalid path {rel!r}")
        pure = PurePosixPath(rel.replace("\\", "/"))
        if pure.is_absolute() or re.match(r"^[A-Za-z]:", rel) or ".." in pure.parts:
            raise PathRefused(f"{rel!r}: give a path inside the workspace, without '..' or a leading '/'")
        path = (self.root / pure).resolve()  # follows symlinks: one pointing out of the workspace is refused
        if not path.is_relative_to(self.root):
            raise PathRefused(f"{rel!r} leads outside the workspace {self.root}")
        return path

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def check_inside(self, value: str, key: str) -> None:
        """A path a config names (data.source, train.output_dir, ...) must stay inside the workspace too
        (``builtin:`` sources are shipped with clmtune and are fine)."""
        if value is None or (isinstance(value, str) and value.startswith("builtin:")):
            return
        try:
            self.resolve(str(value))
        except PathRefused as exc:
            raise PathRefused(f"{key}: {exc}") from None

    def data_files(self, limit: int = 500) -> list[dict]:
        """Data files anywhere in the workspace (not inside run folders or the page's state), newest first."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            here = Path(dirpath)
            rel_dir = here.relative_to(self.root)
            # run folders hold predictions.csv etc.: not training data
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and
                           not (here / d / "config.yaml").is_file() and not (rel_dir == Path(".") and d in (RUNS, EXPORTS))]
            for f in filenames:
                p = here / f
                if p.suffix.lower() in DATA_SUFFIXES and not f.startswith(".") and p.is_file() and \
                        p.resolve().is_relative_to(self.root):
                    st = p.stat()
                    found.append({"path": self.rel(p) if not p.is_symlink() else (rel_dir / f).as_posix(),
                                  "bytes": st.st_size, "modified": st.st_mtime})
            if len(found) >= limit:
                break
        return sorted(found, key=lambda x: -x["modified"])[:limit]
