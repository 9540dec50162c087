"""Evaluation speed: ``rank`` vs ``generate`` on the same model and split, measured in the same run.

    python bench/bench_eval.py                      # every case below (about four minutes on 2 shared cores)
    python bench/bench_eval.py --only gpt2zh --batch-sizes 16
    python bench/bench_eval.py --device cuda        # on a GPU (default: auto = the GPU when there is one)

Every method goes through ``clmtune.evaluate.evaluate_examples`` (what ``clmtune eval`` runs) and must agree on the
number of examples. Cases (random weights, real tokenizers and data):
  tiny-opt   clmtune's built-in OPT (2 layers x 64, OPT/GPT-2 BPE vocabulary 50,265), first 320 unlabelled rows of
             RAFT twitter_complaints, labels ``complaint`` / ``no complaint``, max_length 64
  banking77  the same model on the first 32 unlabelled rows of RAFT banking_77: 77 labels of up to 9 tokens
             (a label tree of 232 nodes)
  gpt2zh     GPT-2 12 layers x 768, vocabulary 21,128 (BERT Chinese characters), 48 ChnSentiCorp dev reviews
             (labels 差评 / 好评), max_length 64
Methods: ``rank`` (clmtune's default: prompt + label tree in one forward), ``rank_shared_cache`` (the previous
implementation: prompt forward, then its KV cache repeated per label and a second forward; kept for
architectures that cannot take a custom 4D mask, e.g. BLOOM) and ``generate`` (greedy decoding of up to longest
label + 2 tokens with the KV cache, stopping at the end token; random weights never write it, so every step runs).
Batch sizes: 16 (throughput) and 1 (one example per call: the latency-bound regime, where per-call overhead rather
than arithmetic sets the time, as for small models on a GPU).
Timed repeats alternate between the methods; medians are compared. Threads: 1 by default, for the reason given in
bench_generate.py (two threads on this shared 2-core machine measure the neighbours).
Writes bench/results/eval_<case>.json.
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
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

import clmtune.evaluate as ev  # noqa: E402
from clmtune.config import from_dict  # noqa: E402
from clmtune.data import load_task, read_table, render_examples  # noqa: E402
from clmtune.models import (bert_chinese_tokenizer, builtin_model_path, load_model, load_tokenizer,  # noqa: E402
                            resolve_device)

CASES = ("tiny-opt", "banking77", "gpt2zh")
METHODS = ("rank", "rank_shared_cache", "generate")


def setup(name: str, tmp: Path):
    """(model, tokenizer, RunConfig, examples, labels) for one benchmark case."""
    if name in ("tiny-opt", "banking77"):
        os.environ.setdefault("CLMTUNE_HOME", str(tmp / "home"))
        raw = {"model": {"name_or_path": str(builtin_model_path("tiny-opt"))}}
        if name == "banking77":
            raw["data"] = {"source": "builtin:raft/banking_77", "template": "Query : {Query} label : ",
                           "label_column": "Label", "id_column": "ID", "end_token": "eos"}
        cfg = from_dict(raw).validate()
        task = load_task(cfg.data)
        examples, labels = task.test[:320 if name == "tiny-opt" else 32], task.labels
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
    return load_model(cfg.model).eval(), load_tokenizer(cfg.model), cfg, examples, labels


def run_method(model, tok, cfg, examples, labels, method: str, out: Path) -> dict:
    if method == "rank_shared_cache":
        with mock.patch.object(ev, "rank_strategy", lambda m: "shared_cache"):
            return ev.evaluate_examples(model, tok, cfg, examples, labels, "rank", out, progress=False)
    return ev.evaluate_examples(model, tok, cfg, examples, labels, method, out, progress=False)


def bench(name: str, batch_size: int, repeats: int, device: torch.device, tmp: Path) -> dict:
    model, tok, cfg, examples, labels = setup(name, tmp)
    model.to(device)
    cfg.eval.batch_size = batch_size
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for method in METHODS:  # warm-up
        run_method(model, tok, cfg, examples[:batch_size], labels, method, tmp / "warm")
    agree = None
    for _ in range(repeats):
        preds = {}
        for method in METHODS:
            res = run_method(model, tok, cfg, examples, labels, method, tmp / method)
            assert res["n"] == len(examples)
            times[method].append(res["seconds"])
            rows = list(csv.reader(open(tmp / method / "predictions.csv", encoding="utf-8")))[1:]
            preds[method] = [r[-1] for r in rows]
        agree = preds["rank"] == preds["rank_shared_cache"]
        assert agree, "the two rank implementations predict differently"
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "examples": len(examples), "labels": len(labels), "batch_size": batch_size,
            "repeats": repeats, "device": str(device),
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "seconds": times, "median_seconds": med,
            "examples_per_s": {k: len(examples) / v for k, v in med.items()},
            "rank_predictions_equal_shared_cache": agree,
            "speedup_rank_vs_generate": med["generate"] / med["rank"],
            "speedup_rank_vs_rank_shared_cache": med["rank_shared_cache"] / med["rank"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=CASES)
    ap.add_argument("--batch-sizes", default="16,1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    names = [args.only] if args.only else list(CASES)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"device {device}, {torch.get_num_threads()} torch thread(s)")
    print(f"{'case':<10} {'n':>4} {'labels':>6} {'batch':>5} {'rank s':>8} {'shared s':>9} {'generate s':>11} "
          f"{'rank/generate':>14} {'rank/shared':>12}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = []
            for b in sizes:
                r = bench(name, b, args.repeats, device, Path(tmp))
                results[name].append(r)
                m = r["median_seconds"]
                print(f"{name:<10} {r['examples']:>4} {r['labels']:>6} {b:>5} {m['rank']:>8.2f} "
                      f"{m['rank_shared_cache']:>9.2f} {m['generate']:>11.2f} "
                      f"{r['speedup_rank_vs_generate']:>13.2f}x {r['speedup_rank_vs_rank_shared_cache']:>11.2f}x",
                      flush=True)
            out = HERE / "results" / f"eval_{name}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(results[name], indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
