"""Preference tuning (DPO) of the hotel-review language model towards positive reviews, with its effect measured.

    python scripts/preference_demo.py [--lm-run RUN] [--out runs/preference_demo] [--steps N] [--samples 200]
    python scripts/preference_demo.py --write-pairs   # regenerate the shipped pairs (assets/chnsenticorp/pairs)

1. The start: the review language model (``configs/chnsenticorp_lm.yaml``, LoRA on ``builtin:gpt2-zh-small``;
   ``--lm-run`` reuses one, e.g. ``runs/demo/lm`` of ``make demo``, else it is trained here for ``--lm-steps``),
   merged into plain weights (``clmtune export --merge``): DPO's reference model.
2. DPO with LoRA on the shipped pairs (``configs/chnsenticorp_dpo.yaml``: prompt ``写一条酒店评论：``, chosen a
   positive review, rejected a negative one, from the training split only).
3. The effect: ``--samples`` reviews sampled after the prompt (top-k 10, temperature 1, seed 0) from the start and
   from the DPO run, each rated by a sentiment classifier trained on the training split (character 1-3-gram TF-IDF +
   logistic regression, the project's baseline): the share rated 好评 before and after, plus the held-out reward
   accuracy of the DPO run on the held-out pairs. Written to OUT/preference_demo.json.

``preference_step(lm_run, out)`` is the function ``make demo`` calls (one short step, the LM run it already has).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "写一条酒店评论："
PAIRS = ROOT / "src" / "clmtune" / "assets" / "chnsenticorp" / "pairs"


def classify_split():
    """The demo's classification split of ChnSentiCorp (configs/chnsenticorp_classify.yaml: 80/20, seed 123)."""
    from clmtune.config import load_config
    from clmtune.data import load_task

    task = load_task(load_config(ROOT / "configs" / "chnsenticorp_classify.yaml").data)
    review = lambda e: e.text  # noqa: E731  the template's one field: the review
    return ([(review(e), e.label) for e in task.train], [(review(e), e.label) for e in task.eval])


def make_pairs(rows: list[tuple[str, str]], n: int, seed: int, min_chars: int = 8, max_chars: int = 60) -> list[dict]:
    """``n`` pairs: a positive review (chosen) and a negative one (rejected) of ``min_chars``..``max_chars``
    characters, drawn without repetition with ``seed``, after the prompt ``写一条酒店评论：``."""
    ok = lambda t: min_chars <= len(t.strip()) <= max_chars  # noqa: E731
    pos = [t.strip() for t, y in rows if y == "好评" and ok(t)]
    neg = [t.strip() for t, y in rows if y == "差评" and ok(t)]
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    n = min(n, len(pos), len(neg))
    return [{"prompt": PROMPT, "chosen": pos[i], "rejected": neg[i]} for i in range(n)]


def write_pairs(folder: Path = PAIRS, n_train: int = 800, n_dev: int = 200) -> None:
    train, held_out = classify_split()
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows, n in (("train.jsonl", train, n_train), ("dev.jsonl", held_out, n_dev)):
        pairs = make_pairs(rows, n, seed=123)
        (folder / name).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                                   encoding="utf-8")
        print(f"{folder / name}: {len(pairs)} pairs")


def sentiment_classifier(rows: list[tuple[str, str]]):
    """Character 1-3-gram TF-IDF + logistic regression on the training split; returns texts -> share of 好评."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True),
                        LogisticRegression(max_iter=2000, C=4.0))
    clf.fit([t for t, _ in rows], [y for _, y in rows])
    return clf


def sample_reviews(model, tok, n: int, max_new_tokens: int = 60, seed: int = 0) -> list[str]:
    import torch

    from clmtune.config import GenerateConfig
    from clmtune.generate import generate

    settings = GenerateConfig(max_new_tokens=max_new_tokens, top_k=10, temperature=1.0, num_return_sequences=n,
                              seed=seed, batch_size=1)
    with torch.no_grad():
        return generate(model, tok, [PROMPT], settings)[0].outputs


def preference_step(lm_run: str | Path, out: str | Path, steps: int | None = 40, samples: int = 200,
                    progress: bool = True) -> dict:
    """DPO from the review LM run ``lm_run`` into ``out``: returns (and writes to OUT/preference_demo.json) the
    share of sampled reviews rated 好评 before and after, and the held-out reward accuracy and margin.

    The default 40 steps (of 8 pairs) is the short step for ``make demo``: 95 s of training and 306 s in all on a
    shared 2-core CPU, 64 % -> 100 % rated 好评, held-out reward accuracy 0.84 (``--steps 150``: 0.87)."""
    from clmtune.config import load_config
    from clmtune.export import export_run
    from clmtune.models import load_model
    from clmtune.run import RunDir
    from clmtune.config import ModelConfig
    from clmtune.workflows import train_and_evaluate

    out = Path(out)
    t0 = time.perf_counter()
    start = export_run(lm_run, out / "lm-merged", merge=True, overwrite=True)  # the reference: LM weights, merged
    clf = sentiment_classifier(classify_split()[0])
    overrides = {"model": {"name_or_path": str(start)},
                 "train": {"output_dir": str(out / "dpo"), "overwrite": True}}
    if steps is not None:
        overrides["train"]["max_steps"] = steps
    cfg = load_config(ROOT / "configs" / "chnsenticorp_dpo.yaml", overrides)
    done = train_and_evaluate(cfg, progress=progress)
    run = RunDir(done.train.output_dir)
    run_cfg = run.load_config()
    model, tok = run.load_model(cfg=run_cfg)
    after = sample_reviews(model.eval(), tok, samples)
    before = sample_reviews(load_model(ModelConfig(str(start))).eval(), tok, samples)
    share = lambda texts: float((clf.predict(texts) == "好评").mean())  # noqa: E731
    result = {"prompt": PROMPT, "samples": samples, "sampling": "top-k 10, temperature 1.0, seed 0, 60 new tokens",
              "share_positive_before": share(before), "share_positive_after": share(after),
              "held_out_reward_accuracy": done.metrics["reward_accuracy"],
              "held_out_reward_margin": done.metrics["reward_margin"], "held_out_pairs": done.metrics["n"],
              "dpo_steps": done.train.steps, "seconds": round(time.perf_counter() - t0, 1),
              "examples_before": before[:5], "examples_after": after[:5]}
    (out / "preference_demo.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lm-run", help="a finished run of configs/chnsenticorp_lm.yaml (trained here when absent)")
    ap.add_argument("--lm-steps", type=int, default=120)
    ap.add_argument("--out", default="runs/preference_demo")
    ap.add_argument("--steps", type=int, default=150, help="DPO optimizer steps (train.max_steps)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--write-pairs", action="store_true", help="regenerate the shipped pairs and exit")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.write_pairs:
        write_pairs()
        return 0
    from clmtune.config import load_config
    from clmtune.workflows import train_and_evaluate

    lm_run = args.lm_run
    if lm_run is None:
        lm_run = str(Path(args.out) / "lm")
        cfg = load_config(ROOT / "configs" / "chnsenticorp_lm.yaml",
                          {"train": {"output_dir": lm_run, "overwrite": True, "max_steps": args.lm_steps}})
        train_and_evaluate(cfg, evaluate=False)
    r = preference_step(lm_run, args.out, args.steps, args.samples)
    print(f"sampled reviews rated 好评: {r['share_positive_before']:.1%} before DPO -> {r['share_positive_after']:.1%} "
          f"after ({r['samples']} samples each); held-out reward accuracy {r['held_out_reward_accuracy']:.3f} "
          f"(margin {r['held_out_reward_margin']:.3f}, {r['held_out_pairs']} pairs); {r['seconds']:.0f}s")
    print(f"  details: {Path(args.out) / 'preference_demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
