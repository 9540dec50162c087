"""``report.html``: one self-contained page (CSS inline, pictures as data URIs, no network) about one or more runs.

Per run: final metrics, curves, data summary, per-class scores, confusion matrix, a sample of wrong predictions with
their texts, timings and the config. With several runs, a side-by-side table and overlaid curves come first.
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

from clmtune.curves import plot_loss, plot_runs
from clmtune.metrics import METRICS, label_metrics
from clmtune.report.runs import RunFiles, evaluated_on

CSS = """
body{font-family:"Noto Sans CJK SC","Noto Sans SC","PingFang SC","Microsoft YaHei","WenQuanYi Micro Hei",
 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1.2em 2em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:2px solid #08519c;padding-bottom:.2em;margin-top:2em}
h3{margin:1.4em 0 .4em;color:#08519c} .muted{color:#666;font-size:.9em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.92em} th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#eef3fa;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#e5f5e0} td.text{max-width:640px}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.3em 0}
.grid{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start} pre{background:#f6f8fa;padding:.8em;
 overflow:auto;font-size:.85em} details summary{cursor:pointer;color:#08519c}
"""

COUNT_ROWS = (("n", "rows evaluated"), ("invalid", "invalid outputs"), ("method", "method"))


def metric_rows() -> list[tuple[str, str]]:
    """(key in eval.json, words) of every registered metric (``clmtune.metrics``), then the counts."""
    return [(m.name, m.label) for m in METRICS.values()] + list(COUNT_ROWS)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v).lower()
    if isinstance(v, float):  # scores and losses with 4 decimals; seconds, rates and perplexities with 1
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], cls: str = "", table_id: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{table_id}"' if table_id else "")
    out = [f"<table{attrs}>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for k, v in enumerate(row):
            if k == 0 and header is not None:
                cells.append(f"<th>{escape(_fmt(v))}</th>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{escape(_fmt(v))}</td>')
            else:
                cells.append(f"<td>{escape(_fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


def _png_of(run: RunFiles) -> bytes | None:
    """The run's loss curve, drawn from its log (so it is current), or its ``loss.png`` when the log has none."""
    if any("loss" in r or "eval_loss" in r for r in run.log):
        buf = io.BytesIO()
        plot_loss(run.log, buf, title=f"{run.name}: loss", best_step=(run.summary.get("best") or {}).get("step"))
        return buf.getvalue()
    return run.loss_png.read_bytes() if run.loss_png else None


def _model(run: RunFiles) -> str:
    return str(run.config.get("model", {}).get("name_or_path", ""))


def _data_section(run: RunFiles) -> str:
    d = run.summary.get("data", {})
    if not d:
        return "<p class='muted'>no data summary (train_summary.json missing)</p>"
    rows = [("task", d.get("task", "")), ("source", ", ".join(d.get("sources", {}).values())),
            ("rows read", d.get("rows_read")), ("held-out split", d.get("eval_from", "its own file"))]
    splits = [s for s in ("train", "eval", "test") if d.get(s)]
    for s in splits:
        rows.append((f"{s} rows", d.get(s)))
    for key, label in (("dropped_empty", "dropped (empty text)"), ("dropped_duplicate", "dropped (duplicate)")):
        counts = d.get(key, {})
        rows.append((label, ", ".join(f"{s} {counts.get(s, 0)}" for s in splits) or 0))
    if "truncated_train_rows" in run.summary:
        rows.append(("truncated (train rows whose prompt was cut)", run.summary["truncated_train_rows"]))
    out = _table(None, rows, cls="data")
    # token lengths: written per split by the data step (prepare) when the summary carries them
    stats = run.summary.get("splits") or d.get("splits") or {}
    if stats:
        tok_rows = []
        for split, st in stats.items():
            if not isinstance(st, dict):
                continue
            p, t = st.get("prompt_tokens", {}), st.get("target_tokens", {})
            tok_rows.append((split, st.get("rows"), st.get("truncated"),
                             "/".join(str(p.get(k, "")) for k in ("p50", "p95", "max")),
                             "/".join(str(t.get(k, "")) for k in ("p50", "p95", "max"))))
        out += _table(("split", "rows", "truncated", "prompt tokens p50/p95/max", "target tokens p50/p95/max"),
                      tok_rows, cls="tokens")
    labels = d.get("label_counts", {})
    seen = {lab for counts in labels.values() for lab in counts}
    names = [lab for lab in run.summary.get("labels") or [] if lab in seen] + sorted(
        seen - set(run.summary.get("labels") or []))
    if names and len(names) <= 40:
        out += _table(["label"] + [s for s in splits if s in labels],
                      [[lab] + [labels[s].get(lab, 0) for s in splits if s in labels] for lab in names],
                      cls="labels")
    return out


def _metrics_rows(run: RunFiles) -> list[tuple[str, Any]]:
    e = run.eval or {}
    rows = [(label, e[key]) for key, label in metric_rows() if key in e]
    if isinstance(e.get("loss"), (int, float)):
        rows.append(("held-out loss" if run.eval_on == "held-out" else "loss", e["loss"]))
    replies = e.get("replies") if isinstance(e.get("replies"), dict) else {}
    rows += [(label, replies[key]) for key, label in (("rouge_l", "reply ROUGE-L"), ("bleu4", "reply BLEU-4"),
                                                    ("exact_match", "reply exact match")) if key in replies]
    mapped = e.get("mapped_to_nearest_label")
    if mapped:
        rows += [(f"{m.label} (invalid mapped to nearest label)", mapped.get(m.name)) for m in label_metrics()]
    last = next((r for r in reversed(run.log) if "rewards/margins" in r), None)
    if last:  # a preference run: TRL's training metrics of the last logged step
        rows += [(f"{k} (training, step {last['step']})", last[k]) for k in ("rewards/chosen", "rewards/rejected",
                 "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected") if k in last]
    best = run.summary.get("best")
    if isinstance(best, dict):
        rows.append(("best checkpoint", f"step {best.get('step')} ({best.get('metric')} {_fmt(best.get('value'))})"))
    if run.summary.get("early_stopped_at"):
        rows.append(("early stopped at step", run.summary["early_stopped_at"]))
    return rows


def _confusion(run: RunFiles) -> str:
    cm = (run.eval or {}).get("confusion_matrix")
    if not cm:
        return ""
    labels, matrix = cm["labels"], cm["rows_gold_cols_predicted"]
    out = "<h3>Confusion matrix</h3><div class='grid'>"
    if len(labels) <= 20:
        invalid = cm.get("invalid_per_gold", [])
        extra = ["(invalid)"] if any(invalid) else []
        rows = [[f"gold {lab}"] + list(r) + ([invalid[i]] if extra else []) for i, (lab, r) in
                enumerate(zip(labels, matrix))]
        out += _table(["gold \\ predicted"] + list(labels) + extra, rows, cls="confusion")
    if run.confusion_png:
        out += _img(run.confusion_png.read_bytes(), f"confusion matrix of {run.name}")
    return out + "</div>"


def _per_class(run: RunFiles) -> str:
    pc = (run.eval or {}).get("per_class")
    if not pc:
        return ""
    rows = [(lab, s["precision"], s["recall"], s["f1"], s["support"]) for lab, s in pc.items()]
    return "<h3>Per class</h3>" + _table(("label", "precision", "recall", "F1", "support"), rows, cls="per-class")


def _replies(run: RunFiles) -> str:
    """sft/chat runs: a fixed-seed sample of held-out prompts with the reference and the generated reply."""
    import random

    rows = run.predictions
    k = min(len(rows), 10)
    sample = [rows[i] for i in sorted(random.Random(0).sample(range(len(rows)), k))]
    return (f"<h3>Replies</h3><p class='muted'>{k} of {len(rows):,} held-out prompts (a fixed-seed sample), greedy "
            "decoding.</p>" + _table(("prompt", "reference", "generated"),
                                    [(_clip(r.get("prompt", "")), _clip(r.get("reference", "")),
                                      _clip(r.get("generated", ""))) for r in sample], cls="replies"))


def _wrong(run: RunFiles) -> str:
    wrong = run.wrong
    if run.predictions and "generated" in run.predictions[0]:
        return _replies(run)
    if not run.predictions or "gold" not in run.predictions[0]:
        return ""
    sample = run.wrong_sample()
    on = "held-out rows" if run.eval_on == "held-out" else f"rows ({escape(run.eval_on)})"
    head = (f"<h3>Wrong predictions</h3><p class='muted'>{len(wrong):,} of {len(run.predictions):,} {on} "
            f"are wrong; {len(sample)} shown (a fixed-seed sample).</p>")
    if not sample:
        return head
    return head + _table(("id", "text", "gold", "predicted"),
                         [(r.get("id", ""), _clip(r.get("text", "")), r.get("gold", ""), r.get("predicted", ""))
                          for r in sample], cls="wrong")


def _evaluations(run: RunFiles) -> str:
    """Every evaluation of the run from ``eval/index.json``, by folder, with what it was computed on."""
    if not run.evals:
        return ""
    shown = [m for m in METRICS.values() if any(m.name in e for e in run.evals.values())]
    rows = [(folder, evaluated_on(e), e.get("method"), *(e.get(m.name) for m in shown), e.get("n"), e.get("invalid"),
             e.get("written"))
            for folder, e in sorted(run.evals.items(), key=lambda kv: kv[1].get("written", ""))]
    return ("<h3>Evaluations</h3>" +
            _table(("folder", "on", "method", *(m.label for m in shown), "rows", "invalid", "written"),
                   rows, cls="evaluations"))


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text):,} characters)"


def _timings(run: RunFiles) -> str:
    s, e = run.summary, run.eval or {}
    rows = [("optimizer steps", s.get("steps")), ("training seconds", s.get("seconds")),
            ("training tokens/s (median of steps)", run.median_tokens_per_s()),
            ("evaluation seconds", e.get("seconds")), ("evaluation examples/s", e.get("examples_per_s"))]
    if s.get("trainable_params"):
        rows.append(("trainable / all parameters", f"{s['trainable_params']:,} / {s.get('all_params', 0):,}"))
    if s.get("resumed_from"):
        rows.append(("resumed from", s["resumed_from"]))
    return "<h3>Timings</h3>" + _table(None, [r for r in rows if r[1] is not None], cls="timings")


def run_section(run: RunFiles, index: int) -> str:
    s = run.summary
    method = run.config.get("peft", {}).get("method", s.get("method", ""))
    out = [f"<h2 id='run-{index}'>{escape(run.name)}</h2>",
           f"<p class='muted'>{escape(str(run.path))} · model {escape(_model(run))} · method {escape(str(method))}"
           f" · {escape(str(s.get('data', {}).get('task', '')))}</p>"]
    metrics = _metrics_rows(run)
    on = "" if run.eval is None else f" ({'held-out split' if run.eval_on == 'held-out' else run.eval_on})"
    out.append(f"<h3>Final metrics{escape(on)}</h3>")
    out.append(_table(("metric", "value"), metrics, cls="metrics", table_id=f"metrics-{index}") if metrics
               else "<p class='muted'>not evaluated (no eval.json): run <code>clmtune eval --run RUN</code></p>")
    out.append(_evaluations(run))
    png = _png_of(run)
    if png:
        out.append("<h3>Curves</h3>" + _img(png, f"loss curves of {run.name}"))
    out.append(_per_class(run))
    out.append(_confusion(run))
    out.append(_wrong(run))
    out.append("<h3>Data</h3>" + _data_section(run))
    out.append(_timings(run))
    if run.config_text:
        out.append(f"<h3>Config</h3><details><summary>config.yaml</summary><pre>{escape(run.config_text)}</pre>"
                   "</details>")
    return "\n".join(x for x in out if x)


def comparison(runs: Sequence[RunFiles]) -> str:
    """The side-by-side table of several runs (best accuracy / macro-F1 / perplexity in bold) and overlaid curves."""
    keys = [("model", lambda r: _model(r)), ("method", lambda r: r.config.get("peft", {}).get("method")),
            ("steps", lambda r: r.summary.get("steps")), ("final training loss", lambda r: r.summary.get("final_loss")),
            ("kept weights from step", lambda r: (r.summary.get("best") or {}).get("step")),
            *((m.label, lambda r, k=m.name: (r.eval or {}).get(k)) for m in METRICS.values()),
            ("rows evaluated", lambda r: (r.eval or {}).get("n")),
            ("training seconds", lambda r: r.summary.get("seconds")),
            ("trainable parameters", lambda r: r.summary.get("trainable_params"))]
    out = ["<table class='metrics' id='comparison'><tr><th></th>" +
           "".join(f"<th><a href='#run-{i}'>{escape(r.name)}</a></th>" for i, r in enumerate(runs)) + "</tr>"]
    for label, get in keys:
        values = [get(r) for r in runs]
        if all(v is None for v in values):
            continue
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        better = next((m.better for m in METRICS.values() if m.label == label), None)
        # only metrics get a best (training losses of different tasks do not compare)
        best = (max if better == "max" else min)(numeric) if better and numeric else None
        cells = "".join(
            f"<td class='num{' best' if best is not None and v == best and len(numeric) > 1 else ''}'>"
            f"{escape(_fmt(v))}</td>" if isinstance(v, (int, float)) and not isinstance(v, bool)
            else f"<td>{escape(_fmt(v))}</td>" for v in values)
        out.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    out.append("</table>")
    logs = {r.name: r.log for r in runs if any("loss" in x or "eval_loss" in x for x in r.log)}
    if logs:
        buf = io.BytesIO()
        plot_runs(logs, buf)
        out.append(_img(buf.getvalue(), "overlaid loss curves of the runs"))
    return "\n".join(out)


def render(runs: Sequence[RunFiles], title: str | None = None) -> str:
    """The whole page as a string."""
    title = title or ("clmtune run report: " + ", ".join(r.name for r in runs))
    body = [f"<h1>{escape(title)}</h1>"]
    if len(runs) > 1:
        body.append("<h2>Comparison</h2>" + comparison(runs))
    body += [run_section(r, i) for i, r in enumerate(runs)]
    return ("<!DOCTYPE html>\n<html lang='zh-CN'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) +
            "\n<p class='muted'>written by <code>clmtune report</code></p></body></html>\n")


def write_html(runs: Sequence[RunFiles], out: str | Path, title: str | None = None) -> Path:
    """Write ``render(runs)`` to ``out`` atomically (a temporary sibling, then renamed); return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(runs, title), encoding="utf-8")
    tmp.replace(out)
    return out
