"""Prepare stage: load, filter, split and tokenize the data of a config, report what happened, optionally save.

``clmtune prepare --config FILE [--save DIR]``: the same data path as ``train`` (``data.prepare_data``), without
loading the model's weights, so data problems show up in seconds. ``--save DIR`` writes the tokenized splits
(Arrow) that ``train`` reuses through ``data.prepared: DIR``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clmtune.config import RunConfig
from clmtune.data import SPLIT_ORDER, prepare_data
from clmtune.data.features import check_save_target, save_prepared
from clmtune.data import Encoder, load_task
from clmtune.defaults import resolve_run
from clmtune.memory import estimate_before_loading
from clmtune.models import context_length, load_tokenizer
from clmtune.text import format_table, plural


@dataclass
class PrepareResult:
    report: dict[str, Any]
    seconds: float
    saved_to: Path | None
    memory: Any = None
    """``clmtune.memory.MemoryEstimate`` of training this config (shapes only, no weights read), or None."""
    memory_note: str | None = None
    """Why there is no estimate, when there is none."""


def prepare(cfg: RunConfig, save: str | Path | None = None, overwrite: bool = False,
            progress: bool = True) -> PrepareResult:
    """Tokenize the configured data (never reading ``data.prepared``) and optionally save it to ``save``."""
    if save is not None:
        check_save_target(save, overwrite, cfg.data)  # fail before the work, not after
    t0 = time.perf_counter()
    resolved = resolve_run(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared=None)),
                           choices=False)  # the report below prints each choice once
    cfg, auto = resolved.cfg, resolved.auto
    data_cfg = cfg.data
    tokenizer = load_tokenizer(cfg.model)
    task = resolved.examples or load_task(data_cfg, resolved.task)
    prep = prepare_data(tokenizer, data_cfg, task=task, context_length=context_length(cfg.model), progress=progress,
                        shape=resolved.task)
    if resolved.task.evaluation == "labels" and task.eval:
        # what `clmtune eval` (rank and generate) will report: room for the longest label, not each row's own
        _, cut = Encoder(tokenizer, data_cfg, resolved.task).encode_eval_prompts(task.eval, prep.labels)
        prep.report["eval_prompts_truncated"] = {"rows": len(task.eval), "truncated": cut}
    prep.report["auto"] = auto
    prep.report["model"] = cfg.model.name_or_path
    prep.report["max_length"] = data_cfg.max_length
    seconds = time.perf_counter() - t0
    saved = save_prepared(prep, save, data_cfg, tokenizer, overwrite) if save is not None else None
    memory, note = None, None
    if prep.train is not None and len(prep.train):
        try:
            pairs = "rejected_input_ids" in prep.train.column_names  # a preference pair: its longer sequence
            ids = zip(prep.train["input_ids"], prep.train["rejected_input_ids"]) if pairs else \
                ((x,) for x in prep.train["input_ids"])
            labels = zip(prep.train["labels"], prep.train["rejected_labels"]) if pairs else \
                ((x,) for x in prep.train["labels"])
            memory = estimate_before_loading(cfg, [max(len(x) for x in row) for row in ids],
                                             [max(sum(1 for t in x if t != -100) for x in row) for row in labels])
        except Exception as exc:  # noqa: BLE001 - the estimate is advice; the data report must still come out
            note = f"no memory estimate ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    else:
        note = "no memory estimate (no training rows)"
    return PrepareResult(report=prep.report, seconds=seconds, saved_to=saved, memory=memory, memory_note=note)


def _lens(x: dict[str, int]) -> str:
    return f"{x['p50']}/{x['p95']}/{x['max']}"


def format_summary(report: dict[str, Any]) -> str:
    """The report as a plain-text table: one row per split, then labels and special tokens."""
    d = report["data"]
    head = ["split", "source", "read", "dropped empty", "dropped dup", "rows", "truncated", "sequences",
            "prompt tok p50/p95/max", "target tok p50/p95/max"]
    rows = []
    for s in SPLIT_ORDER:
        n = d.get(s, 0)
        if not n and s not in d.get("read", {}):
            continue
        st = report["splits"].get(s)
        source = d["sources"].get(s, d["eval_from"] if s == "eval" else "")
        rows.append([s, _short(source), str(d["read"].get(s, "-")), str(d["dropped_empty"].get(s, 0)),
                     str(d["dropped_duplicate"].get(s, 0)), str(n), str(st["truncated"]) if st else "-",
                     str(st["features"]) if st else "-  (no targets)",
                     _lens(st["prompt_tokens"]) if st else "-", _lens(st["target_tokens"]) if st else "-"])
    lines = format_table(head, rows).splitlines()
    lines.append("")
    if "eval_prompts_truncated" in report:
        e = report["eval_prompts_truncated"]
        lines.append(f"evaluation (rank and generate) cuts {e['truncated']} of {e['rows']} eval prompts: they leave room "
                     "for the longest label + end token; 'truncated' above counts each row with its own label")
    for key, choice in report.get("auto", {}).items():
        lines.append(f"{key}: auto -> {choice['value']} ({choice['why']})")
    if "data.max_length" in report.get("auto", {}):
        c = report["auto"]["data.max_length"]
        lines.append(f"  with data.max_length={c['value']}: {c['rows_cut']} of {c['rows']} training rows are cut")
    if "sampled" in d:
        b, k = d["rows_before_sampling"], d["sampled"]
        lines.append(f"sampled with seed {k['seed']}: train {k['train']} of {b['train']} rows (data.max_train_rows), "
                     f"eval {k['eval']} of {b['eval']} (data.max_eval_rows)")
    pad, end = report["pad_token"], report["end_token"]
    lines.append(f"task: {report['task']}   pad token: {pad['token']!r} (id {pad['id']})"
                 f"   end token: {end['token']!r} (id {end['id']})"
                 f"   prefix: {report['prefix_tokens'] or 'none'}")
    for s, st in report["splits"].items():
        if "block_size" in st:
            lines.append(f"{s}: {st['tokens']} tokens packed into {st['features']} blocks of {st['block_size']} "
                         f"(last block shorter; {st['tail_tokens_dropped']} tail tokens dropped)")
        if "turns" in st:
            lines.append(f"{s}: {plural(st['conversations'], 'conversation')}, "
                         f"{plural(st['turns'], 'assistant turn')} trained on, tokens "
                         f"per turn p50/p95/max {_lens(st['tokens_per_turn'])}; {plural(st['truncated'], 'conversation')} "
                         f"lost {plural(st['turns_dropped'], 'oldest turn')} to fit max_length, {st['dropped_too_long']} "
                         "dropped (too long even with only their last turn)")
    counts = d.get("label_counts")
    if counts:
        labels = report["labels"]
        shown = labels if len(labels) <= 12 else labels[:12]
        lines.append(f"labels ({len(labels)}): " + ", ".join(
            f"{lab} " + "/".join(str(counts[s].get(lab, 0)) for s in SPLIT_ORDER if counts.get(s)) for lab in shown)
            + (f", ... ({len(labels) - 12} more)" if len(labels) > 12 else "")
            + "   (counts: " + "/".join(s for s in SPLIT_ORDER if counts.get(s)) + ")")
    return "\n".join(lines)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
