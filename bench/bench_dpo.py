"""DPO training speed: TRL's DPOTrainer vs clmtune (data.task: preference), in the same run, one process each.

    python bench/bench_dpo.py [--epochs 1] [--threads 1]

Same model (builtin:gpt2-zh-small + LoRA r 16 on c_attn/c_proj/c_fc, alpha 32, dropout 0.1; the reference is the
base with the adapter switched off in both), same data (the shipped ChnSentiCorp pairs, assets/chnsenticorp/pairs/
train.jsonl: 545 pairs), same token ids (clmtune's encoding, handed to TRL as its tokenized ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``: TRL would wrap a BERT-vocabulary prompt in [CLS] ... [SEP]), same batch (8 pairs),
optimizer (AdamW, lr 1e-3, linear decay, no warmup, clipping 1.0), DPO beta 0.1, fp32 both, whole epochs.

  trl      trl.DPOTrainer (TRL 1.x: chosen and rejected in one forward, its fused log-prob LM head)
  clmtune  clmtune's default training path: length-grouped batches left-padded to their longest pair, the LM head
           only on the response positions, the reference forward with the adapter switched off

tokens/s counts the real tokens of the chosen and rejected sequences trained on (prompt counted in both).
Writes bench/results/dpo_gpt2zh_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from common import cpu_name, result_path  # noqa: E402  (bench/common.py)

MODEL = "builtin:gpt2-zh-small"
BATCH, LR, BETA, MAX_LENGTH = 8, 1e-3, 0.1, 80
TARGETS = ["c_attn", "c_proj", "c_fc"]


def data_cfg():
    from clmtune.config import DataConfig

    return DataConfig(task="preference", source="builtin:chnsenticorp/pairs/train.jsonl", eval_fraction=0.0,
                      max_length=MAX_LENGTH)


def encoded():
    from clmtune.config import ModelConfig
    from clmtune.data import prepare_data
    from clmtune.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(MODEL))
    return tok, prepare_data(tok, data_cfg()).train


def run_trl(epochs: int, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from clmtune.models import resolve_model_path

    tok, train = encoded()
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for ids, lab, r_ids, r_lab in zip(train["input_ids"], train["labels"], train["rejected_input_ids"],
                                      train["rejected_labels"]):
        rows["prompt_ids"].append([i for i, m in zip(ids, lab) if m == -100])
        rows["chosen_ids"].append([i for i, m in zip(ids, lab) if m != -100])
        rows["rejected_ids"].append([i for i, m in zip(r_ids, r_lab) if m != -100])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL))
    args = DPOConfig(output_dir=str(work / "trl"), beta=BETA, per_device_train_batch_size=BATCH,
                     num_train_epochs=epochs, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                     max_grad_norm=1.0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, seed=0, bf16=False, max_length=None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS, task_type="CAUSAL_LM")
    text = [json.loads(x) for x in (REPO / "src/clmtune/assets/chnsenticorp/pairs/train.jsonl").read_text(
        encoding="utf-8").splitlines()]
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(text), processing_class=tok,
                         peft_config=lora)
    trainer.train_dataset = Dataset.from_dict(rows)  # clmtune's token ids (see the module docstring)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "steps": out.global_step, "final_loss": logs[-1]["loss"],
            "final_margin": logs[-1].get("rewards/margins")}


def run_clmtune(epochs: int, work: Path) -> dict:
    from clmtune.config import ModelConfig, PeftSettings, PreferenceConfig, RunConfig, TrainConfig
    from clmtune.train import train

    out = work / "clmtune"
    cfg = RunConfig(data=data_cfg(), model=ModelConfig(MODEL),
                    peft=PeftSettings(method="lora", r=16, lora_alpha=32, lora_dropout=0.1, target_modules=TARGETS),
                    train=TrainConfig(output_dir=str(out), overwrite=True, epochs=epochs, batch_size=BATCH,
                                      learning_rate=LR, warmup_steps=0, max_grad_norm=1.0, precision="fp32"),
                    preference=PreferenceConfig(loss="dpo", beta=BETA)).validate()
    result = train(cfg, progress=False)
    log = [json.loads(line) for line in open(out / "train_log.jsonl", encoding="utf-8")]
    return {"seconds": result.seconds, "steps": len(log), "final_loss": log[-1]["loss"],
            "final_margin": log[-1]["rewards/margins"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        res = (run_trl if args.child == "trl" else run_clmtune)(args.epochs, Path(args.work))
        print("RESULT " + json.dumps(res))
        return
    _, train = encoded()
    tokens = args.epochs * sum(len(a) + len(b) for a, b in zip(train["input_ids"], train["rejected_input_ids"]))
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as work:
        for name in ("trl", "clmtune"):
            print(f"{name} ...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--threads",
                                   str(args.threads), "--child", name, "--work", work], capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                       "OMP_NUM_THREADS": str(args.threads)})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-4000:])
                raise SystemExit(f"{name} failed")
            results[name] = json.loads(line[0][7:])
            results[name]["tokens_per_s"] = tokens / results[name]["seconds"]
    report = {"model": MODEL, "method": "lora r16", "data": "assets/chnsenticorp/pairs/train.jsonl",
              "pairs": len(train), "tokens": tokens, "epochs": args.epochs, "batch_pairs": BATCH,
              "threads": args.threads, "cpu": cpu_name(), "load_average": os.getloadavg(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "speedup": results["clmtune"]["tokens_per_s"] / results["trl"]["tokens_per_s"], "results": results}
    result_path("dpo", "gpt2zh").write_text(json.dumps(report, indent=1) + "\n")
    print("\n| trainer | steps | seconds | tokens/s | last-step loss | last-step margin |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['final_loss']:.4f} | "
              f"{r['final_margin']} |")
    print(f"\nclmtune / TRL tokens/s: {report['speedup']:.2f}x on {report['cpu']}, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
