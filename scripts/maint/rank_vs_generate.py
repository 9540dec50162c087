"""Why can greedy `generate` evaluation beat `rank` on multi-character labels? A measurement on a 6-label task.

    python scripts/maint/rank_vs_generate.py [--out runs/rank_vs_generate] [--steps 60 300]

The task is built from the shipped ChnSentiCorp reviews: a review that mentions exactly one of six hotel aspects
(房间 服务 早餐 价格 环境 位置) gets that aspect as its label, and the aspect word is removed from the text, so
the model must infer it from context (吃/丰富 -> 早餐, 贵/元 -> 价格, ...). Six two-character labels, each two
tokens (+ the end token) with the BERT character tokenizer, with distinct first characters, imbalanced like real
data (房间 458 rows ... 位置 82).

For each training budget (LoRA, the shipped model, ``train.learning_rate: auto``), every held-out row is scored
with every label (one plain forward per row and label), and the label is chosen by:

- ``rank``: sum of log p over the label's tokens and the end token (clmtune's ``eval.method: rank``);
- ``rank, no end token``: the same without the end token;
- ``first token``: log p of the label's first token only;
- ``rank, calibrated``: ``rank`` minus the same score after a content-free prompt (the template with an empty
  review): contextual calibration (Zhao et al., 2021), which removes the label prior the model learned;
- ``generate``: clmtune's greedy decoding (``clmtune eval --method generate``), invalid outputs mapped to the
  nearest label, and the raw accuracy.

Prints a table and writes ``bench/results/rank_vs_generate_cpu.json`` (accuracy, macro-F1, how often each label is
predicted vs its share of the gold labels).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASPECTS = ["房间", "服务", "早餐", "价格", "环境", "位置"]
TEMPLATE = "评论：{review} 方面："


def build_task(folder: Path) -> Path:
    """The 6-aspect CSV (label,review) from the shipped reviews; the aspect word is removed from the text."""
    from clmtune.data import assets_path

    rows = []
    for r in csv.DictReader(open(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv"), encoding="utf-8")):
        hits = [a for a in ASPECTS if a in (r["review"] or "")]
        if len(hits) == 1 and len(r["review"]) <= 300:
            rows.append({"label": hits[0], "review": r["review"].replace(hits[0], "")})
    random.Random(0).shuffle(rows)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "aspects.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["label", "review"])
        w.writeheader()
        w.writerows(rows)
    return path


def score_variants(run: Path, examples, labels, max_length: int) -> dict[str, list[str]]:
    """Predictions of each rank variant: one forward per (row, label) over prompt + label + end."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from clmtune.config import ModelConfig, load_config
    from clmtune.models import load_model

    cfg = load_config(run / "config.yaml")
    tok = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path=cfg.model.name_or_path)), run / "adapter")
    model.eval()
    end = tok.eos_token_id if cfg.data.end_token == "eos" else tok.pad_token_id
    label_ids = [tok(lab, add_special_tokens=False).input_ids for lab in labels]
    room = max_length - max(len(x) for x in label_ids) - 1

    @torch.no_grad()
    def token_logprobs(prompt_ids: list[int]) -> list[list[float]]:
        """For each label: log p of each of its tokens and of the end token after ``prompt_ids``."""
        seqs = [prompt_ids + ids + [end] for ids in label_ids]
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros_like(batch)
        for i, s in enumerate(seqs):  # right padding: positions stay 0..len-1, nothing to shift
            batch[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), -1)
        out = []
        for i, ids in enumerate(label_ids):
            targets = ids + [end]
            start = len(prompt_ids)
            out.append([float(logp[i, start - 1 + k, t]) for k, t in enumerate(targets)])
        return out

    empty = tok(TEMPLATE.format(review=""), add_special_tokens=False).input_ids
    prior = [sum(x) for x in token_logprobs(empty)]
    preds = {"rank": [], "rank, no end token": [], "first token": [], "rank, calibrated": []}
    for e in examples:
        ids = tok(e.prompt, add_special_tokens=False).input_ids
        ids = ids[len(ids) - room:] if len(ids) > room else ids
        lp = token_logprobs(ids)
        variants = {"rank": [sum(x) for x in lp], "rank, no end token": [sum(x[:-1]) for x in lp],
                    "first token": [x[0] for x in lp],
                    "rank, calibrated": [sum(x) - p for x, p in zip(lp, prior)]}
        for name, scores in variants.items():
            preds[name].append(labels[max(range(len(labels)), key=scores.__getitem__)])
    return preds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/rank_vs_generate")
    ap.add_argument("--steps", type=int, nargs="+", default=[60, 300], help="LoRA training budgets (16 rows/step)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "rank_vs_generate_cpu.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from clmtune.config import load_config
    from clmtune.console import setup_console
    from clmtune.data import load_task
    from clmtune.evaluate import classification_metrics, evaluate_run
    from clmtune.text import format_table
    from clmtune.train import train

    setup_console()
    out = Path(args.out)
    data = build_task(out)
    base = {"data": {"source": str(data), "template": TEMPLATE, "label_column": "label", "labels": ASPECTS,
                     "stratify": True},
            "model": {"name_or_path": "builtin:gpt2-zh-small"},
            "peft": {"method": "lora", "r": 16, "target_modules": ["c_attn", "c_proj", "c_fc", "wte"]},
            "train": {"batch_size": 16, "epochs": 100, "overwrite": True}}
    results, table = {}, []
    for steps in args.steps:
        t0 = time.perf_counter()
        cfg = load_config(None, {**base, "train": {**base["train"], "max_steps": steps,
                                                   "output_dir": str(out / f"lora-{steps}")}})
        res = train(cfg, progress=False)
        run_cfg = load_config(res.output_dir / "config.yaml")
        task = load_task(run_cfg.data)
        gold = [e.label for e in task.eval]
        variants = score_variants(res.output_dir, task.eval, ASPECTS, run_cfg.data.max_length)
        gen, _ = evaluate_run(res.output_dir, "eval", method="generate", out_dir=out / f"lora-{steps}-generate",
                              progress=False)
        rank, _ = evaluate_run(res.output_dir, "eval", method="rank", out_dir=out / f"lora-{steps}-rank",
                               progress=False)
        gen_pred = [r["predicted"] for r in csv.DictReader(open(out / f"lora-{steps}-generate" / "predictions.csv",
                                                                 encoding="utf-8"))]
        row = {}
        for name, pred in {**variants, "generate (invalid -> nearest)": None}.items():
            m = gen["mapped_to_nearest_label"] if pred is None else classification_metrics(gold, pred, ASPECTS)
            p = pred if pred is not None else gen_pred
            row[name] = {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4),
                         "predicted_share": {a: round(sum(x == a for x in p) / len(p), 3) for a in ASPECTS}}
        row["generate (raw)"] = {"accuracy": round(gen["accuracy"], 4), "macro_f1": round(gen["macro_f1"], 4),
                                 "invalid": gen["invalid"]}
        row["clmtune eval --method rank"] = {"accuracy": round(rank["accuracy"], 4),
                                             "macro_f1": round(rank["macro_f1"], 4)}
        rank_pred = [r["predicted"] for r in csv.DictReader(open(out / f"lora-{steps}-rank" / "predictions.csv",
                                                                  encoding="utf-8"))]
        row["rows_where_rank_and_generate_differ"] = sum(a != b for a, b in zip(rank_pred, gen_pred))
        row["gold_share"] = {a: round(sum(x == a for x in gold) / len(gold), 3) for a in ASPECTS}
        row["final_loss"], row["seconds"] = res.final_loss, round(time.perf_counter() - t0, 1)
        results[f"{steps} steps"] = row
        for name, r in row.items():
            if isinstance(r, dict) and "accuracy" in r:
                table.append((f"{steps} steps", name, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                              " ".join(f"{a}{v:.2f}" for a, v in r.get("predicted_share", {}).items())))
        print(format_table(("budget", "method", "accuracy", "macro-F1", "predicted share"), table, "<<>><"),
              flush=True)
        print("gold share: " + " ".join(f"{a}{v:.2f}" for a, v in row["gold_share"].items()), flush=True)
    report = {"task": "ChnSentiCorp 6-aspect (see scripts/maint/rank_vs_generate.py)", "rows": {"eval": len(gold)},
              "model": "builtin:gpt2-zh-small + LoRA r16 (c_attn, c_proj, c_fc, wte)", "results": results}
    Path(args.results).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"results: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
