"""Evaluation speed: ``rank`` vs ``generate`` on the same model and split, measured in the same run.

    python bench/bench_eval.py               # both models (about two minutes on 2 shared cores)
    python bench/bench_eval.py --only tiny-opt

Both methods go through ``clmtune.evaluate.evaluate_examples`` (what ``clmtune eval`` runs), batch 16, and must
agree on the number of examples. Models (random weights, real tokenizers):
  tiny-opt   clmtune's built-in OPT (2 layers x 64, OPT/GPT-2 BPE vocabulary 50,265) on the first 320 unlabelled
             rows of RAFT twitter_complaints (labels ``complaint`` / ``no complaint``), max_length 64
  gpt2zh     GPT-2 12 layers x 768, vocabulary 21,128 (BERT Chinese characters), 48 ChnSentiCorp dev reviews
             (labels 差评 / 好评), max_length 64
Timed repeats alternate between the methods; medians are compared. Threads: 1 by default, for the reason given
in bench_generate.py (two threads on this shared 2-core machine measure the neighbours).
Writes bench/results/eval_<model>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

from clmtune.config import from_dict  # noqa: E402
from clmtune.data import load_task, render_examples, read_table  # noqa: E402
from clmtune.evaluate import evaluate_examples  # noqa: E402
from clmtune.models import bert_chinese_tokenizer, builtin_model_path, load_model, load_tokenizer  # noqa: E402


def setup(name: str, tmp: Path):
    """(model, tokenizer, RunConfig, examples, labels) for one benchmark model."""
    if name == "tiny-opt":
        os.environ.setdefault("CLMTUNE_HOME", str(tmp / "home"))
        cfg = from_dict({"model": {"name_or_path": str(builtin_model_path("tiny-opt"))}}).validate()
        task = load_task(cfg.data)
        examples, labels = task.test[:320], task.labels
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = bert_chinese_tokenizer()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=21128, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                           pad_token_id=0, eos_token_id=102, bos_token_id=101))
        folder = tmp / "gpt2zh"
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        src = tmp / "reviews.csv"
        with open(REPO.parent / "shared/data/chnsenticorp/dev.tsv", encoding="utf-8") as fh:
            rows = [r for _, r in zip(range(48), csv.DictReader(fh, delimiter="\t"))]
        with open(src, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["review", "label"])
            w.writerows([r["text_a"], "好评" if r["label"] == "1" else "差评"] for r in rows)
        cfg = from_dict({"model": {"name_or_path": str(folder)},
                         "data": {"source": str(src), "template": "评论：{review} 情感：", "label_column": "label",
                                  "labels": ["差评", "好评"], "eval_fraction": 0.0, "max_length": 64}}).validate()
        labels = ["差评", "好评"]
        examples, _ = render_examples(read_table(src), cfg.data, labels, str(src), labelled=True)
    model = load_model(cfg.model)
    model.eval()
    return model, load_tokenizer(cfg.model), cfg, examples, labels


def bench(name: str, repeats: int, tmp: Path) -> dict:
    model, tok, cfg, examples, labels = setup(name, tmp)
    cfg.eval.batch_size = 16
    times: dict[str, list[float]] = {"rank": [], "generate": []}
    for method in times:  # warm-up
        evaluate_examples(model, tok, cfg, examples[:16], labels, method, tmp / "warm", progress=False)
    results = {}
    for _ in range(repeats):
        for method in times:
            res = evaluate_examples(model, tok, cfg, examples, labels, method, tmp / method, progress=False)
            assert res["n"] == len(examples)
            times[method].append(res["seconds"])
            results[method] = {k: res[k] for k in ("invalid", "accuracy", "macro_f1") if k in res}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "examples": len(examples), "labels": labels, "batch_size": 16, "repeats": repeats,
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "torch": torch.__version__},
            "seconds": times, "median_seconds": med,
            "examples_per_s": {k: len(examples) / v for k, v in med.items()},
            "last_results": results, "speedup_rank_vs_generate": med["generate"] / med["rank"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["tiny-opt", "gpt2zh"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [args.only] if args.only else ["tiny-opt", "gpt2zh"]
    print(f"{'model':<9} {'n':>4} {'rank s':>8} {'generate s':>11} {'rank ex/s':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = bench(name, args.repeats, Path(tmp))
            out = HERE / "results" / f"eval_{name}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            m = r["median_seconds"]
            print(f"{name:<9} {r['examples']:>4} {m['rank']:>8.2f} {m['generate']:>11.2f} "
                  f"{r['examples_per_s']['rank']:>10.1f} {r['speedup_rank_vs_generate']:>6.2f}x   -> {out}")


if __name__ == "__main__":
    main()
