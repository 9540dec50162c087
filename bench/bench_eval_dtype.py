"""Does bf16 evaluation predict what fp32 evaluation predicts, on a *trained* model? (``eval.dtype``, issue 18)

    python bench/bench_eval_dtype.py                 # LoRA on the shipped gpt2-zh-small, 1,600 reviews: ~5 min here
    python bench/bench_eval_dtype.py --train-rows 800 --methods rank

Trains ``configs/chnsenticorp_classify.yaml`` (LoRA r 16 on the shipped, pretrained ``builtin:gpt2-zh-small``,
ChnSentiCorp hotel reviews -> 差评/好评, max_length 256) on the first ``--train-rows`` rows of its training split
for one epoch, then evaluates the whole held-out split (20 %, 1,553 reviews) with each method in fp32 and in bf16
(``clmtune.inference.for_inference``: bf16 weights, oneDNN-packed matmuls with the activation fused, what
``eval.dtype: auto`` runs on a CPU with native bf16 units), through ``clmtune.evaluate.evaluate_run`` (what
``clmtune eval --dtype`` runs). Reports, per method, the share of reviews whose predicted label is the same in both
precisions, both accuracies and both times (one torch thread). With random weights (bench_eval.py) every label
is nearly equally likely and bf16 rounding flips near-ties; a trained model is what users evaluate.
Writes bench/results/eval_dtype_gpt2zh_cpu.json.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))
from common import result_path  # noqa: E402  (bench/common.py)

from clmtune.config import load_config  # noqa: E402
from clmtune.device import cpu_matrix_features, describe_cpu  # noqa: E402
from clmtune.evaluate import evaluate_run  # noqa: E402
from clmtune.train import train  # noqa: E402


def predictions(folder: Path) -> list[str]:
    with open(folder / "predictions.csv", encoding="utf-8") as fh:
        return [r["predicted"] for r in csv.DictReader(fh)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-rows", type=int, default=1600)
    ap.add_argument("--methods", default="rank,generate")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="eval_dtype_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # models of up to GBs: never left in /tmp
    os.environ.setdefault("CLMTUNE_HOME", str(work / "home"))
    cfg = load_config(REPO / "configs/chnsenticorp_classify.yaml",
                      {"data": {"max_train_rows": args.train_rows}, "train": {"output_dir": str(work / "run")}})
    t = time.perf_counter()
    run = train(cfg, progress=False).output_dir
    train_s = time.perf_counter() - t
    print(f"trained in {train_s:.0f} s; {describe_cpu()}; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()), flush=True)
    out = {"model": "builtin:gpt2-zh-small + LoRA (configs/chnsenticorp_classify.yaml)",
           "train_rows": args.train_rows, "train_seconds": train_s, "when": time.strftime("%Y-%m-%d %H:%M"),
           "machine": {**cpu_matrix_features(), "torch_threads": torch.get_num_threads(),
                       "load_average_start": os.getloadavg()}, "methods": {}}
    for method in args.methods.split(","):
        res, preds = {}, {}
        for dtype in ("fp32", "bf16"):
            t = time.process_time()
            metrics, folder = evaluate_run(run, method=method, dtype=dtype, out_dir=work / f"{method}-{dtype}",
                                           progress=False)
            res[dtype] = {"accuracy": metrics["accuracy"], "macro_f1": metrics.get("macro_f1"),
                          "invalid": metrics["invalid"], "seconds": metrics["seconds"],
                          "cpu_seconds": time.process_time() - t, "precision": metrics["precision"]}
            preds[dtype] = predictions(folder)
        n = len(preds["fp32"])
        same = sum(a == b for a, b in zip(preds["fp32"], preds["bf16"]))
        out["methods"][method] = {"n": n, "same_prediction": same, "same_share": same / n, **res}
        print(f"{method:<9} n={n}: bf16 = fp32 on {same} ({100 * same / n:.2f} %); accuracy fp32 "
              f"{res['fp32']['accuracy']:.4f} bf16 {res['bf16']['accuracy']:.4f}; seconds fp32 "
              f"{res['fp32']['seconds']:.2f} bf16 {res['bf16']['seconds']:.2f} "
              f"({res['fp32']['seconds'] / res['bf16']['seconds']:.2f}x)", flush=True)
    out["machine"]["load_average_end"] = os.getloadavg()
    path = result_path("eval_dtype", "gpt2zh")
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
