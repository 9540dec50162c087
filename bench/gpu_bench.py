"""Issue 27's GPU measurements in one run (at most ~8 minutes on one H100/H200):

    python bench/gpu_bench.py --out DIR            # every configuration; DIR/gpu_bench_<gpu>.json
    python bench/gpu_bench.py --out DIR --smoke    # every configuration at toy size, on the CPU (~2 minutes)
    python bench/gpu_bench.py --out DIR --only tut_tutorial,tut_clmtune_bf16
    python bench/gpu_bench.py --table bench/results/gpu_bench_h100.json   # the table for bench/README.md

Each configuration runs in its own child process with a timeout; one that fails, times out or whose package is
missing (TRL) records why, and the run goes on. The JSON is rewritten after every configuration, so a run killed
at its limit still leaves what it measured. Models (random weights, built once per run, OPT BPE tokenizer as
bench/bench_train.py does) and data live in a temporary folder that is removed at the end.

  tut_*    the tutorial settings of issue 27: BLOOM-560m architecture (24 x 1024, vocabulary 250,880), the
           twitter_complaints rows repeated to 400, batch 8, max_length 64, LoRA r 8 (alpha 32, dropout 0.1) on
           query_key_value, lr 3e-3; seconds of the second epoch (50 steps; the first is the warm-up).
           tutorial (peft's example loop, fp32, rows padded to 64), trainer (transformers.Trainer + peft, bf16,
           length-grouped), clmtune bf16 / fp32, and bf16 with each speed path of clmtune.train.speed switched
           (plain: device_loss and fused_adamw off; compile; chunked_loss).
  sft_*    a realistic batch: chat rows of 200-1,000 tokens, ~16k tokens per optimizer step, LoRA r 16 on every
           linear layer, bf16; BLOOM-560m and a 1.1B LLaMA architecture (TinyLlama's shapes, vocabulary 50,272 for
           the OPT tokenizer); clmtune, transformers.Trainer + peft, TRL's SFTTrainer (padding-free; Liger kernels
           when importable; skipped when TRL is not importable), clmtune with train.chunked_loss (BLOOM: the
           250,880-word head on ~8k supervised positions), with train.padding_free and FlexAttention (LLaMA),
           and full fine-tuning of the 560m model. Real
           (non-pad) tokens/s over the steps after the first log line; MFU from the FLOPs of useful work per real
           token (forward 2N + input gradients 2N, + 2N weight gradients for full fine-tuning, attention scores,
           the LM head on the supervised positions) over the measured bf16 matmul peak and the datasheet's.
  infer_*  rank evaluation (clmtune) vs peft's example evaluation (generate, then match), and batched generation
           (clmtune.generate) vs a plain transformers generate, on the 1.1B LLaMA in bf16.
  serve_16 `clmtune serve` (the 1.1B LLaMA) with 16 concurrent clients (needs fastapi/uvicorn: carried wheels).

Every training configuration records peak GPU memory (torch.cuda.max_memory_allocated) and, for clmtune, the
run's memory estimate. ``summary`` holds device, vs_tutorial, vs_trainer, vs_trl, mfu and the memory ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

DATASHEET_BF16 = {"h100": 989e12, "h200": 989e12}  # dense bf16 tensor-core peak, SXM datasheets
BLOOM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS_PER_STEP = 16384

# (name, timeout seconds at full size); in the order they run: the most wanted numbers first
CONFIGS = [
    ("tut_tutorial", 90), ("tut_trainer", 90), ("tut_clmtune_bf16", 90), ("tut_clmtune_fp32", 90),
    ("sft_bloom560m_clmtune", 90), ("sft_bloom560m_trl", 120), ("sft_llama1b_clmtune", 120),
    ("sft_llama1b_trl", 150), ("sft_bloom560m_trainer", 90), ("sft_bloom560m_chunked", 90),
    ("sft_llama1b_padfree", 150),
    ("tut_clmtune_bf16_plain", 90), ("tut_clmtune_bf16_chunked", 90), ("sft_bloom560m_full", 90),
    ("infer_rank", 90), ("infer_generate", 90), ("serve_16", 120), ("tut_clmtune_bf16_compile", 150),
]


# ---------------------------------------------------------------------------------------------------------------
# sizes, models and data (parent process)


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"bloom": dict(vocab_size=50272, hidden_size=64, n_layer=2, n_head=4),
                "llama": dict(vocab_size=50272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
                "tut_rows": 16, "tut_batch": 8, "sft_rows": 24, "sft_len": (40, 120), "sft_steps": 4,
                "tokens_per_step": 512, "log_every": 2, "prompts": 8, "new_tokens": 8, "serve_requests": 16}
    return {"bloom": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
            "llama": dict(vocab_size=50272, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
            "tut_rows": 400, "tut_batch": 8, "sft_rows": 480, "sft_len": (200, 1000), "sft_steps": 12,
            "tokens_per_step": TOKENS_PER_STEP, "log_every": 4, "prompts": 64, "new_tokens": 64,
            "serve_requests": 64}


def build_model(kind: str, folder: Path, smoke: bool) -> None:
    import torch
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    from clmtune.models.builtin import opt_bpe_tokenizer

    tok = opt_bpe_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 1.1B weights: seconds on a GPU
    with torch.device(device):
        if kind == "bloom":
            model = BloomForCausalLM(BloomConfig(**sizes(smoke)["bloom"], **ids))
        else:
            model = LlamaForCausalLM(LlamaConfig(**sizes(smoke)["llama"], **ids))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def twitter_csv(folder: Path, rows: int) -> Path:
    """The 50 twitter_complaints training rows repeated to ``rows`` (as issue 27's measurement did)."""
    import csv

    from clmtune.data import assets_path

    src = list(csv.DictReader(open(assets_path("raft/twitter_complaints/train.csv"), encoding="utf-8")))
    path = folder / "twitter.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(src[0]))
        w.writeheader()
        w.writerows({**src[k % len(src)], "ID": k} if "ID" in src[0] else src[k % len(src)] for k in range(rows))
    return path


def chat_jsonl(folder: Path, rows: int, lengths: tuple[int, int]) -> Path:
    """Chat rows of ``lengths`` tokens (uniform, OPT tokenizer) from the shipped English texts: a user turn of
    several tweets / banking questions and an assistant reply of about a third of the row."""
    import csv

    from clmtune.data import assets_path
    from clmtune.models.builtin import opt_bpe_tokenizer

    tok = opt_bpe_tokenizer()
    texts = [r["Tweet text"] for r in csv.DictReader(open(assets_path("raft/twitter_complaints/train.csv"),
                                                          encoding="utf-8"))]
    texts += [r["Query"] for r in csv.DictReader(open(assets_path("raft/banking_77/train.csv"), encoding="utf-8"))]
    counts = [len(t) for t in tok(texts, add_special_tokens=False).input_ids]
    rng = random.Random(0)
    path = folder / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            want = rng.randint(*lengths)
            parts, n = [], 0
            while n < want:
                k = rng.randrange(len(texts))
                parts.append(texts[k])
                n += counts[k] + 1
            cut = max(1, (2 * len(parts)) // 3)
            msgs = [{"role": "user", "content": " ".join(parts[:cut])},
                    {"role": "assistant", "content": " ".join(parts[cut:]) or parts[-1]}]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# helpers of the child processes


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 3) if torch.cuda.is_available() else None


def allow_bench_vocab() -> None:
    """The BLOOM bench model pairs the 50,265-entry OPT tokenizer with BLOOM's 250,880-row head on purpose (the
    head's width is what costs; ids stay < 50,265), which clmtune refuses for users as another vocabulary."""
    import clmtune.models
    import clmtune.models.load
    import clmtune.train.setup

    for mod in (clmtune.models, clmtune.models.load, clmtune.train.setup):
        if hasattr(mod, "check_tokenizer_fits"):
            mod.check_tokenizer_fits = lambda *a, **k: None


def tut_config(w: Path, s: dict, out: str, **train) -> dict:
    return {"data": {"source": str(w / "twitter.csv"), "eval_fraction": 0.0, "max_length": 64,
                     "labels": ["complaint", "no complaint"]},  # clmtune's twitter_complaints template
            "model": {"name_or_path": str(w / "bloom")},
            "peft": {"method": "lora", "r": 8, "lora_alpha": 32, "lora_dropout": 0.1,
                     "target_modules": ["query_key_value"]},
            "train": {"output_dir": str(w / out), "overwrite": True, "epochs": 2, "batch_size": s["tut_batch"],
                      "learning_rate": 3e-3, "seed": 42, "log_every": s["tut_rows"] // s["tut_batch"], **train}}


def sft_config(w: Path, s: dict, model: str, out: str, method: str = "lora", **train) -> dict:
    rows = [json.loads(ln) for ln in open(w / "chat.jsonl", encoding="utf-8")]
    mean = s["sft_len"][0] / 2 + s["sft_len"][1] / 2
    batch = max(1, round(s["tokens_per_step"] / mean))
    peft = ({"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
             "target_modules": BLOOM_TARGETS if model == "bloom" else LLAMA_TARGETS} if method == "lora"
            else {"method": "full", "target_modules": None})
    return {"data": {"source": str(w / "chat.jsonl"), "task": "chat", "format": "openai", "chat_template": "chatml",
                     "train_on": "all", "max_length": s["sft_len"][1] + 160, "eval_fraction": 0.0},
            "model": {"name_or_path": str(w / model)}, "peft": peft,
            "train": {"output_dir": str(w / out), "overwrite": True, "epochs": 100, "max_steps": s["sft_steps"],
                      "batch_size": batch, "learning_rate": 2e-4 if method == "lora" else 2e-5,
                      "precision": "bf16", "log_every": s["log_every"], "seed": 0, "_rows": len(rows), **train}}


def clmtune_train(cfg_dict: dict, timed_lines: slice) -> dict:
    """Train with clmtune; tokens/s and seconds over the log lines ``timed_lines`` (the first is the warm-up)."""
    from clmtune.config import from_dict
    from clmtune.train import train

    allow_bench_vocab()
    cfg_dict["train"].pop("_rows", None)
    cfg = from_dict(cfg_dict).validate()
    reset_peak()
    t0 = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    out = Path(cfg.train.output_dir)
    log = [json.loads(ln) for ln in open(out / "train_log.jsonl", encoding="utf-8") if "loss" in ln]
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    timed = log[timed_lines] or log[-1:]
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in timed)
    mem = summary.get("memory") or {}
    return {"seconds": round(seconds, 4), "timed_steps": timed[-1]["step"] - (log[log.index(timed[0]) - 1]["step"]
                                                                          if log.index(timed[0]) else 0),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "wall_s": round(wall, 2),
            "final_loss": result.final_loss, "first_loss": result.first_loss, "steps": result.steps,
            "precision": summary.get("precision"), "lm_head_loss": summary.get("lm_head_loss"),
            "speed": summary.get("speed"), "peak_gb": peak_gb(), "memory": mem,
            "estimate_gb": round(mem["estimate"]["total"] / 2 ** 30, 3) if mem.get("estimate") else None,
            "estimate_over_measured": mem.get("estimate_over_measured"),
            "trainable_params": summary.get("trainable_params"), "all_params": summary.get("all_params"),
            "batch_size": cfg.train.batch_size}


def features_of(cfg_dict: dict):
    """clmtune's prepared training rows (input_ids, labels) for the library baselines: the same tokens."""
    from clmtune.config import from_dict
    from clmtune.data import prepare_data
    from clmtune.models import context_length, load_tokenizer

    cfg_dict = json.loads(json.dumps(cfg_dict))
    cfg_dict["train"].pop("_rows", None)
    cfg = from_dict(cfg_dict).validate()
    tok = load_tokenizer(cfg.model)
    data = prepare_data(tok, cfg.data, context_length=context_length(cfg.model), progress=False)
    feats = [{"input_ids": i, "labels": lab} for i, lab in zip(data.train["input_ids"], data.train["labels"])]
    return cfg, tok, data.pad_id, feats


def lora(targets: list[str], r: int, alpha: int, dropout: float):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=targets)


# ---------------------------------------------------------------------------------------------------------------
# configurations (child processes)


def run_tutorial(w: Path, s: dict) -> dict:
    """peft's causal-LM example loop: rows padded to max_length, model(**batch).loss (full logits), fp32."""
    from functools import partial

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    from clmtune.data import collate

    cfg, tok, pad_id, feats = features_of(tut_config(w, s, "tut_tutorial"))
    dev = device()
    torch.manual_seed(42)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path).to(dev),
                           lora(["query_key_value"], 8, 32, 0.1))
    loader = torch.utils.data.DataLoader(feats, batch_size=s["tut_batch"], shuffle=True,
                                         collate_fn=partial(collate, pad_id=pad_id, length=cfg.data.max_length))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = get_linear_schedule_with_warmup(opt, 0, 2 * len(loader))
    model.train()
    reset_peak()
    times = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        tokens = 0
        for batch in loader:
            batch = {k: v.to(dev) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            last = loss.item()
            tokens += int(batch["attention_mask"].sum())
        sync()
        times.append(time.perf_counter() - t0)
    return {"seconds": round(times[1], 4), "warmup_seconds": round(times[0], 4), "steps_per_epoch": len(loader),
            "tokens_per_s": round(tokens / times[1], 1), "final_loss": last, "peak_gb": peak_gb(),
            "precision": "fp32"}


def run_trainer(w: Path, s: dict, cfg_dict: dict | None = None, targets=None, r=8, alpha=32, dropout=0.1,
                max_steps: int | None = None) -> dict:
    """transformers.Trainer + peft, bf16 (on a GPU), length-grouped batches, dynamic padding: seconds of the
    second epoch (tutorial settings) or real tokens/s after the first ``log_every`` steps (``max_steps``)."""
    from functools import partial

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from clmtune.data import collate

    cfg_dict = cfg_dict or tut_config(w, s, "tut_trainer")
    cfg, tok, pad_id, feats = features_of(cfg_dict)
    torch.manual_seed(42)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path),
                           lora(targets or ["query_key_value"], r, alpha, dropout))
    marks: list[tuple[int, float, int]] = []  # (step, time, real tokens so far)
    seen = {"tokens": 0}
    base_collate = partial(collate, pad_id=pad_id)

    def counting_collate(rows):
        batch = base_collate(rows)
        seen["tokens"] += int(batch["attention_mask"].sum())
        return batch

    class Clock(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kw):
            sync()
            marks.append((state.global_step, time.perf_counter(), seen["tokens"]))

        def on_step_end(self, args, state, control, **kw):
            if max_steps and state.global_step == s["log_every"]:
                sync()
                marks.append((state.global_step, time.perf_counter(), seen["tokens"]))

        def on_train_end(self, args, state, control, **kw):
            sync()
            marks.append((state.global_step, time.perf_counter(), seen["tokens"]))

    gpu = torch.cuda.is_available()
    args = TrainingArguments(output_dir=str(w / "trainer_out"), per_device_train_batch_size=cfg.train.batch_size,
                             num_train_epochs=2 if not max_steps else 100, max_steps=max_steps or -1,
                             learning_rate=cfg.train.learning_rate, lr_scheduler_type="linear", logging_steps=50,
                             save_strategy="no", report_to=[], train_sampling_strategy="group_by_length",
                             use_cpu=not gpu, bf16=gpu, disable_tqdm=True, dataloader_num_workers=0, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=counting_collate, callbacks=[Clock()])
    reset_peak()
    trainer.train()
    (s0, t0, k0), (s1, t1, k1) = marks[-2], marks[-1]
    out = {"seconds": round(t1 - t0, 4), "tokens_per_s": round((k1 - k0) / max(t1 - t0, 1e-9), 1),
           "timed_steps": s1 - s0, "peak_gb": peak_gb(), "precision": "bf16" if gpu else "fp32",
           "batch_size": cfg.train.batch_size}
    hist = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    out["final_loss"] = hist[-1] if hist else None
    return out


def run_trl(w: Path, s: dict, model_kind: str) -> dict:
    """TRL's SFTTrainer with its documented fast settings: padding-free batches, bf16, assistant-only loss,
    Liger kernels when the package imports; LoRA r 16 on every linear layer. Falls back to padded batches (said
    in the result) when padding-free is refused (it wants flash attention)."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return {"skipped": "trl is not importable (carry its wheel and datasets', see bench/README.md)"}
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from clmtune.chat_templates import install_chat_template

    cfg_dict = sft_config(w, s, model_kind, f"trl_{model_kind}")
    convs = [json.loads(ln)["messages"] for ln in open(w / "chat.jsonl", encoding="utf-8")]
    tok = AutoTokenizer.from_pretrained(str(w / model_kind))
    install_chat_template(tok, "chatml")
    gpu = torch.cuda.is_available()
    liger = gpu and importlib.util.find_spec("liger_kernel") is not None
    marks: list[tuple[int, float, float]] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                sync()
                marks.append((state.global_step, time.perf_counter(), float(logs["num_tokens"])))

    tried = []
    for padding_free in (True, False):
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(str(w / model_kind), dtype=torch.bfloat16 if gpu else None)
            args = SFTConfig(output_dir=str(w / "trl_out"), assistant_only_loss=True, padding_free=padding_free,
                             max_length=None, per_device_train_batch_size=cfg_dict["train"]["batch_size"],
                             max_steps=s["sft_steps"], learning_rate=2e-4, lr_scheduler_type="linear",
                             logging_steps=s["log_every"], save_strategy="no", report_to=[], use_cpu=not gpu,
                             bf16=gpu, dataloader_num_workers=0, seed=0, use_liger_kernel=liger,
                             **({} if padding_free else {"train_sampling_strategy": "group_by_length"}))
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"messages": convs}),
                                 processing_class=tok, peft_config=lora(BLOOM_TARGETS if model_kind == "bloom"
                                                                        else LLAMA_TARGETS, 16, 32, 0.0),
                                 callbacks=[Clock()])
            marks.clear()
            reset_peak()
            trainer.train()
            break
        except Exception as exc:  # noqa: BLE001  (record and try the padded settings)
            tried.append(f"padding_free={padding_free}: {type(exc).__name__}: {str(exc)[:300]}")
    else:
        return {"error": " | ".join(tried)}
    (s0, t0, k0), (s1, t1, k1) = marks[0], marks[-1]
    return {"seconds": round(t1 - t0, 4), "timed_steps": s1 - s0, "tokens_per_s": round((k1 - k0) / (t1 - t0), 1),
            "peak_gb": peak_gb(), "padding_free": padding_free, "liger": liger, "failed_first": tried or None,
            "note": "num_tokens counts the tokens TRL trained on (padding-free: no pads)",
            "batch_size": cfg_dict["train"]["batch_size"]}


def flops_per_token(model_dir: Path, full: bool, supervised_fraction: float, mean_len: float) -> float:
    """Useful training FLOPs per real token: the transformer blocks' matmuls forward (2N) and back into the
    activations (2N), + 2N weight gradients for full fine-tuning; attention scores and values (4 L d ctx forward,
    twice that back; ctx = half the row on average, causal); the LM head (2dV each way) on the supervised positions
    only (plus its weight gradient for full fine-tuning). LoRA's own small matmuls are left out."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d = cfg["hidden_size"]
    layers = cfg.get("n_layer") or cfg["num_hidden_layers"]
    vocab = cfg["vocab_size"]
    if "intermediate_size" in cfg:  # LLaMA: grouped KV heads, gated MLP
        kv = d // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
        block = 2 * d * d + 2 * d * kv + 3 * d * cfg["intermediate_size"]
    else:  # BLOOM: fused QKV (3d^2) + output (d^2) + MLP (8d^2)
        block = 12 * d * d
    n = layers * block
    per_pass = 2 * n + 4 * layers * d * (mean_len / 2)
    head = 2 * d * vocab * supervised_fraction
    return (2 if not full else 3) * per_pass + (2 if not full else 3) * head


def sft_mfu(w: Path, s: dict, model_kind: str, res: dict, full: bool = False) -> None:
    """Adds the MFU of an SFT result (real tokens/s x useful FLOPs per token / peak)."""
    stats = json.loads((w / "chat_stats.json").read_text())
    f = flops_per_token(w / model_kind, full, stats["supervised_fraction"], stats["mean_tokens"])
    peak = json.loads((w / "peak.json").read_text())
    res["flops_per_token"] = f
    if res.get("tokens_per_s"):
        res["tflops"] = round(res["tokens_per_s"] * f / 1e12, 2)
        if peak.get("measured"):
            res["mfu"] = round(res["tokens_per_s"] * f / peak["measured"], 4)
        if peak.get("datasheet"):
            res["mfu_datasheet"] = round(res["tokens_per_s"] * f / peak["datasheet"], 4)


def run_infer_rank(w: Path, s: dict) -> dict:
    """Rank evaluation of the twitter rows (clmtune.rank.predict.predict_rank) vs peft's example evaluation
    (generate 10 tokens, match the text; bench/bench_eval.py's tutorial_eval) on the 1.1B LLaMA in bf16."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_eval import tutorial_eval

    from clmtune.config import from_dict
    from clmtune.data import Encoder, load_task
    from clmtune.rank.predict import predict_rank
    from clmtune.inference import for_inference
    from clmtune.models import load_model, load_tokenizer

    cfg_dict = tut_config(w, s, "rank")
    cfg_dict["model"]["name_or_path"] = str(w / "llama")
    cfg_dict["data"]["eval_fraction"] = 0.5
    cfg = from_dict(cfg_dict).validate()
    tok = load_tokenizer(cfg.model)
    model, precision, _ = for_inference(load_model(cfg.model).eval().to(device()), "auto")
    examples = [e for e in load_task(cfg.data).eval if e.label is not None][:s["prompts"] * 2]
    labels = cfg.data.labels
    out = {"rows": len(examples), "precision": precision}
    enc = Encoder(tok, cfg.data)
    predict_rank(model, enc, examples[:8], labels, 32)  # warm-up
    for name, fn in (("clmtune_rank", lambda: predict_rank(model, enc, examples, labels, 32)),
                     ("tutorial_generate", lambda: tutorial_eval(model, tok, cfg, examples, labels, w / "tut_eval"))):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out[name + "_rows_per_s"] = round(len(examples) / (time.perf_counter() - t0), 1)
    out["speedup"] = round(out["clmtune_rank_rows_per_s"] / out["tutorial_generate_rows_per_s"], 2)
    return out


def run_infer_generate(w: Path, s: dict) -> dict:
    """Batched greedy generation of ``new_tokens`` for ``prompts`` prompts: clmtune.generate vs model.generate."""
    import torch

    from clmtune.config import GenerateConfig, ModelConfig
    from clmtune.generate import generate
    from clmtune.inference import for_inference
    from clmtune.models import load_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(w / "llama"))
    tok = load_tokenizer(mcfg)
    model, precision, _ = for_inference(load_model(mcfg).eval().to(device()), "auto")
    convs = [json.loads(ln)["messages"][0]["content"] for ln in open(w / "chat.jsonl", encoding="utf-8")]
    prompts = [" ".join(c.split()[:48]) for c in convs[:s["prompts"]]]
    new, batch = s["new_tokens"], 32
    settings = GenerateConfig(max_new_tokens=new, temperature=0, batch_size=batch)
    generate(model, tok, prompts[:batch], settings)  # warm-up
    out = {"prompts": len(prompts), "new_tokens": new, "batch": batch, "precision": precision}
    sync()
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, settings)
    sync()
    n = sum(len(tok(g.outputs[0], add_special_tokens=False).input_ids) for g in gens)
    out["clmtune_tokens_per_s"] = round(n / (time.perf_counter() - t0), 1)
    tok.padding_side = "left"
    sync()
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for k in range(0, len(prompts), batch):
            enc = tok(prompts[k:k + batch], return_tensors="pt", padding=True).to(device())
            o = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            n += int((o[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).sum())
    sync()
    out["transformers_tokens_per_s"] = round(n / (time.perf_counter() - t0), 1)
    out["speedup"] = round(out["clmtune_tokens_per_s"] / out["transformers_tokens_per_s"], 2)
    return out


def run_serve(w: Path, s: dict) -> dict:
    """`clmtune serve` on the 1.1B LLaMA, 16 concurrent clients of /v1/completions (bench/bench_serve.py's level)."""
    import asyncio
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not importable (carry the wheels, see bench/README.md)"}
    import httpx

    sys.path.insert(0, str(HERE))
    import bench_serve

    port = bench_serve._free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "clmtune", "serve", "--model", str(w / "llama"), "--port",
                             str(port), "--max-batch", "16", "--max-queue", "256"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(w / "serve.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if proc.poll() is not None:
                return {"error": "the server exited: " + (w / "serve.log").read_text()[-800:]}
        bench_serve.MODEL = str(w / "llama")
        asyncio.run(bench_serve.level(url, 4, 4, 8))  # warm-up
        res = asyncio.run(bench_serve.level(url, 16, s["serve_requests"], s["new_tokens"]))
        res.pop("texts", None)
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_config(name: str, w: Path, s: dict) -> dict:
    epoch_line = slice(1, 2)  # tutorial settings: log_every = one epoch; the second line is the second epoch
    sft_lines = slice(1, None)  # SFT: every log line after the first (warm-up, compilation)
    if name == "tut_tutorial":
        return run_tutorial(w, s)
    if name == "tut_trainer":
        return run_trainer(w, s)
    if name.startswith("tut_clmtune"):
        extra = {"fp32": {"precision": "fp32"}, "bf16": {"precision": "bf16"},
                 "bf16_plain": {"precision": "bf16", "device_loss": False, "fused_adamw": False},
                 "bf16_chunked": {"precision": "bf16", "chunked_loss": True},
                 "bf16_compile": {"precision": "bf16", "compile": True}}[name[len("tut_clmtune_"):]]
        return clmtune_train(tut_config(w, s, name, **extra), epoch_line)
    if name.startswith("sft_"):
        _, kind, what = name.split("_")
        kind = kind.replace("560m", "").replace("1b", "")
        if what == "trl":
            res = run_trl(w, s, kind)
        elif what == "trainer":
            cfg = sft_config(w, s, kind, name)
            res = run_trainer(w, s, cfg, BLOOM_TARGETS if kind == "bloom" else LLAMA_TARGETS, 16, 32, 0.0,
                              max_steps=s["sft_steps"])
        else:
            extra = {"chunked": {"chunked_loss": True}, "padfree": {"padding_free": True}}.get(what, {})
            cfg = sft_config(w, s, kind, name, method="full" if what == "full" else "lora", **extra)
            if what == "padfree":  # FlexAttention's document mask on a GPU (compiled); SDPA's dense mask on a CPU
                import torch

                cfg["model"]["attn_implementation"] = "flex_attention" if torch.cuda.is_available() else "sdpa"
            res = clmtune_train(cfg, sft_lines)
        sft_mfu(w, s, kind, res, full=what == "full")
        return res
    if name == "infer_rank":
        return run_infer_rank(w, s)
    if name == "infer_generate":
        return run_infer_generate(w, s)
    if name == "serve_16":
        return run_serve(w, s)
    raise SystemExit(f"unknown configuration {name}")


def child(names: str, w: Path, smoke: bool) -> None:
    """Run the comma-separated configurations one after another; one ``RESULT name {json}`` line each."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    for name in names.split(","):
        t0 = time.perf_counter()
        try:
            if name in os.environ.get("GPU_BENCH_FAIL", "").split(","):  # tests: a configuration that breaks
                raise RuntimeError(f"{name} failed on purpose (GPU_BENCH_FAIL)")
            res = run_config(name, w, sizes(smoke))
        except Exception as exc:  # noqa: BLE001  (reported in the JSON; the parent goes on)
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        res["config_wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"RESULT {name} " + json.dumps(res, default=str), flush=True)


def prepare(w: Path, smoke: bool) -> dict:
    """Models, data, chat statistics and the bf16 matmul peak (child process: CUDA stays out of the parent)."""
    import torch

    from clmtune.chat_templates import install_chat_template
    from clmtune.models.builtin import opt_bpe_tokenizer
    from clmtune.tasks.chat_encoding import tokens_and_mask

    s = sizes(smoke)
    t0 = time.perf_counter()
    for kind in ("bloom", "llama"):
        build_model(kind, w / kind, smoke)
    twitter_csv(w, s["tut_rows"])
    chat_jsonl(w, s["sft_rows"], s["sft_len"])
    tok = opt_bpe_tokenizer()
    install_chat_template(tok, "chatml")
    real = sup = 0
    for ln in open(w / "chat.jsonl", encoding="utf-8"):
        ids, mask = tokens_and_mask(tok, json.loads(ln)["messages"])
        real, sup = real + len(ids), sup + sum(mask[1:])
    rows = s["sft_rows"]
    (w / "chat_stats.json").write_text(json.dumps({"rows": rows, "mean_tokens": real / rows,
                                                   "supervised_fraction": sup / real}))
    peak = {"measured": None, "datasheet": None}
    if torch.cuda.is_available():
        n = 8192
        a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                                    dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        peak["measured"] = 2 * n ** 3 * 20 / (time.perf_counter() - t)
        name = torch.cuda.get_device_name().lower()
        peak["datasheet"] = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    (w / "peak.json").write_text(json.dumps(peak))
    return {"seconds": round(time.perf_counter() - t0, 2), "chat": json.loads((w / "chat_stats.json").read_text()),
            "matmul_peak_tflops": round(peak["measured"] / 1e12, 1) if peak["measured"] else None}


# ---------------------------------------------------------------------------------------------------------------
# parent


def device_info() -> dict:
    out = {"python": platform.python_version(), "host": platform.node()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if q.returncode == 0 and q.stdout.strip():
            out["gpu"] = q.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import importlib.metadata as md

        out["packages"] = {p: _version(md, p) for p in ("torch", "transformers", "peft", "accelerate", "trl",
                                                        "datasets", "liger-kernel", "fastapi", "uvicorn")}
    except Exception:  # noqa: BLE001
        pass
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo", encoding="utf-8")
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    out["cpu"] = f"{cpu} ({os.cpu_count()} cores)"
    return out


def _version(md, name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def gpu_slug(info: dict, smoke: bool) -> str:
    if smoke or "gpu" not in info:
        return "cpu-smoke" if smoke else "cpu"
    name = info["gpu"].split(",")[0].lower()
    for k in ("h200", "h100", "a100", "l40s", "l4", "a10"):
        if k in name:
            return k
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")[:24]


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(info: dict, prep: dict, results: dict) -> dict:
    r = {k: v for k, v in results.items() if isinstance(v, dict)}

    def sec(k):
        return r.get(k, {}).get("seconds")

    def tps(k):
        return r.get(k, {}).get("tokens_per_s")

    best = min((k for k in r if k.startswith("tut_clmtune_bf16") and sec(k)), key=sec, default=None)
    out = {"device": info.get("gpu", info.get("cpu")), "matmul_peak_tflops": prep.get("matmul_peak_tflops"),
           "vs_tutorial": {"clmtune_bf16": ratio(sec("tut_tutorial"), sec("tut_clmtune_bf16")),
                           "clmtune_fp32": ratio(sec("tut_tutorial"), sec("tut_clmtune_fp32")),
                           "best": ratio(sec("tut_tutorial"), sec(best)), "best_config": best, "target": 3.0},
           "vs_trainer": {"clmtune_bf16": ratio(sec("tut_trainer"), sec("tut_clmtune_bf16")),
                          "best": ratio(sec("tut_trainer"), sec(best)),
                          "sft_bloom560m": ratio(tps("sft_bloom560m_clmtune"), tps("sft_bloom560m_trainer")),
                          "target": 2.0},
           "vs_trl": {"bloom560m": ratio(tps("sft_bloom560m_clmtune"), tps("sft_bloom560m_trl")),
                      "bloom560m_chunked": ratio(tps("sft_bloom560m_chunked"), tps("sft_bloom560m_trl")),
                      "llama1b": ratio(tps("sft_llama1b_clmtune"), tps("sft_llama1b_trl")),
                      "llama1b_padfree": ratio(tps("sft_llama1b_padfree"), tps("sft_llama1b_trl")), "target": 1.5},
           "mfu": {k: r[k].get("mfu") for k in r if k.startswith("sft_") and r[k].get("mfu") is not None},
           "memory": {"peak_vs_trainer_tut": ratio(r.get("tut_clmtune_bf16", {}).get("peak_gb"),
                                                   r.get("tut_trainer", {}).get("peak_gb")),
                      "peak_vs_trainer_sft": ratio(r.get("sft_bloom560m_clmtune", {}).get("peak_gb"),
                                                   r.get("sft_bloom560m_trainer", {}).get("peak_gb")),
                      "estimate_over_peak": {k: ratio(v.get("estimate_gb"), v.get("peak_gb")) for k, v in r.items()
                                             if v.get("estimate_gb") and v.get("peak_gb")},
                      "targets": "peak <= 0.7x Trainer's; estimate within 25 % of the peak"},
           "inference": {"rank_vs_tutorial": r.get("infer_rank", {}).get("speedup"),
                         "generate_vs_transformers": r.get("infer_generate", {}).get("speedup"),
                         "serve_16_tokens_per_s": r.get("serve_16", {}).get("tokens_per_s")},
           "failed": sorted(k for k, v in r.items() if "error" in v),
           "skipped": sorted(k for k, v in r.items() if "skipped" in v)}
    return out


def table(doc: dict) -> str:
    """bench/README.md's table of one run (``--table FILE``): one line per configuration, then the summary."""
    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    dev = doc["device"]
    lines = [f"{doc['date']}: {dev.get('gpu', dev.get('cpu'))}; "
             + ", ".join(f"{k} {v}" for k, v in (dev.get("packages") or {}).items() if v)
             + f"; bf16 matmul {f(doc.get('prepare', {}).get('matmul_peak_tflops'), '{:.0f}')} TFLOP/s", "",
             "| configuration | s (timed) | real tokens/s | MFU | peak GB | estimate GB | est. / peak | note |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in doc["results"].items():
        note = r.get("skipped") or (r["error"].splitlines()[0][:120] if "error" in r else "")
        if "speedup" in r:
            note = f"x{r['speedup']} " + ", ".join(f"{k} {v}" for k, v in r.items() if k.endswith("_per_s"))
        elif r.get("speed"):
            note = note or ", ".join([k for k, v in r["speed"].items() if v] + [f"head {r.get('lm_head_loss')}"])
        ratio_ = r.get("estimate_gb") / r["peak_gb"] if r.get("estimate_gb") and r.get("peak_gb") else None
        lines.append(f"| {name} | {f(r.get('seconds'))} | {f(r.get('tokens_per_s'), '{:,.0f}')} | "
                     f"{f(r.get('mfu') and 100 * r['mfu'], '{:.1f} %')} | {f(r.get('peak_gb'))} | "
                     f"{f(r.get('estimate_gb'))} | {f(ratio_)} | {note} |")
    s = doc.get("summary", {})
    lines += ["", "summary: " + json.dumps({k: s.get(k) for k in ("vs_tutorial", "vs_trainer", "vs_trl", "mfu",
                                                                  "memory", "inference")}, default=str)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=False, help="folder of gpu_bench_<gpu>.json (default bench/results)")
    ap.add_argument("--smoke", action="store_true", help="every configuration at toy size (CPU, ~2 minutes)")
    ap.add_argument("--only", help="comma-separated configuration names (default: all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting configurations after this many seconds (default 450; smoke 240)")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every configuration's timeout")
    ap.add_argument("--table", metavar="JSON", help="print bench/README.md's table of a results file and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text(encoding="utf-8"))))
        return
    if args.child or args.prepare:
        w = Path(args.work)
        if args.prepare:
            try:
                res = prepare(w, args.smoke)
            except Exception as exc:  # noqa: BLE001
                res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            print("RESULT prepare " + json.dumps(res), flush=True)
        else:
            child(args.child, w, args.smoke)
        return

    t_start = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else (240 if args.smoke else 450)
    out_dir = Path(args.out) if args.out else HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    info = device_info()
    path = out_dir / f"gpu_bench_{gpu_slug(info, args.smoke)}.json"
    names = [n for n, _ in CONFIGS]
    if args.only:
        unknown = set(args.only.split(",")) - set(names)
        if unknown:
            raise SystemExit(f"--only: unknown configurations {sorted(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in args.only.split(",")]
    timeouts = dict(CONFIGS)
    w = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # toy sizes on the CPU, also on a GPU machine
        env.setdefault("OMP_NUM_THREADS", "1")
        env["TORCH_COMPILE_DISABLE"] = "1"  # train.compile's path without minutes of C++ compilation on a CPU
    doc = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "smoke": args.smoke, "device": info,
           "command": " ".join(sys.argv), "budget_s": budget, "results": {}}

    def run_child(extra: list[str], want: list[str], timeout: float) -> dict[str, dict]:
        """One child process for the configurations ``want``; a result for each (an error when it has none)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(w)] + extra + (
            ["--smoke"] if args.smoke else [])
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            stdout, stderr, why = p.stdout, p.stderr, f"exit code {p.returncode}, no result"
        except subprocess.TimeoutExpired as exc:
            def text(b):
                return (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")
            stdout, stderr, why = text(exc.stdout), text(exc.stderr), f"timed out after {timeout:.0f} s"
        got = {}
        for ln in stdout.splitlines():
            if ln.startswith("RESULT "):
                name, _, body = ln[7:].partition(" ")
                got[name] = json.loads(body)
        out = {}
        for name in want:
            res = got.get(name) or {"error": why}
            if "error" in res:
                res["stderr_tail"] = stderr[-1500:]
            res["child_wall_s"] = round(time.perf_counter() - t0, 1)
            out[name] = res
        return out

    def write() -> None:
        doc["wall_s"] = round(time.perf_counter() - t_start, 1)
        doc["summary"] = summarize(info, doc.get("prepare", {}), doc["results"])
        path.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")

    try:
        print(f"gpu_bench: {info.get('gpu', info['cpu'])}; work folder {w}; results {path}", flush=True)
        doc["prepare"] = run_child(["--prepare"], ["prepare"], 240 * args.timeout_scale)["prepare"]
        print(f"  prepare: {json.dumps(doc['prepare'])[:300]}", flush=True)
        write()
        if "error" in doc["prepare"]:
            raise SystemExit(f"gpu_bench: preparing models and data failed; see {path}")
        # full size: a process per configuration (its own peak memory, its own timeout); smoke: one process for
        # all (toy sizes, where starting Python and torch 16 times would cost more than the runs)
        groups = [names] if args.smoke else [[n] for n in names]
        for group in groups:
            left = budget - (time.perf_counter() - t_start)
            if left < 15:
                doc["results"].update({n: {"skipped": f"time budget of {budget:.0f} s spent"} for n in group})
                continue
            timeout = min(sum(timeouts[n] for n in group) * args.timeout_scale, max(left, 15))
            for name, res in run_child(["--child", ",".join(group)], group, timeout).items():
                doc["results"][name] = res
                brief = {k: res[k] for k in ("seconds", "tokens_per_s", "mfu", "peak_gb", "estimate_gb", "speedup",
                                             "skipped", "error") if k in res}
                print(f"  {name}: {json.dumps(brief, default=str)[:300]} ({res.get('config_wall_s')} s)",
                      flush=True)
            write()
    finally:
        write()
        shutil.rmtree(w, ignore_errors=True)
    print("SUMMARY " + json.dumps(doc["summary"], default=str), flush=True)


if __name__ == "__main__":
    main()
