"""Evaluation reports: the files of an evaluation (``eval.json``, ``predictions.csv``, the confusion-matrix PNG)
and the RAFT submission shape for unlabelled examples. Files are written atomically (``clmtune.run``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from clmtune.config import RunConfig
from clmtune.data import resolve_source
from clmtune.errors import ClmtuneError
from clmtune.fsutil import clean_stale_tmp, tmp_sibling
from clmtune.metrics import label_metrics
from clmtune.run import (CONFUSION_PNG, EVAL_JSON, PREDICTIONS_CSV, PREDICTIONS_TEXT_CSV, write_csv_atomic,
                         write_json_atomic)
from clmtune.tasks.examples import Example, normalize_label


def plot_confusion_matrix(matrix: dict, path: Path, title: str) -> Path:
    """Write the confusion matrix (counts; rows gold, columns predicted, plus an ``invalid`` column when any) as PNG."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels, cm = matrix["labels"], [list(r) for r in matrix["rows_gold_cols_predicted"]]
    cols = list(labels)
    if any(matrix.get("invalid_per_gold", [])):
        cols.append("(invalid)")
        cm = [r + [n] for r, n in zip(cm, matrix["invalid_per_gold"])]
    side = min(max(4.0, 2 + 0.45 * len(cols)), 30)  # banking_77: 77 columns still readable
    # Chinese label names need a CJK font; matplotlib picks the first installed one of these.
    plt.rcParams["font.sans-serif"] = ["DejaVu Sans", "Noto Sans CJK SC", "Noto Sans SC", "WenQuanYi Zen Hei",
                                       "SimHei", "Microsoft YaHei", "PingFang SC", "Arial Unicode MS"]
    from clmtune.fonts import use_cjk_font; use_cjk_font(cols + [title])  # noqa: E702  CJK font first (overrides the line above)
    fig, ax = plt.subplots(figsize=(side + 2, side + 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Glyph missing from font": a box instead of a CJK character, not an error
        im = ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 4 else 0, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(title, fontsize=10)
        if len(cols) <= 20:
            peak = max(max(r) for r in cm) or 1
            for i, row in enumerate(cm):
                for j, v in enumerate(row):
                    ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        tmp = tmp_sibling(path)
        try:  # a temporary name, then rename: a killed evaluation leaves no half PNG
            fig.savefig(tmp, dpi=100, format="png")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    plt.close(fig)
    return path


def submission_names(cfg: RunConfig, labels: list[str]) -> dict[str, str]:
    """Label (as the model writes it) -> name for a RAFT submission: ``task.json``'s spelling (``change_pin``) when
    the data source is a RAFT folder, else the label itself."""
    try:
        path = resolve_source(cfg.data.source)
    except ClmtuneError:
        return {lab: lab for lab in labels}
    names = {}
    if path.is_dir() and (path / "task.json").is_file():
        meta = json.loads((path / "task.json").read_text(encoding="utf-8"))
        for name in meta.get("label_columns", {}).get(cfg.data.label_column, []):
            names[normalize_label(name)] = str(name)
    return {lab: names.get(lab, lab) for lab in labels}


def write_label_report(result: dict, out_dir: Path, examples: list[Example], predicted: list[str],
                       mapped: list[str] | None, generated: bool, labels: list[str], cfg: RunConfig) -> dict:
    """Write ``predictions.csv`` (and for labelled examples the confusion matrix PNG), then ``eval.json``.

    Labelled: ``id,text,gold,predicted`` (+ ``output`` for ``generate``, + ``mapped`` with ``map_invalid``).
    Unlabelled: a RAFT submission, ``ID,Label`` with ``task.json``'s label spelling, and ``predictions_text.csv``
    (``id,text,predicted``) to read the predictions next to their texts.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # eval.json is written last: remove the old one first, so that an interrupted evaluation never leaves new
    # predictions next to old metrics (each file itself is written to a temporary name and renamed)
    (out_dir / EVAL_JSON).unlink(missing_ok=True)
    for name in (EVAL_JSON, PREDICTIONS_CSV, PREDICTIONS_TEXT_CSV, CONFUSION_PNG):
        clean_stale_tmp(out_dir, name)  # left by an evaluation that was killed while writing
    files = {"predictions": PREDICTIONS_CSV}
    if "confusion_matrix" in result:
        scores = ", ".join(f"{m.label} {result[m.name]:.3f}" for m in label_metrics() if m.name in result)
        title = f"{result['method']}: {scores} (n={result['n']})"
        plot_confusion_matrix(result["confusion_matrix"], out_dir / CONFUSION_PNG, title)
        files["confusion_matrix_png"] = CONFUSION_PNG
        extra = ["output", "mapped"] if mapped is not None else ["output"] if generated else []
        rows = []
        for k, (e, p) in enumerate(zip(examples, predicted)):
            more = [p, mapped[k]] if mapped is not None else [p] if generated else []
            rows.append([e.id, e.text, e.label, p, *more])
        write_csv_atomic(out_dir / PREDICTIONS_CSV, ["id", "text", "gold", "predicted", *extra], rows)
    else:  # RAFT submission shape; an invalid output stays as written unless eval.map_invalid maps it
        final = mapped if mapped is not None else predicted
        names = submission_names(cfg, labels)
        write_csv_atomic(out_dir / PREDICTIONS_CSV, ["ID", "Label"],
                         ([e.id, names.get(p, p)] for e, p in zip(examples, final)))
        write_csv_atomic(out_dir / PREDICTIONS_TEXT_CSV, ["id", "text", "predicted"],
                         ([e.id, e.text, names.get(p, p)] for e, p in zip(examples, final)))
        files["predictions_with_text"] = PREDICTIONS_TEXT_CSV
        result["submission"] = True
        result["predicted_counts"] = {lab: final.count(lab) for lab in labels}
    result["files"] = files
    write_json_atomic(out_dir / EVAL_JSON, result)
    return result


def write_result(result: dict, out_dir: Path) -> dict:
    """``eval.json`` alone (perplexity)."""
    write_json_atomic(out_dir / EVAL_JSON, result)
    return result
