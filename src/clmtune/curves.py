"""Training curves as PNG: ``loss.png`` of one run, and overlaid curves of several runs (a foundation: the train
stage draws ``loss.png`` at the end of a run, the report stage overlays runs).

Input: the records of ``train_log.jsonl`` (one dict per line). Training records carry ``step`` and ``loss`` (and
``learning_rate``, ``grad_norm``, ``tokens_per_s``); evaluation records carry ``step`` and ``eval_*`` keys
(``eval_loss``, ``eval_accuracy``, ``eval_macro_f1``), on their own line or on a training line. The picture follows
LLaMA-Factory's loss plot (raw loss faint, an exponential moving average on top, whose weight grows with the
number of points), adds the held-out loss, the learning rate on a second axis, and a second panel for eval metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

LOSS_COLOR, SMOOTH_COLOR, EVAL_COLOR, LR_COLOR = "#9ecae1", "#08519c", "#e6550d", "#6a51a3"
METRIC_COLORS = ("#31a354", "#756bb1", "#de2d26", "#636363", "#3182bd")


def smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average with LLaMA-Factory's weight (``1.8 * (sigmoid(0.05 n) - 0.5)``: 0 for a few
    points, about 0.9 for hundreds), started at the first value."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def series(records: Iterable[Mapping]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every numeric key of the records (``step`` aside), in step order; a later
    record for the same step and key (a resumed run repeats steps) replaces the earlier one."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        if "step" not in r:
            continue
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_key.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by_key.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


TRAINING_METRICS = ("rewards/accuracies", "rewards/margins")
"""Training metrics drawn in the metrics panel (preference runs, TRL's names)."""


def _metric_keys(s: Mapping) -> list[str]:
    return [k for k in s if (k.startswith("eval_") and k != "eval_loss" and "loss" not in k
            and k not in ("eval_seconds", "eval_n", "eval_rows")) or k in TRAINING_METRICS]


def plot_loss(records: Sequence[Mapping], path, title: str = "training loss", best_step: int | None = None) -> Path:
    """Write ``loss.png`` (``path``: a file name, or a binary file object): training loss (raw and smoothed) and
    held-out loss against optimizer steps, the learning rate on a second axis; with eval metrics (``eval_accuracy``,
    ...), a second panel below; ``best_step``: a dotted line where the kept (best) weights come from. Returns the
    path (or the file object)."""
    from clmtune.fonts import use_cjk_font

    s = series(records)
    if "loss" not in s and "eval_loss" not in s:
        raise ValueError("no record with a 'loss' or 'eval_loss' value to plot")
    metrics = _metric_keys(s)
    use_cjk_font([title])
    plt = _pyplot()
    rows = 2 if metrics else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 4.2 if rows == 1 else 6.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2][:rows]})
    ax = axes[0][0]
    handles = []
    if "loss" in s:
        steps, loss = s["loss"]
        handles += ax.plot(steps, loss, color=LOSS_COLOR, linewidth=1, label="training loss (raw)")
        handles += ax.plot(steps, smooth(loss), color=SMOOTH_COLOR, linewidth=2, label="training loss (smoothed)")
    if "eval_loss" in s:
        steps, loss = s["eval_loss"]
        handles += ax.plot(steps, loss, color=EVAL_COLOR, marker="o", markersize=4, linewidth=1.5,
                           label="held-out loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if "learning_rate" in s:
        lr_ax = ax.twinx()
        steps, lr = s["learning_rate"]
        handles += lr_ax.plot(steps, lr, color=LR_COLOR, linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate", color=LR_COLOR)
        lr_ax.tick_params(axis="y", colors=LR_COLOR)
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.set_ylim(bottom=0)
    if best_step is not None:
        for row in axes:
            line = row[0].axvline(best_step, color="#31a354", linestyle=":", linewidth=1.5,
                                  label=f"best weights (step {best_step})")
        handles.append(line)
    ax.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.85)
    ax.set_title(title)
    if metrics:
        mx = axes[1][0]
        for k, color in zip(metrics, METRIC_COLORS * 4):
            steps, vals = s[k]
            mx.plot(steps, vals, color=color, marker="o", markersize=4, linewidth=1.5, label=k.removeprefix("eval_"))
        mx.set_ylabel("metric" if any(k in TRAINING_METRICS for k in metrics) else "held-out metric")
        mx.grid(alpha=0.3)
        mx.legend(loc="lower right", fontsize=8, framealpha=0.85)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path):
    """Save as PNG to a path (returned as a Path) or a binary file object (returned as is)."""
    if isinstance(path, (str, Path)):
        path = Path(path)
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_runs(logs: Mapping[str, Sequence[Mapping]], path: str | Path, title: str | None = None) -> Path:
    """Overlaid curves of several runs (``{run name: records}``): each run's smoothed training loss (solid) and
    held-out loss (dashed, markers) in one colour; with eval accuracy, a second panel. ``path``: a file name or a
    binary file object; returned."""
    from clmtune.fonts import use_cjk_font

    all_series = {name: series(recs) for name, recs in logs.items()}
    if title is None:
        title = "training loss (smoothed)" + (" and held-out loss" if any("eval_loss" in s for s in
                                                                          all_series.values()) else "")
    use_cjk_font(list(logs) + [title])
    plt = _pyplot()
    metric = next((m for m in ("eval_accuracy", "eval_macro_f1") if any(m in s for s in all_series.values())), None)
    rows = 2 if metric else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 4.2 if rows == 1 else 6.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2][:rows]})
    ax = axes[0][0]
    colors = plt.get_cmap("tab10").colors
    for (name, s), color in zip(all_series.items(), colors * 10):
        if "loss" in s:
            ax.plot(s["loss"][0], smooth(s["loss"][1]), color=color, linewidth=2, label=f"{name}: training")
        if "eval_loss" in s:
            ax.plot(*s["eval_loss"], color=color, linestyle="--", marker="o", markersize=3, label=f"{name}: held-out")
        if metric and metric in s:
            axes[1][0].plot(*s[metric], color=color, marker="o", markersize=4, label=name)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.85)
    if metric:
        axes[1][0].set_ylabel(metric.removeprefix("eval_").replace("_", " "))
        axes[1][0].grid(alpha=0.3)
        axes[1][0].legend(fontsize=8, framealpha=0.85)
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    return _save(fig, plt, path)
