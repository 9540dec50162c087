"""Reproduce clmtune's default model, ``builtin:gpt2-zh-small``: a small Chinese GPT-2 pretrained by clmtune itself.

    PYTHONPATH=src python scripts/pretrain_default.py            # build, pretrain (2 stages), ship into assets
    PYTHONPATH=src python scripts/pretrain_default.py --pilot    # ~5 minutes: 40 stage-2 steps, tokens/s
    ... --resume                                                 # continue an interrupted run from its checkpoint
    ... --stage1-model FOLDER                                    # skip stage 1, continue from a stage-1 model

Steps (developer-only: it reads ../shared/data at build time; users get the shipped folder):
1. Corpus: CLUECorpusSmall_sampled.txt + the review texts of ChnSentiCorp train.tsv (never dev/test), one .txt
   file each, one document per line.
2. Tokenizer: the BERT Chinese character vocabulary of uer/gpt2-chinese-cluecorpussmall, cut to the tokens that
   the full tokenizer produces on the corpus + the specials + printable ASCII (so English letters and digits
   never become [UNK]). Token ids are renumbered; the order follows the original vocab.txt.
3. Model: GPT2LMHeadModel with random init (seed 0), saved with the tokenizer to BUILD/init.
4. Pretraining with ``clmtune.train.train``, data.task=lm (documents + [SEP], packed into 256-token blocks),
   peft.method=full, checkpoints every 100 steps so an interrupted run resumes exactly: stage 1 (fp32, ~1 pass)
   from BUILD/init, then stage 2 (bf16 autocast, ~0.6 pass, fresh warm-up and decay) from stage 1's weights.
5. Held-out perplexity (the last 1 % of lines of each file, never trained on) after each stage, stats in
   BUILD/stats.json; the stage-2 weights, cast to bf16, and the tokenizer are written to
   src/clmtune/assets/models/gpt2-zh-small/.

The shipped weights were made with ``--stage1-model`` pointing at the first release's weights (stage 1 of this
recipe, run on 2026-11-25, shipped before with a vocabulary in hash-map order): a full rebuild gives the same recipe
with permuted token ids, not bit-identical weights.
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

# Two stages. Stage 1 is the first release's recipe: ~5.3 M parameters (4 x 256), fp32, 800 steps of 2,048 tokens
# (~1 pass over the corpus, ~30 min here on 2 threads), linear decay to 0; loss still falling. Stage 2 continues
# from it in bf16 autocast for another ~0.6 pass with a fresh warm-up and decay (a new data order: seed 1), and the
# result is shipped in bf16 (10.5 MB). Why not a larger model from scratch: a pilot (bf16, one torch thread, idle
# 2-core AVX-512-bf16 CPU) measured ~2,400 tokens/s for 4 x 256 and ~1,550 for 6 x 320, but during the run the
# two cores were shared with up to 10 other jobs and 6 x 256 fell to ~290-420 tokens/s: ~1 M tokens in 45 minutes,
# fewer than stage 1 alone had seen. Continuing the existing model is what that CPU budget could improve.
ARCH = dict(n_embd=256, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
BLOCK = 256          # tokens per packed training block (= n_positions: every position gets trained)
STAGES = {           # batch = blocks per step (8 x 256 = 2,048 tokens); lr decays linearly to 0 at max_steps
    "stage1": dict(batch=8, lr=1e-3, warmup=100, wd=0.01, epochs=1, max_steps=800, precision="fp32", seed=0),
    "stage2": dict(batch=8, lr=5e-4, warmup=30, wd=0.01, epochs=1, max_steps=480, precision="bf16", seed=1),
}


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


def run_stage(name: str, init: Path, build: Path, args, pilot: bool = False) -> dict:
    """One pretraining stage with clmtune's own trainer (task lm, full fine-tuning) from the model in ``init``."""
    from clmtune.config import load_config
    from clmtune.train import train

    st = STAGES[name]
    out = build / ("pilot" if pilot else name)
    cfg = load_config(None, {
        "data": {"source": str(build / "corpus" / "train"), "task": "lm", "text_column": "text", "packing": True,
                 "block_size": BLOCK, "max_length": BLOCK, "end_token": "eos", "eval_fraction": 0.0, "seed": 0},
        "model": {"name_or_path": str(init)},
        "peft": {"method": "full"},
        "train": {"output_dir": str(out), "overwrite": not args.resume, "epochs": st["epochs"],
                  "max_steps": 40 if pilot else st["max_steps"], "batch_size": st["batch"],
                  "learning_rate": st["lr"], "warmup_steps": st["warmup"], "weight_decay": st["wd"],
                  "seed": st["seed"], "log_every": 10, "precision": st["precision"],
                  "save_steps": None if pilot else 100, "save_total_limit": 1},
    })
    t0 = time.time()
    resume = "latest" if args.resume and (out / "checkpoints").is_dir() else None
    result = train(cfg, resume=resume)
    log = [json.loads(ln) for ln in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((result.output_dir / "train_summary.json").read_text(encoding="utf-8"))
    tps = [r["tokens_per_s"] for r in log[1:]] or [log[-1]["tokens_per_s"]]
    return {"init": str(init), **st, "steps": result.steps, "tokens_seen": result.steps * BLOCK * st["batch"],
            "first_loss": result.first_loss, "final_loss": result.final_loss,
            "final_loss_mean_last_50": sum(r["loss"] for r in log[-5:]) / len(log[-5:]),
            "seconds_this_invocation": round(time.time() - t0, 1),
            "tokens_per_s_median": sorted(tps)[len(tps) // 2], "params": summary["all_params"],
            "precision_used": summary["precision"], "torch_threads": torch.get_num_threads(),
            "output_dir": str(result.output_dir)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default=str(ROOT / "runs" / "pretrain"), help="working folder")
    ap.add_argument("--pilot", action="store_true", help="only 40 steps of stage 2, to measure tokens/s")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
    ap.add_argument("--stage1-model", help="skip stage 1: continue from this model folder (weights + tokenizer), "
                    "e.g. the first release's weights (git show 4550547:src/clmtune/assets/models/gpt2-zh-small)")
    ap.add_argument("--shared-data", default=str(SHARED), help="the shared data folder (read at build time only)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result into src/clmtune/assets")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    build = Path(args.build)
    build.mkdir(parents=True, exist_ok=True)
    stats_path = build / "stats.json"
    if args.resume and stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    else:
        stats = {"corpus": build_corpus(build, Path(args.shared_data))}
        if not args.stage1_model:
            tok, stats["tokenizer"] = build_tokenizer(build)
            build_init_model(tok, build / "init")
        stats["arch"], stats["block"] = ARCH, BLOCK
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(stats, indent=1, ensure_ascii=False))

    def save_stats():
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")

    if args.stage1_model:
        stage1 = Path(args.stage1_model)
        stats["stage1"] = {"init": "given (--stage1-model)", "folder": str(stage1)}
        if (stage1 / "pretrain_stats.json").is_file():  # what that model's own run recorded (a shipped release)
            stats["stage1"]["recorded"] = json.loads((stage1 / "pretrain_stats.json").read_text(encoding="utf-8"))
    elif args.pilot:  # speed only: 40 stage-2 steps from the random init, no stage 1
        stage1 = build / "init"
        stats["stage1"] = {"init": "skipped (--pilot)"}
    elif "stage1" in stats and "steps" in stats["stage1"]:
        stage1 = Path(stats["stage1"]["output_dir"]) / "model"  # resumed after stage 1 had finished
    else:
        stats["stage1"] = run_stage("stage1", build / "init", build, args)
        stage1 = Path(stats["stage1"]["output_dir"]) / "model"
        save_stats()
    stage1_tok = stage1 if (stage1 / "tokenizer.json").is_file() else stage1.parent / "tokenizer"
    if not (stage1 / "tokenizer.json").is_file():  # clmtune run folders keep the tokenizer beside model/
        AutoTokenizer.from_pretrained(stage1_tok).save_pretrained(stage1)
    tok = AutoTokenizer.from_pretrained(stage1)
    held = heldout_perplexity(AutoModelForCausalLM.from_pretrained(stage1, dtype=torch.float32), tok,
                              build / "corpus" / "heldout")
    stats["stage1"].update({f"stage1_{k}": v for k, v in held.items()})
    print("stage 1 held-out:", held, flush=True)

    run = run_stage("stage2", stage1, build, args, pilot=args.pilot)
    model = AutoModelForCausalLM.from_pretrained(Path(run["output_dir"]) / "model", dtype=torch.float32)
    model.to(torch.bfloat16)  # the shipped weights: bf16 (the perplexity below is measured on them, computed in fp32)
    shipped = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.float32)
    run.update(heldout_perplexity(model, tok, build / "corpus" / "heldout"))
    stats["pilot" if args.pilot else "stage2"] = run
    save_stats()
    print(json.dumps(run, indent=1, ensure_ascii=False))
    if not args.pilot and not args.no_ship:
        dest = ROOT / "src" / "clmtune" / "assets" / "models" / NAME
        dest.mkdir(parents=True, exist_ok=True)
        for p in dest.glob("*.safetensors"):
            p.unlink()
        model.to(torch.bfloat16)
        assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
        model.save_pretrained(dest, safe_serialization=True)  # bf16 weights; config.json says dtype bfloat16
        for p in (Path(run["output_dir"]) / "tokenizer").iterdir():
            shutil.copy2(p, dest / p.name)
        (dest / "pretrain_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"shipped to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
