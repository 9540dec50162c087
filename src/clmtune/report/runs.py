"""Read what a run folder holds, for the report (paths from ``RunDir``, the run folder's owner).

Every file is optional except that a run needs ``train_summary.json`` or ``train_log.jsonl``: a run that is still
training has only its log, an LM run has no predictions, a run without an eval split has no ``eval.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clmtune.errors import ClmtuneError
from clmtune.run import CONFUSION_PNG, EVAL_JSON, PREDICTIONS_CSV, RunDir

log = logging.getLogger("clmtune")

WRONG_SAMPLE = 20  # wrong predictions shown per run


@dataclass
class RunFiles:
    """The contents of one run folder that the report shows."""

    path: Path
    name: str
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    bad_log_lines: int = 0
    eval: dict[str, Any] | None = None
    eval_dir: Path | None = None
    predictions: list[dict[str, str]] = field(default_factory=list)
    confusion_png: Path | None = None
    loss_png: Path | None = None

    @property
    def wrong(self) -> list[dict[str, str]]:
        """Labelled predictions that differ from the gold label."""
        return [r for r in self.predictions if r.get("gold") not in (None, "") and r.get("gold") != r.get("predicted")]

    def wrong_sample(self, k: int = WRONG_SAMPLE, seed: int = 0) -> list[dict[str, str]]:
        """Up to ``k`` wrong predictions, drawn with a fixed seed (the same report every time), in file order."""
        wrong = self.wrong
        if len(wrong) <= k:
            return wrong
        keep = sorted(random.Random(seed).sample(range(len(wrong)), k))
        return [wrong[i] for i in keep]

    def median_tokens_per_s(self) -> float | None:
        values = [r["tokens_per_s"] for r in self.log if isinstance(r.get("tokens_per_s"), (int, float))]
        return statistics.median(values) if values else None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClmtuneError(f"{path}: not valid JSON ({exc}); re-run the step that writes it") from None


def read_run(path: str | Path, name: str | None = None) -> RunFiles:
    """Read run folder ``path`` (written by ``clmtune train``, evaluated or not)."""
    import yaml

    path = Path(path)
    if not path.is_dir():
        raise ClmtuneError(f"{path}: no such folder; pass a run folder written by `clmtune train`")
    rd = RunDir(path)
    if not rd.summary_file.is_file() and not rd.log_file.is_file():
        raise ClmtuneError(f"{path}: not a run folder (no {rd.summary_file.name} or {rd.log_file.name}); pass a "
                           "folder written by `clmtune train`")
    run = RunFiles(path=path, name=name or path.name)
    if rd.config_file.is_file():
        run.config_text = rd.config_file.read_text(encoding="utf-8")
        run.config = yaml.safe_load(run.config_text) or {}
    run.summary = _read_json(rd.summary_file) or {}
    if rd.log_file.is_file():
        for line in rd.log_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                run.log.append(json.loads(line))
            except json.JSONDecodeError:
                run.bad_log_lines += 1  # a run killed mid-write leaves a partial last line
        if run.bad_log_lines:
            log.warning("%s: skipped %d unreadable line(s)", rd.log_file, run.bad_log_lines)
    run.eval = _read_json(rd.path / EVAL_JSON)  # the latest evaluation; "folder" says where its files are
    if run.eval is not None:
        eval_dir = rd.path / run.eval.get("folder", ".")  # an absolute folder stays absolute
        run.eval_dir = eval_dir
        files = run.eval.get("files", {})
        preds = eval_dir / files.get("predictions", PREDICTIONS_CSV)
        if preds.is_file():
            with open(preds, newline="", encoding="utf-8") as fh:
                run.predictions = list(csv.DictReader(fh))
        png = eval_dir / files.get("confusion_matrix_png", CONFUSION_PNG)
        run.confusion_png = png if png.is_file() else None
    run.loss_png = rd.loss_png if rd.loss_png.is_file() else None
    return run


def unique_names(paths: list[Path]) -> list[str]:
    """Short display names for runs: the folder name, or more of the path where folder names repeat."""
    names = [p.name for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 6:
        depth += 1
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
    return names
