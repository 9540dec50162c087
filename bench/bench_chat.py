"""Chat fine-tuning speed: TRL's SFTTrainer (as its documentation recommends) vs clmtune, in the same run.

    python bench/bench_chat.py [--epochs 1] [--threads 1]

Same model (builtin:gpt2-zh-small, full fine-tuning), same data (the chatterbot-zh conversations of clmtune's
training split, written once to a JSONL both read), same template (clmtune's built-in ``zh``, with
``{% generation %}`` markers), same batch (16 conversations), optimizer (AdamW, lr 5e-4, linear decay, no warmup,
gradient clipping 1.0) and number of optimizer steps (whole epochs: every conversation once per epoch). Each
trainer runs in its own child process.

  trl      trl.SFTTrainer + SFTConfig(assistant_only_loss=True, padding_free=True): the loss on the assistant's
           tokens only, and the batch flattened into one padding-free row (position_ids restart per conversation),
           the setting TRL's documentation gives for speed. (TRL also offers packing; with 16 conversations per
           step and no padding either way, padding-free keeps the same conversations per step as clmtune.)
  clmtune  clmtune's default training path (data.task: chat): length-grouped batches left-padded to their
           longest row, LM head only on the supervised positions, loss per supervised token.

tokens/s counts real (non-pad) tokens of the conversations trained on. Before training, both compute the loss of
one identical batch (the first 16 conversations, initial weights); the two must agree (to 1e-4), and both must
tokenize every conversation to the same ids with the same assistant mask.
Writes bench/results/chat_gpt2zh_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
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
BATCH, LR, MAX_LENGTH = 16, 5e-4, 256


def train_conversations() -> list[list[dict]]:
    """The training split clmtune makes of builtin:chat/chatterbot-zh (80 %, seed 123), less the conversations
    longer than the model's 256 positions (TRL does not truncate padding-free rows; clmtune would drop old turns)."""
    from clmtune.config import load_config
    from clmtune.data import load_task
    from clmtune.tasks.chat_encoding import tokens_and_mask

    cfg = load_config(REPO / "configs" / "chat_zh.yaml")
    tok = tokenizer_with_template()
    convs = [e.conversation.as_dicts() for e in load_task(cfg.data).train]
    return [c for c in convs if len(tokens_and_mask(tok, c)[0]) <= MAX_LENGTH]


def tokenizer_with_template():
    from clmtune.chat_templates import install_chat_template
    from clmtune.config import ModelConfig
    from clmtune.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=MODEL))
    install_chat_template(tok, "zh")
    return tok


def clmtune_batch_loss(model, tok, convs) -> float:
    """Loss of one batch exactly as clmtune's training step computes it (mean over supervised tokens)."""
    import torch

    from clmtune.data import collate
    from clmtune.tasks.chat_encoding import encode_conversations
    from clmtune.models import forward_inputs
    from clmtune.train.loss import causal_lm_loss, head_positions

    feats, _ = encode_conversations(tok, convs, MAX_LENGTH)
    batch = collate(feats, tok.pad_token_id)
    with torch.no_grad():
        inputs = forward_inputs(model, batch)
        inputs["logits_to_keep"] = head_positions(batch["labels"], "mask")
        return float(causal_lm_loss(model(**inputs).logits, batch["labels"]))


def run_trl(data: Path, epochs: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from clmtune.tasks.chat_encoding import tokens_and_mask
    from clmtune.models import resolve_model_path

    convs = [json.loads(line)["messages"] for line in data.read_text(encoding="utf-8").splitlines()]
    tok = tokenizer_with_template()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL))
    args = SFTConfig(output_dir=str(data.parent / "trl"), assistant_only_loss=True, padding_free=True,
                     max_length=None, per_device_train_batch_size=BATCH, num_train_epochs=epochs, learning_rate=LR,
                     lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     seed=0, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"messages": convs}),
                         processing_class=tok)
    # the same token ids and assistant masks as clmtune's encoder, conversation by conversation
    mismatched = 0
    for k in range(len(convs)):
        ids, mask = tokens_and_mask(tok, convs[k])
        row = trainer.train_dataset[k]
        trl_mask = [int(x != -100) for x in row.get("labels", [])] or row.get("assistant_masks")
        mismatched += row["input_ids"] != ids or list(trl_mask) != mask
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    with torch.no_grad():
        first_loss = float(trainer.compute_loss(model, batch))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "train_runtime": out.metrics.get("train_runtime"), "steps": out.global_step,
            "tokens": int(logs[-1]["num_tokens"]), "first_batch_loss": first_loss, "final_loss": logs[-1]["loss"],
            "tokenization_mismatches": mismatched, "config": "SFTConfig(assistant_only_loss=True, padding_free=True)"}


def run_clmtune(data: Path, epochs: int) -> dict:
    import torch

    from clmtune.tasks.chat_encoding import tokens_and_mask
    from clmtune.config import ModelConfig, load_config
    from clmtune.models import load_model
    from clmtune.train import train

    tok = tokenizer_with_template()
    convs = [json.loads(line)["messages"] for line in data.read_text(encoding="utf-8").splitlines()]
    torch.manual_seed(0)
    first_loss = clmtune_batch_loss(load_model(ModelConfig(name_or_path=MODEL)).eval(), tok, convs[:BATCH])
    out = data.parent / "clmtune"
    cfg = load_config(REPO / "configs" / "chat_zh.yaml", {
        "data": {"source": str(data), "eval_fraction": 0.0, "max_length": MAX_LENGTH},
        "peft": {"method": "full", "target_modules": None},
        "train": {"output_dir": str(out), "overwrite": True, "batch_size": BATCH, "learning_rate": LR,
                  "warmup_steps": 0, "max_grad_norm": 1.0, "epochs": epochs}})
    result = train(cfg, progress=False)
    log = [json.loads(line) for line in open(out / "train_log.jsonl", encoding="utf-8")]
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    conv = summary["conversations"]["train"]
    assert conv["dropped_too_long"] == 0 and conv["truncated"] == 0, conv  # the same tokens as TRL's
    tokens = epochs * sum(len(tokens_and_mask(tok, c)[0]) for c in convs)  # every conversation once per epoch
    return {"seconds": result.seconds, "steps": len(log), "tokens": tokens, "first_batch_loss": first_loss,
            "final_loss": log[-1]["loss"], "lm_head_positions": summary["lm_head_positions"]}


def child(name: str, data: str, epochs: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    res = (run_trl if name == "trl" else run_clmtune)(Path(data), epochs)
    print("RESULT " + json.dumps(res, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=1, help="epochs of 16-conversation steps (24 steps each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.epochs)
    os.environ["BENCH_THREADS"] = str(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_chat_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # models of up to GBs: never left in /tmp
    data = work / "train.jsonl"
    convs = train_conversations()
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")
    results = {}
    for name in ("trl", "clmtune"):
        print(f"{name} ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--epochs", str(args.epochs), "--child", name, str(data)],
                              capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-4000:])
            raise SystemExit(f"{name} failed")
        results[name] = json.loads(line[0][7:])
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    trl, ours = results["trl"], results["clmtune"]
    agree = abs(trl["first_batch_loss"] - ours["first_batch_loss"]) < 1e-4
    report = {"model": MODEL, "data": "builtin:chat/chatterbot-zh (training split)", "conversations": len(convs),
              "epochs": args.epochs, "steps": {k: r["steps"] for k, r in results.items()}, "batch": BATCH,
              "threads": args.threads, "cpu": cpu_name(), "load_average": os.getloadavg(),
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "speedup": ours["tokens_per_s"] / trl["tokens_per_s"], "first_batch_loss_agrees": agree,
              "results": results}
    result_path("chat", "gpt2zh").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("\n| trainer | steps | tokens | seconds | tokens/s | first-batch loss | last-step loss |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['first_batch_loss']:.6f} | {r['final_loss']:.4f} |")
    print(f"\nclmtune / TRL tokens/s: {report['speedup']:.2f}x; identical-batch loss agrees: {agree}; "
          f"TRL tokenization mismatches: {trl['tokenization_mismatches']}")


if __name__ == "__main__":
    main()
