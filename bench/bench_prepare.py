"""How fast does `clmtune prepare` get through a 100k-row CSV?

Writes a 100,000-row CSV (ChnSentiCorp reviews repeated, label,review) to a temporary folder, then times:
  baseline: one batched call of the fast tokenizer on the same prompts and targets (the floor: pure tokenization)
  prepare:  data.prepare_data (read CSV, filter, split, render templates, tokenize with datasets.map, build
            input_ids/labels, length statistics) for classify and lm (packing)
and prints seconds, rows/s and the ratio prepare/baseline.

    PYTHONPATH=src python bench/bench_prepare.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()

    from clmtune.config import DataConfig
    from clmtune.data import assets_path, prepare_data, read_table
    from clmtune.models import bert_chinese_tokenizer

    src = read_table(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv"))
    rows = [src[i % len(src)] for i in range(args.rows)]
    tok = bert_chinese_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reviews.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=["label", "review"])
            w.writeheader()
            w.writerows(rows)

        template = "评论：{review} 评价："
        texts = [template.format(review=r["review"]) for r in rows]
        t0 = time.perf_counter()
        tok(texts, add_special_tokens=False)
        tok(["好评" if r["label"] == "1" else "差评" for r in rows], add_special_tokens=False)
        base = time.perf_counter() - t0
        print(f"baseline (tokenizer only, {args.rows} rows): {base:.2f}s  {args.rows / base:,.0f} rows/s")

        for name, cfg in {
            "classify": DataConfig(source=str(path), template=template, label_column="label", labels=["差评", "好评"],
                                   max_length=128, end_token="pad"),
            "lm (packing)": DataConfig(source=str(path), task="lm", text_column="review", max_length=128),
        }.items():
            t0 = time.perf_counter()
            prep = prepare_data(tok, cfg)
            sec = time.perf_counter() - t0
            n = len(prep.train) + len(prep.eval)
            print(f"prepare {name}: {sec:.2f}s  {args.rows / sec:,.0f} rows/s  ratio vs baseline {sec / base:.2f}x  "
                  f"({n} sequences)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
