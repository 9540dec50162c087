"""Quality bar of the default model on the standard ChnSentiCorp split (train.tsv -> test.tsv, 1,200 reviews).

    PYTHONPATH=src python scripts/maint/quality.py [--train-rows 3000] [--out runs/quality]

Measured in one run, on the same training rows and the same test split:
- baseline: character 1-3-gram TF-IDF + logistic regression (scikit-learn), on the same rows and on all 9,600;
- builtin:gpt2-zh-small + LoRA (classification as generation, rank scoring of 差评/好评);
- builtin:gpt2-zh-small, full fine-tuning.
dev.tsv is not used; test.tsv is only scored. Results: OUT/quality.json and a table on stdout.
Developer-only (reads ../shared/data); the config's epochs over --train-rows rows (0 = all 9,600) per method;
LoRA with the config's settings, full fine-tuning with --full-lr.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "chnsenticorp"


def read_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


def tfidf_baseline(train: list[dict], test: list[dict]) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.perf_counter()
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    x = vec.fit_transform([r["text_a"] for r in train])  # (N, n-grams) sparse
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x, [r["label"] for r in train])
    pred = clf.predict(vec.transform([r["text_a"] for r in test]))
    gold = [r["label"] for r in test]
    return {"accuracy": accuracy_score(gold, pred), "macro_f1": f1_score(gold, pred, average="macro"),
            "train_rows": len(train), "seconds": time.perf_counter() - t0}


def finetune(method: str, train_file: Path, test_file: Path, out: Path, lr: float | None, model: str,
             epochs: int | None = None, override: dict | None = None) -> dict:
    """One fine-tuning with the shipped config; ``lr``/``epochs`` None: the config's."""
    from clmtune.config import load_config
    from clmtune.config.io import merge
    from clmtune.run import RunDir
    from clmtune.workflows import train_and_evaluate

    cfg = load_config(ROOT / "configs" / "chnsenticorp_classify.yaml", merge({
        "data": {"source": str(train_file), "eval_file": str(test_file), "text_column": "text_a",
                 "label_column": "label", "template": "评论：{text_a} 评价：", "padding": "longest"},
        "model": {"name_or_path": model},
        "peft": {"method": method, **({"target_modules": None} if method == "full" else {})},
        "train": {"output_dir": str(out / method), "overwrite": True, "batch_size": 16, "warmup_steps": 20,
                  **({"epochs": epochs} if epochs else {}), **({"learning_rate": lr} if lr else {})}},
        override or {}))
    t0 = time.perf_counter()
    done = train_and_evaluate(cfg)
    res, metrics = done.train, done.metrics
    summary = RunDir(res.output_dir).load_summary()
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "steps": res.steps,
            "final_loss": res.final_loss, "trainable_params": summary["trainable_params"],
            "epochs": cfg.train.epochs, "learning_rate": cfg.train.learning_rate,
            "r": cfg.peft.r if method == "lora" else None,
            "precision": summary.get("precision"), "max_length": cfg.data.max_length,
            "test_rows": sum(c["support"] for c in metrics["per_class"].values()),
            "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-rows", type=int, default=3000, help="first N rows of train.tsv (0 = all 9,600)")
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--model", default="builtin:gpt2-zh-small")
    ap.add_argument("--lora-lr", type=float, default=None, help="default: the config's train.learning_rate")
    ap.add_argument("--full-lr", type=float, default=3e-4)
    ap.add_argument("--data", default=str(DATA), help="folder with ChnSentiCorp train.tsv and test.tsv")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--only", choices=("lora", "full"), help="fine-tune with this method only (the baseline runs)")
    ap.add_argument("--epochs", type=int, default=None, help="passes over the training rows for each fine-tuning "
                    "(default: the config's train.epochs)")
    ap.add_argument("--override", type=json.loads, default=None,
                    help='config values for the fine-tunings, as JSON, e.g. \'{"peft": {"r": 64}}\'')
    ap.add_argument("--no-baseline", action="store_true", help="skip the TF-IDF baseline (a minute of CPU)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    train_all, test = read_tsv(data / "train.tsv"), read_tsv(data / "test.tsv")
    train = train_all[: args.train_rows] if args.train_rows else train_all  # train.tsv is already shuffled
    train_file = out / "train_subset.tsv"
    # tab-separated without quoting, as clmtune reads .tsv (texts hold no tabs or newlines: they came from a TSV)
    train_file.write_text("label\ttext_a\n" + "".join(f"{r['label']}\t{r['text_a']}\n" for r in train),
                          encoding="utf-8")

    results = {} if args.no_baseline else {"tfidf_char13_logreg (same rows)": tfidf_baseline(train, test)}
    if len(train) < len(train_all) and not args.no_baseline:
        results["tfidf_char13_logreg (all 9,600 rows)"] = tfidf_baseline(train_all, test)
    if args.only != "full":
        results[f"{args.model} + LoRA"] = finetune("lora", train_file, data / "test.tsv", out, args.lora_lr,
                                                   args.model, args.epochs, args.override)
    if args.only != "lora":
        results[f"{args.model} full fine-tuning"] = finetune("full", train_file, data / "test.tsv", out,
                                                             args.full_lr, args.model, args.epochs,
                                                             args.override)
    report = {"train_rows": len(train), "test_rows": len(test), "results": results}
    (out / "quality.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nChnSentiCorp test.tsv ({len(test)} reviews), trained on {len(train)} rows of train.tsv")
    from clmtune.text import format_table

    print(format_table(("system", "accuracy", "macro-F1", "time"),
                       [(name, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['seconds']:.0f}s")
                        for name, r in results.items()], align="<>>>"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
