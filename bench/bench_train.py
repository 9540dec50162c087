"""Training speed benchmark: clmtune vs the tutorial's recipe vs transformers.Trainer, measured in the same run.

    python bench/bench_train.py            # both models, all configurations (several minutes on 2 cores)
    python bench/bench_train.py --quick    # fewer rows for the GPT-2-zh model

Each configuration runs in its own child process, one after another, so peak memory (max RSS) is its own.
Configurations (all: one epoch, batch 8, LoRA r=8 on peft's default target modules, random weights):
  tutorial  peft's causal-LM example: every row padded to max_length, full logits, fp32, plain loop
  trainer   transformers.Trainer + peft, train_sampling_strategy="group_by_length" (transformers 5's
            name for group_by_length=True), dynamic padding, full logits
  clmtune   clmtune's default training path
  clmtune_bf16  clmtune with train.precision: bf16
Models:
  bloom     BLOOM architecture, 4 layers x 1024, vocabulary 250,880, the 50 twitter_complaints rows, max_length 64
  gpt2zh    GPT-2 architecture, 12 layers x 768, vocabulary 21,128 (BERT Chinese characters), ChnSentiCorp
            reviews as classification (好评/差评), max_length 256
Writes bench/results/train_<model>.json and prints a table with ratios against `tutorial`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = ["tutorial", "trainer", "clmtune", "clmtune_bf16"]


# ---------------------------------------------------------------------------------------------------------------
# model folders (random weights, real tokenizers)


def build_model(name: str, folder: Path) -> None:
    import torch
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

    from clmtune.models import _opt_bpe_tokenizer, bert_chinese_tokenizer

    torch.manual_seed(0)
    if name == "bloom":
        # BLOOM's own tokenizer file is not available here; the OPT/GPT-2 BPE gives English token counts of the
        # same order. Ids stay < 50,265 but the LM head is the full 250,880 wide, which is what costs time.
        tok = _opt_bpe_tokenizer()
        model = BloomForCausalLM(BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=4, n_head=16,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id))
    else:
        tok = bert_chinese_tokenizer()
        model = GPT2LMHeadModel(GPT2Config(vocab_size=21128, n_embd=768, n_layer=12, n_head=12, n_positions=512,
                                           pad_token_id=0, eos_token_id=102, bos_token_id=101))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def task_config(model: str, model_dir: Path, rows: int, out: Path) -> dict:
    if model == "bloom":
        data = {"source": "builtin:raft/twitter_complaints", "eval_fraction": 0.0, "max_length": 64}
    else:
        src = out / "reviews.csv"
        with open(REPO.parent / "shared/data/chnsenticorp/train.tsv", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            picked = [r for _, r in zip(range(rows), reader)]
        with open(src, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["review", "label"])
            w.writerows([r["text_a"], "好评" if r["label"] == "1" else "差评"] for r in picked)
        data = {"source": str(src), "template": "评论：{review} 情感：", "label_column": "label", "id_column": "id",
                "labels": ["差评", "好评"], "eval_fraction": 0.0, "max_length": 256}
    return {"data": data, "model": {"name_or_path": str(model_dir)},
            "peft": {"method": "lora", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1},
            "train": {"output_dir": str(out / "run"), "overwrite": True, "epochs": 1, "batch_size": 8,
                      "learning_rate": 3e-3, "seed": 42, "log_every": 1}}


def features(cfg_dict: dict, padding: str):
    """Tokenized rows exactly as clmtune prepares them; `padding` only matters to the collate step."""
    from clmtune.config import from_dict
    from clmtune.data import ClassificationEncoder, load_task
    from clmtune.models import load_tokenizer

    cfg = from_dict(cfg_dict).validate()
    tok = load_tokenizer(cfg.model)
    task = load_task(cfg.data)
    enc = ClassificationEncoder(tok, cfg.data)
    feats, _ = enc.encode_train(task.train)
    return cfg, tok, enc, feats


# ---------------------------------------------------------------------------------------------------------------
# one configuration (child process)


def run_tutorial(cfg_dict: dict) -> dict:
    """peft's causal-LM example: pad every row to max_length, model(**batch).loss (full logits), fp32."""
    from functools import partial

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    from clmtune.data import collate

    cfg, tok, enc, feats = features(cfg_dict, "max_length")
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1))
    loader = torch.utils.data.DataLoader(feats, batch_size=8, shuffle=True,
                                         collate_fn=partial(collate, pad_id=enc.pad_id, length=cfg.data.max_length))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = get_linear_schedule_with_warmup(opt, 0, len(loader))
    model.train()
    losses, tokens = [], 0
    t0 = time.perf_counter()
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "final_loss": losses[-1], "steps": len(losses)}


def run_trainer(cfg_dict: dict) -> dict:
    """What a user of the common tools gets: Trainer + peft, length-grouped sampling, dynamic padding."""
    from functools import partial

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from clmtune.data import collate

    cfg, tok, enc, feats = features(cfg_dict, "longest")
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1))
    losses: list[float] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=3e-3, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                             report_to=[], train_sampling_strategy="group_by_length", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=partial(collate, pad_id=enc.pad_id),
                      callbacks=[Keep()])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = sum(len(f["input_ids"]) for f in feats)
    return {"seconds": seconds, "tokens": tokens, "final_loss": losses[-1] if losses else float("nan"),
            "steps": len(losses)}


def run_clmtune(cfg_dict: dict, precision: str) -> dict:
    from clmtune.config import from_dict
    from clmtune.train import train

    cfg_dict["train"]["precision"] = precision
    cfg = from_dict(cfg_dict).validate()
    result = train(cfg, progress=False)
    log = [json.loads(line) for line in open(Path(cfg.train.output_dir) / "train_log.jsonl")]
    _, _, _, feats = features(cfg_dict, "longest")
    return {"seconds": result.seconds, "tokens": sum(len(f["input_ids"]) for f in feats),
            "final_loss": result.final_loss, "steps": len(log)}


def child(config: str, cfg_path: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    cfg_dict = json.loads(Path(cfg_path).read_text())
    if config == "tutorial":
        res = run_tutorial(cfg_dict)
    elif config == "trainer":
        res = run_trainer(cfg_dict)
    else:
        res = run_clmtune(cfg_dict, "bf16" if config.endswith("bf16") else "fp32")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------------------------------------------------------
# matmul peak and model FLOPs


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 10) -> float:
    """Achievable matmul FLOP/s on this machine for the given dtype (best of `reps`)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def training_flops_per_token(model_dir: Path, supervised_fraction: float, head_everywhere: bool) -> float:
    """~6 x (non-embedding parameters) per token for forward+backward of the trunk, plus the LM head
    (2 x d x V forward, 4 x d x V backward into hidden states) at the positions where it runs.

    LoRA freezes the base weights, so the weight-gradient matmuls are skipped: trunk ~ 4 x params per token instead
    of 6. We count that (what really runs), not the 6N of full training."""
    import json as _json

    cfg = _json.loads((model_dir / "config.json").read_text())
    d = cfg.get("hidden_size") or cfg.get("n_embd")
    layers = cfg.get("n_layer") or cfg.get("num_hidden_layers")
    vocab = cfg["vocab_size"]
    trunk = 12 * d * d * layers  # attention 4d^2 + MLP 8d^2 per layer
    head_share = 1.0 if head_everywhere else supervised_fraction
    return 4 * trunk + 6 * d * vocab * head_share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bloom,gpt2zh")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--gpt2zh-rows", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="32 GPT-2-zh rows instead of 96")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "CFG_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import platform

    (HERE / "results").mkdir(exist_ok=True)
    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    print(f"matmul peak on this machine: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    for model in args.models.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench_{model}_"))
        model_dir = work / "model"
        build_model(model, model_dir)
        rows = 32 if args.quick else args.gpt2zh_rows
        cfg = task_config(model, model_dir, rows, work)
        cfg_path = work / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        results = {}
        for config in args.configs.split(","):
            print(f"[{model}] {config} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--child", config, str(cfg_path)], capture_output=True,
                                  text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{model}/{config} failed")
            results[config] = json.loads(line[0][7:])
        base = results.get("tutorial")
        print(f"\n{model}: 1 epoch, batch 8\n| config | tokens/s | s/epoch | peak RSS MB | final loss | x tutorial |")
        print("|---|---|---|---|---|---|")
        for config, r in results.items():
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["speedup_vs_tutorial"] = base["seconds"] / r["seconds"] if base else None
            print(f"| {config} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['final_loss']:.4f} | {r['speedup_vs_tutorial'] or float('nan'):.2f} |")
        out = {"model": model, "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                           "processor": platform.processor()},
               "matmul_peak_flops": peaks, "results": results}
        (HERE / "results" / f"train_{model}.json").write_text(json.dumps(out, indent=2))
        print(f"written bench/results/train_{model}.json\n")


if __name__ == "__main__":
    main()
