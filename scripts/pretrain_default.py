"""Reproduce clmtune's default model, ``builtin:gpt2-zh-small``: a small Chinese GPT-2 pretrained by clmtune itself.

    PYTHONPATH=src python scripts/pretrain_default.py            # build, pretrain, ship into src/clmtune/assets
    PYTHONPATH=src python scripts/pretrain_default.py --pilot    # ~2 minutes: measure tokens/s for sizing
    ... --resume                                                 # continue an interrupted run from its checkpoint

Steps (developer-only: it reads ../shared/data at build time; users get the shipped folder):
1. Corpus: CLUECorpusSmall_sampled.txt + the review texts of ChnSentiCorp train.tsv (never dev/test), one .txt
   file each, one document per line.
2. Tokenizer: the BERT Chinese character vocabulary of uer/gpt2-chinese-cluecorpussmall, cut to the tokens that
   the full tokenizer produces on the corpus + the specials + printable ASCII (so English letters and digits
   never become [UNK]). Token ids are renumbered; the order follows the original vocab.txt.
3. Model: GPT2LMHeadModel with random init (seed 0), saved with the tokenizer to BUILD/init.
4. Pretraining: ``clmtune.train.train`` with data.task=lm (documents + [SEP], packed into blocks),
   peft.method=full, checkpoints every ``save_steps`` so an interrupted run resumes exactly.
5. Held-out perplexity (the last 1 % of lines of each file, never trained on) and the stats in BUILD/stats.json;
   the weights (safetensors) and tokenizer are copied into src/clmtune/assets/models/gpt2-zh-small/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NAME = "gpt2-zh-small"

# The size chosen from the pilot (see MODEL_CARD.md): ~5.3 M parameters, ~21 MB in fp32 safetensors. The pilot
# measured ~1,400 tokens/s on this (shared, 2-core) machine, but only ~700 tokens/s while other jobs share the cores: ~40 minutes see ~1.6 M tokens, one pass over the
# corpus: no dropout (under-fitting regime), small batches for more optimizer steps.
ARCH = dict(n_embd=256, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BLOCK = 256          # tokens per packed training block (= n_positions: every position gets trained)
BATCH = 8            # blocks per step: 2,048 tokens
LR, WARMUP, WD = 1e-3, 100, 0.01
EPOCHS = 1
MAX_STEPS = 800      # linear decay to 0 at this step (~1.6 M tokens, ~1 epoch; sized for ~40 min here)


def build_corpus(build: Path) -> dict:
    """Write BUILD/corpus/{train,heldout}/*.txt; returns line/char counts. Last 1 % of each file is held out."""
    import csv

    docs = {"cluecorpussmall": [ln.strip() for ln in (SHARED / "corpora/CLUECorpusSmall_sampled.txt")
                                .read_text(encoding="utf-8").splitlines()]}
    with open(SHARED / "chnsenticorp/train.tsv", encoding="utf-8", newline="") as fh:
        docs["chnsenticorp_train"] = [r["text_a"].strip() for r in csv.DictReader(fh, delimiter="\t",
                                                                                  quoting=csv.QUOTE_NONE)]
    stats = {}
    for name, lines in docs.items():
        lines = [ln for ln in lines if ln]
        n_held = max(1, len(lines) // 100)
        for split, part in (("train", lines[:-n_held]), ("heldout", lines[-n_held:])):
            folder = build / "corpus" / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
            stats[f"{name}/{split}"] = {"lines": len(part), "chars": sum(map(len, part))}
    return stats


def build_tokenizer(build: Path):
    """Cut the BERT Chinese vocabulary to what the corpus uses (+ specials + ASCII); returns the tokenizer."""
    from collections import Counter

    from transformers import BertTokenizer

    from clmtune.models import bert_chinese_tokenizer

    full = bert_chinese_tokenizer()
    counts: Counter[str] = Counter()
    for path in sorted((build / "corpus" / "train").glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            counts.update(full.tokenize(line))  # basic tokenizer (lower case, CJK split) + wordpiece
    keep = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} | set(counts)
    keep |= {chr(c) for c in range(33, 127)}  # printable ASCII as single tokens (if in the BERT vocab)
    # vocab.txt order ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then the characters): the tokenizer's
    # .vocab dict comes from a hash map whose order changes between processes, so sort by the original id.
    original = [t for t, _ in sorted(full.get_vocab().items(), key=lambda kv: kv[1])]
    vocab = {}
    for tok in original:
        if tok in keep and tok not in vocab:
            vocab[tok] = len(vocab)
    unk_count = counts.get("[UNK]", 0)
    tok = BertTokenizer(vocab=vocab, eos_token="[SEP]", pad_token="[PAD]")
    return tok, {"vocab_size": len(vocab), "corpus_tokens_unk": unk_count,
                 "corpus_tokens": sum(counts.values())}


def build_init_model(tok, folder: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     pad_token_id=tok.pad_token_id, **ARCH)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


@torch.no_grad()
def heldout_perplexity(model, tok, folder: Path, block: int = BLOCK) -> dict:
    """exp(mean next-token NLL) over the held-out lines, packed like training ([SEP] after each line)."""
    ids: list[int] = []
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8").splitlines():
            ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    x = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)  # (N, block)
    model.eval()
    nll, n = 0.0, 0
    for chunk in x.split(32):
        out = model(input_ids=chunk, labels=chunk)  # HF shifts labels itself; mean over chunk.numel()-N tokens
        k = chunk.shape[0] * (block - 1)
        nll, n = nll + out.loss.item() * k, n + k
    return {"heldout_tokens": n, "heldout_loss": nll / n, "heldout_ppl": math.exp(nll / n)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(ROOT / "runs" / "pretrain"), help="working folder")
    ap.add_argument("--pilot", action="store_true", help="only 40 steps, to measure tokens/s")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--max-steps", type=int, default=MAX_STEPS)
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result into src/clmtune/assets")
    args = ap.parse_args()

    from clmtune.config import load_config
    from clmtune.train import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build = Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    stats_path = build / "stats.json"
    if args.resume and stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    else:
        stats = {"corpus": build_corpus(build)}
        tok, stats["tokenizer"] = build_tokenizer(build)
        build_init_model(tok, build / "init")
        stats["arch"], stats["batch_tokens"] = ARCH, BLOCK * BATCH
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(stats, indent=1, ensure_ascii=False))

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(None, {
        "data": {"source": str(build / "corpus" / "train"), "task": "lm", "text_column": "text", "packing": True,
                 "block_size": BLOCK, "max_length": BLOCK, "end_token": "eos", "eval_fraction": 0.0, "seed": 0},
        "model": {"name_or_path": str(build / "init")},
        "peft": {"method": "full"},
        "train": {"output_dir": str(build / ("pilot" if args.pilot else "run")), "overwrite": not args.resume,
                  "epochs": args.epochs, "max_steps": 40 if args.pilot else args.max_steps, "batch_size": BATCH,
                  "learning_rate": LR, "warmup_steps": WARMUP, "weight_decay": WD, "seed": 0, "log_every": 10,
                  "save_steps": None if args.pilot else 200, "save_total_limit": 1},
    })
    t0 = time.time()
    result = train(cfg, resume="latest" if args.resume else None)
    log = [json.loads(ln) for ln in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((result.output_dir / "train_summary.json").read_text(encoding="utf-8"))
    tps = [r["tokens_per_s"] for r in log[1:]] or [log[-1]["tokens_per_s"]]
    run = {"steps": result.steps, "epochs": args.epochs, "tokens_seen": result.steps * BLOCK * BATCH,
           "train_blocks": summary["data"] if "data" in summary else None,
           "first_loss": result.first_loss, "final_loss": result.final_loss,
           "final_loss_mean_last_50": sum(r["loss"] for r in log[-5:]) / len(log[-5:]),
           "seconds_this_invocation": round(time.time() - t0, 1), "tokens_per_s_median": sorted(tps)[len(tps) // 2],
           "params": summary["all_params"], "torch_threads": torch.get_num_threads()}
    tok = AutoTokenizer.from_pretrained(result.output_dir / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(result.output_dir / "model", dtype=torch.float32)
    run.update(heldout_perplexity(model, tok, build / "corpus" / "heldout"))
    stats["pilot" if args.pilot else "pretrain"] = run
    stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(run, indent=1, ensure_ascii=False))
    if not args.pilot and not args.no_ship:
        dest = ROOT / "src" / "clmtune" / "assets" / "models" / NAME
        dest.mkdir(parents=True, exist_ok=True)
        for p in list((result.output_dir / "model").iterdir()) + list((result.output_dir / "tokenizer").iterdir()):
            if p.name != "training_args.bin":
                shutil.copy2(p, dest / p.name)
        (dest / "pretrain_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"shipped to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
