"""Reproduce clmtune's default model, ``builtin:gpt2-zh-small``: a small Chinese GPT-2 pretrained by clmtune itself.

    PYTHONPATH=src python scripts/maint/pretrain_default.py            # build, pretrain, ship into assets
    PYTHONPATH=src python scripts/maint/pretrain_default.py --pilot    # 40 steps from the random init: tokens/s
    ... --resume                                                 # continue an interrupted run from its checkpoint
    ... --layers 8 --width 288 --heads 8 --epochs 24 --no-ship   # another size / length (a sweep)

Steps (developer-only: it reads ../shared/data at build time; users get the shipped folder):
1. Corpus: CLUECorpusSmall_sampled.txt + the review texts of ChnSentiCorp train.tsv (never dev/test) + the shipped
   chatterbot-corpus Chinese conversations (``builtin:chat/chatterbot-zh``, one conversation per line), one .txt
   file each, one document per line.
2. Tokenizer: the BERT Chinese character vocabulary of uer/gpt2-chinese-cluecorpussmall, cut to the tokens that
   the full tokenizer produces on the corpus + the specials + printable ASCII (so English letters and digits
   never become [UNK]). Token ids are renumbered; the order follows the original vocab.txt.
3. Model: GPT2LMHeadModel with random init (seed 0), saved with the tokenizer to BUILD/init.
4. Pretraining with ``clmtune.train.train``, data.task=lm (documents + [SEP], packed into 256-token blocks),
   peft.method=full, bf16 autocast, several passes over the corpus, checkpoints every 200 steps so an interrupted
   run resumes exactly. It runs on whatever accelerate picks: a CUDA GPU when one is visible, else the CPU.
5. Held-out perplexity (the last 1 % of lines of each file, never trained on), stats in BUILD/stats.json; the
   weights, cast to bf16, and the tokenizer are written to src/clmtune/assets/models/gpt2-zh-small/.
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

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
NAME = "gpt2-zh-small"

# Size: 10.4 M parameters (8 layers x 288 + an 8 k-character embedding), stored in bf16 (20.7 MB, under the 25 MB
# asset limit). The corpus (1.65 M tokens) is small for it, so it is trained for 12 passes with dropout 0.1. A sweep
# on one GPU (scripts/maint/gpu_pretrain_sweep.py, all four in the same run; held-out perplexity): 8 x 288, 12 passes
# 55.6; 6 x 320, 12 passes 56.7; 4 x 256, 12 passes 62.4; 6 x 320, 30 passes 73.4 (over-fitted: train loss 2.4).
# The shipped weights were trained on an NVIDIA H200 with exactly this script's defaults (2.5 minutes); on a
# 2-core AVX-512-bf16 CPU a pilot of this size ran ~1,550 tokens/s on one idle core: an estimated 2-4 hours.
ARCH = dict(n_embd=288, n_layer=8, n_head=8, n_positions=256, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
BLOCK = 256          # tokens per packed training block (= n_positions: every position gets trained)
# One stage from the random init, bf16 autocast; batch = blocks per step (32 x 256 = 8,192 tokens); lr decays
# linearly to 0 at the last step. epochs = passes over the training text.
PRETRAIN = dict(batch=32, lr=1e-3, warmup=200, wd=0.1, epochs=12, max_steps=None, precision="bf16", seed=0)


def build_corpus(build: Path, shared: Path = SHARED) -> dict:
    """Write BUILD/corpus/{train,heldout}/*.txt; returns line/char counts. Last 1 % of each file is held out."""
    import csv

    docs = {"cluecorpussmall": [ln.strip() for ln in (shared / "corpora/CLUECorpusSmall_sampled.txt")
                                .read_text(encoding="utf-8").splitlines()]}
    with open(shared / "chnsenticorp/train.tsv", encoding="utf-8", newline="") as fh:
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


def build_init_model(tok, folder: Path, arch: dict) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     pad_token_id=tok.pad_token_id, **arch)
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
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.eval().to(dev)
    nll, n = 0.0, 0
    for chunk in x.split(32):
        chunk = chunk.to(dev)
        out = model(input_ids=chunk, labels=chunk)  # HF shifts labels itself; mean over chunk.numel()-N tokens
        k = chunk.shape[0] * (block - 1)
        nll, n = nll + out.loss.item() * k, n + k
    model.to("cpu")
    return {"heldout_tokens": n, "heldout_loss": nll / n, "heldout_ppl": math.exp(nll / n)}


def pretrain(init: Path, build: Path, st: dict, args, pilot: bool = False) -> dict:
    """Pretraining with clmtune's own trainer (task lm, full fine-tuning) from the model in ``init``."""
    from clmtune.config import load_config
    from clmtune.train import train

    out = build / ("pilot" if pilot else "pretrain")
    cfg = load_config(None, {
        "data": {"source": str(build / "corpus" / "train"), "task": "lm", "text_column": "text", "packing": True,
                 "block_size": BLOCK, "max_length": BLOCK, "end_token": "eos", "eval_fraction": 0.0, "seed": 0},
        "model": {"name_or_path": str(init)},
        "peft": {"method": "full"},
        "train": {"output_dir": str(out), "overwrite": not args.resume, "epochs": st["epochs"],
                  "max_steps": 40 if pilot else st["max_steps"], "batch_size": st["batch"],
                  "learning_rate": st["lr"], "warmup_steps": st["warmup"], "weight_decay": st["wd"],
                  "seed": st["seed"], "log_every": 10, "precision": st["precision"],
                  "save_steps": None if pilot else 200, "save_total_limit": 1},
    })
    t0 = time.time()
    resume = "latest" if args.resume and (out / "checkpoints").is_dir() else None
    result = train(cfg, resume=resume)
    log = [json.loads(ln) for ln in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((result.output_dir / "train_summary.json").read_text(encoding="utf-8"))
    tps = [r["tokens_per_s"] for r in log[1:]] or [log[-1]["tokens_per_s"]]
    return {**st, "steps": result.steps, "tokens_seen": result.steps * BLOCK * st["batch"],
            "first_loss": result.first_loss, "final_loss": result.final_loss,
            "final_loss_mean_last_50": sum(r["loss"] for r in log[-5:]) / len(log[-5:]),
            "seconds_this_invocation": round(time.time() - t0, 1),
            "tokens_per_s_median": sorted(tps)[len(tps) // 2], "params": summary["all_params"],
            "precision_used": summary["precision"], "device": _device_name(),
            "torch_threads": torch.get_num_threads(), "output_dir": str(result.output_dir)}


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from clmtune.device import describe_cpu

    return describe_cpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(ROOT / "runs" / "pretrain"), help="working folder")
    ap.add_argument("--pilot", action="store_true", help="only 40 steps from the random init, to measure tokens/s")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--shared-data", default=str(SHARED), help="the shared data folder (read at build time only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result into src/clmtune/assets")
    ap.add_argument("--layers", type=int, default=ARCH["n_layer"])
    ap.add_argument("--width", type=int, default=ARCH["n_embd"])
    ap.add_argument("--heads", type=int, default=ARCH["n_head"])
    ap.add_argument("--dropout", type=float, default=ARCH["resid_pdrop"])
    ap.add_argument("--epochs", type=int, default=PRETRAIN["epochs"], help="passes over the training text")
    ap.add_argument("--max-steps", type=int, default=PRETRAIN["max_steps"], help="stop (and end the decay) here")
    ap.add_argument("--batch", type=int, default=PRETRAIN["batch"], help="256-token blocks per step")
    ap.add_argument("--lr", type=float, default=PRETRAIN["lr"])
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    arch = {**ARCH, "n_layer": args.layers, "n_embd": args.width, "n_head": args.heads,
            **{k: args.dropout for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}}
    st = {**PRETRAIN, "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "max_steps": args.max_steps}
    build = Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    stats_path = build / "stats.json"
    if args.resume and stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    else:
        stats = {"corpus": build_corpus(build, Path(args.shared_data))}
        tok, stats["tokenizer"] = build_tokenizer(build)
        build_init_model(tok, build / "init", arch)
        stats["arch"], stats["block"] = arch, BLOCK
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(stats, indent=1, ensure_ascii=False), flush=True)

    run = pretrain(build / "init", build, st, args, pilot=args.pilot)
    tok = AutoTokenizer.from_pretrained(Path(run["output_dir"]) / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(Path(run["output_dir"]) / "model", dtype=torch.float32)
    model.to(torch.bfloat16)  # the shipped weights: bf16 (the perplexity below is measured on them, computed in fp32)
    shipped = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.float32)
    run.update(heldout_perplexity(model, tok, build / "corpus" / "heldout"))
    stats["pilot" if args.pilot else "pretrain"] = run
    stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(run, indent=1, ensure_ascii=False), flush=True)
    if args.pilot:
        return 0
    dest = build / "shipped" if args.no_ship else ROOT / "src" / "clmtune" / "assets" / "models" / NAME
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.glob("*.safetensors"):
        p.unlink()
    model.to(torch.bfloat16)
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    model.save_pretrained(dest, safe_serialization=True)  # bf16 weights; config.json says dtype bfloat16
    for p in (Path(run["output_dir"]) / "tokenizer").iterdir():
        shutil.copy2(p, dest / p.name)
    (dest / "pretrain_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"written to {dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
