"""Evaluation during training (``train.eval_steps``) against the final ``clmtune eval`` on the same weights: rows/s.

LoRA on the shipped ``builtin:gpt2-zh-small`` (the resolved defaults: r 64 on every linear layer and ``wte``),
ChnSentiCorp reviews (``max_train_rows`` training rows, ``max_eval_rows`` held-out rows, ``max_length`` 128), bf16,
one torch thread. The training evaluates every 2 steps and after its last step, on every held-out row (eval_loss +
rank accuracy); then ``evaluate_run`` scores the saved run (rank accuracy) twice. The fastest of each is reported
(the machine is shared). Writes ``results/bench_watch_eval_<machine>.json``.

    python bench/bench_watch_eval.py [--train-rows 64] [--eval-rows 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, result_path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-rows", type=int, default=64)
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from clmtune.config import load_config
    from clmtune.evaluate import evaluate_run
    from clmtune.train import train

    out = Path(tempfile.mkdtemp(prefix="bench_watch_eval_"))
    try:
        batch = 16
        cfg = load_config(overrides={
            "data": {"source": "builtin:chnsenticorp/ChnSentiCorp_htl_all.csv", "task": "classify",
                     "template": "评论：{review} 评价：", "label_column": "label", "labels": ["差评", "好评"],
                     "eval_fraction": 0.2, "seed": 123, "max_length": 128, "end_token": "eos",
                     "max_train_rows": args.train_rows, "max_eval_rows": args.eval_rows},
            "model": {"name_or_path": "builtin:gpt2-zh-small"}, "peft": {"method": "lora"},
            "train": {"output_dir": str(out / "run"), "epochs": 1, "batch_size": batch, "precision": "bf16",
                      "eval_steps": 2, "eval_max_rows": args.eval_rows},
            "eval": {"method": "rank"}})
        t0 = time.perf_counter()
        res = train(cfg, progress=False)
        train_s = time.perf_counter() - t0
        log = [json.loads(x) for x in (res.output_dir / "train_log.jsonl").read_text().splitlines()]
        evals = [r for r in log if "eval_rows" in r]
        during = min(evals, key=lambda r: r["eval_seconds"])
        during["eval_accuracy"] = evals[-1].get("eval_accuracy")  # the final weights' numbers
        during["eval_loss"] = evals[-1].get("eval_loss")
        finals = []
        for _ in range(2):
            t0 = time.perf_counter()
            final, _ = evaluate_run(res.output_dir, progress=False)
            finals.append((final["seconds"], time.perf_counter() - t0, final))
        _, final_s, final = min(finals, key=lambda x: x[0])
        result = {
            "cpu": cpu_name(), "threads": 1, "train_rows": args.train_rows, "eval_rows": during["eval_rows"],
            "train_seconds_total": round(train_s, 2),
            "during": {"seconds": during["eval_seconds"], "rows_per_s": round(during["eval_rows"] / during["eval_seconds"], 1),
                       "accuracy": during.get("eval_accuracy"), "eval_loss": during.get("eval_loss")},
            "final": {"seconds": final["seconds"], "rows_per_s": final["examples_per_s"], "accuracy": final["accuracy"],
                      "seconds_with_loading": round(final_s, 2), "precision": final["precision"]},
        }
        print(json.dumps(result, indent=1))
        path = result_path("bench_watch_eval", args.tag)
        path.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
