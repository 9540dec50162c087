"""Run reports: reading a run folder (``runs``) and ``report.html`` (``html``); the curves are ``clmtune.curves``
(a foundation: training draws ``loss.png`` with them too)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from clmtune.errors import ClmtuneError
from clmtune.fsutil import check_writable, is_writable
from clmtune.metrics import METRICS


def default_report_path(runs: Sequence[str | Path]) -> Path:
    """``RUN/report.html`` for one run; for several, ``report.html`` in the first run's parent folder."""
    from clmtune.run import REPORT_HTML, RunDir

    first = Path(runs[0])
    return RunDir(first).report_html if len(runs) == 1 else first.resolve().parent / REPORT_HTML


def write_report(runs: Sequence[str | Path], out: str | Path | None = None, title: str | None = None) -> Path:
    """Read the run folders and write one self-contained ``report.html`` about them; return its path."""
    from clmtune.report.html import write_html
    from clmtune.report.runs import read_run, unique_names

    if not runs:
        raise ClmtuneError("no run folder given; pass one or more folders written by `clmtune train`")
    paths = [Path(r) for r in runs]
    names = unique_names(paths)
    read = [read_run(p, name) for p, name in zip(paths, names)]
    target = Path(out or default_report_path(runs))
    if out is None and target.parent.is_dir() and not is_writable(target.parent):
        raise ClmtuneError(f"cannot write {target} ({target.parent} is read-only); pass --out FILE to write the "
                           "report elsewhere")
    if out is not None:
        check_writable(target.parent, "the folder of --out")
    return write_html(read, target, title)


def evaluation_lines(runs: Sequence[str | Path]) -> list[str]:
    """One line per evaluation of each run (``eval/index.json``): folder, what it ran on, method, numbers."""
    from clmtune.report.runs import evaluated_on, read_run

    lines = []
    for path in runs:
        run = read_run(path)
        for folder, e in sorted(run.evals.items(), key=lambda kv: kv[1].get("written", "")):
            numbers = "  ".join(f"{label} {e[key]:.4f}" if isinstance(e[key], float) else f"{label} {e[key]}"
                                for key, label in [*((m.name, m.label) for m in METRICS.values()), ("n", "rows"),
                                                   ("invalid", "invalid")] if e.get(key) is not None)
            lines.append(f"{run.name}: {folder}  ({evaluated_on(e)}, {e.get('method')})  {numbers}")
    return lines

