"""Training speed benchmark: clmtune vs the tutorial's recipe vs transformers.Trainer, measured in the same run.

    python bench/bench_train.py            # both models, all configurations (several minutes on 2 cores)
    python bench/bench_train.py --quick    # fewer rows for the GPT-2-zh model
    python bench/bench_train.py --threads 1   # one torch thread per run: steadier on a shared machine

Each configuration runs in its own child process, one after another, so peak memory (max RSS) is its own.
Configurations (all: one epoch, batch 8, LoRA r=8 on peft's default target modules, random weights):
  tutorial  peft's causal-LM example: every row padded to max_length, full logits, fp32, plain loop
  trainer   transformers.Trainer + peft, train_sampling_strategy="group_by_length" (transformers 5's
            name for group_by_length=True), dynamic padding, full logits
  clmtune   clmtune's default training path
  clmtune_bf16  clmtune with train.precision: bf16
  clmtune_logits, clmtune_bf16_logits  (not run unless named in --configs) the same with the fused head loss off:
            (N, V) logits, then cross-entropy; what the fused frozen-head loss (clmtune.train.fusedhead) saves, e.g.
            --models bloom --configs clmtune,clmtune_logits,clmtune_bf16,clmtune_bf16_logits
Models:
  bloom     BLOOM architecture, 4 layers x 1024, vocabulary 250,880, the 50 twitter_complaints rows, max_length 64
  gpt2zh    GPT-2 architecture, 12 layers x 768, vocabulary 21,128 (BERT Chinese characters), ChnSentiCorp
            reviews as classification (好评/差评), max_length 256
Writes bench/results/train_<model>_cpu.json and prints a table with ratios against `tutorial`.
"""

from __future__ import annotations

import argparse
import atexit
import csv
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
from common import result_path  # noqa: E402  (bench/common.py)
CONFIGS = ["tutorial", "trainer", "clmtune", "clmtune_bf16"]
LOSS_TOL = 0.02
"""bf16's train-set loss after the epoch may differ from fp32's by this fraction (relative)."""


# ---------------------------------------------------------------------------------------------------------------
# model folders (random weights, real tokenizers)


def _scratch() -> str:
    """A temporary folder removed when the process exits."""
    path = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def build_model(name: str, folder: Path) -> None:
    import torch
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

    from clmtune.models import opt_bpe_tokenizer, bert_chinese_tokenizer

    torch.manual_seed(0)
    if name == "bloom":
        # BLOOM's own tokenizer file is not available here; the OPT/GPT-2 BPE gives English token counts of the
        # same order. Ids stay < 50,265 but the LM head is the full 250,880 wide, which is what costs time.
        tok = opt_bpe_tokenizer()
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


def train_set_loss(model, feats, pad_id: int) -> float:
    """Mean loss per label token over the whole training split after the epoch, fp32, eval mode: the same
    measure for every configuration (the last batch's loss depends on which rows the shuffle put last)."""
    import torch

    from clmtune.data import collate
    from clmtune.models import forward_inputs
    from clmtune.train import causal_lm_loss, supervised_tokens

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(feats), 8):
            batch = collate(feats[k:k + 8], pad_id)
            logits = model(**forward_inputs(model, batch)).logits
            total += float(causal_lm_loss(logits, batch["labels"], reduction="sum"))
            n += supervised_tokens(batch["labels"])
    return total / n


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
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "final_loss": losses[-1], "steps": len(losses),
            "train_set_loss": train_set_loss(model, feats, enc.pad_id)}


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

    args = TrainingArguments(output_dir=_scratch(), per_device_train_batch_size=8, num_train_epochs=1,
                             learning_rate=3e-3, lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
                             report_to=[], train_sampling_strategy="group_by_length", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=partial(collate, pad_id=enc.pad_id),
                      callbacks=[Keep()])
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(f["input_ids"]) for f in feats)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "final_loss": losses[-1] if losses else float("nan"),
            "steps": len(losses), "train_set_loss": train_set_loss(trainer.model, feats, enc.pad_id)}


def run_clmtune(cfg_dict: dict, precision: str) -> dict:
    from clmtune.config import from_dict
    from clmtune.train import TrainRecipe, train

    cfg_dict["train"]["precision"] = precision
    cfg = from_dict(cfg_dict).validate()
    cpu_fit = []
    fit = TrainRecipe.fit

    def timed_fit(self):  # CPU time of the training loop only, as for the other recipes
        c0 = time.process_time()
        out = fit(self)
        cpu_fit.append(time.process_time() - c0)
        return out

    TrainRecipe.fit = timed_fit
    import clmtune.train.setup as train_mod  # where setup_model and setup_optimization look these up

    prep, to_bf16 = [], train_mod.frozen_matmul_weights_to_bf16

    def timed_to_bf16(*a, **k):  # the one-time bf16 preparation (setup, outside the loop's timer): reported
        c0 = time.process_time()
        out = to_bf16(*a, **k)
        prep.append(time.process_time() - c0)
        return out

    train_mod.frozen_matmul_weights_to_bf16 = timed_to_bf16
    packed_head = train_mod.PackedHead

    def timed_packed_head(*a, **k):  # packing the head for the fused loss (bf16): one-time preparation too
        c0 = time.process_time()
        out = packed_head(*a, **k)
        prep.append(time.process_time() - c0)
        return out

    train_mod.PackedHead = timed_packed_head
    # The BLOOM bench model pairs the 50,265-entry OPT tokenizer with BLOOM's 250,880-row embedding on purpose (the
    # head's width is what costs; ids stay < 50,265), which clmtune refuses for users as "another vocabulary".
    train_mod.check_tokenizer_fits = lambda *a, **k: None
    result = train(cfg, progress=False)
    cpu = cpu_fit[0]
    log = [json.loads(line) for line in open(Path(cfg.train.output_dir) / "train_log.jsonl")]
    _, _, enc, feats = features(cfg_dict, "longest")
    return {"seconds": result.seconds, "cpu_seconds": cpu, "tokens": sum(len(f["input_ids"]) for f in feats),
            "final_loss": result.final_loss, "steps": len(log), "prep_cpu_seconds": sum(prep),
            "train_set_loss": train_set_loss(result.model, feats, enc.pad_id)}


def child(config: str, cfg_path: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    cfg_dict = json.loads(Path(cfg_path).read_text())
    if config == "tutorial":
        res = run_tutorial(cfg_dict)
    elif config == "trainer":
        res = run_trainer(cfg_dict)
    else:
        if config.endswith("_logits"):  # the fused head loss off (test_fused_head checks this switch)
            import clmtune.train.fusedhead as fh

            fh.FUSED_PRECISIONS = frozenset()
        res = run_clmtune(cfg_dict, "bf16" if "bf16" in config else "fp32")
    from clmtune.memory import peak_rss

    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so the child would report the parent's RSS (which built the
    # model) as its floor
    res["peak_rss_mb"] = peak_rss() / 2 ** 20
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


def model_shape(model_dir: Path) -> tuple[int, int, int, int]:
    """(hidden size, layers, vocabulary, parameters of the transformer blocks) from config.json."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d = cfg.get("hidden_size") or cfg.get("n_embd")
    layers = cfg.get("n_layer") or cfg.get("num_hidden_layers")
    return d, layers, cfg["vocab_size"], 12 * d * d * layers  # attention 4d^2 + MLP 8d^2 per layer


def training_flops_per_token(model_dir: Path, supervised_fraction: float) -> float:
    """Useful training FLOPs per real (non-pad) token of a LoRA run: the same number for every configuration,
    so MFU compares how much of the machine each one turns into useful work (padding and LM-head positions
    without a label are wasted work, not counted).

    Trunk: LoRA freezes the base weights, so backward skips the weight-gradient matmuls: forward 2N + backward
    2N (input gradients) = 4N per token, not the 6N of full fine-tuning (LoRA's own r=8 matmuls: < 2 %, left out).
    LM head: needed only where a label is predicted: 2dV forward + 2dV backward into the hidden states, on the
    supervised fraction of tokens. Attention scores (4 L d per layer and token) are left out: < 10 % at L <= 256.
    """
    d, _, vocab, trunk = model_shape(model_dir)
    return 4 * trunk + 4 * d * vocab * supervised_fraction


def supervised_fraction(cfg_dict: dict) -> tuple[float, int, int]:
    """(supervised tokens / real tokens, real tokens, rows) of the training split."""
    _, _, _, feats = features(cfg_dict, "longest")
    real = sum(len(f["input_ids"]) for f in feats)
    sup = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats)
    return sup / real, real, len(feats)


def available_memory_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    except OSError:
        pass
    return None


def memory_needed_gb(model_dir: Path) -> float:
    """Peak of the hungriest configuration, from the measured runs: ~3x the fp32 weights (weights, the bf16/fp32
    copies and logits of the full-logits recipes) plus ~0.8 GB of Python, torch and activations."""
    d, _, vocab, trunk = model_shape(model_dir)
    return 3 * 4 * (trunk + d * vocab) / 2 ** 30 + 0.8


def check_memory(model: str, model_dir: Path) -> None:
    need, free = memory_needed_gb(model_dir), available_memory_gb()
    if free is not None and free < need:
        raise SystemExit(f"bench: the {model} model needs about {need:.1f} GB of free memory (3 x its fp32 "
                         f"weights + 0.8 GB), but only {free:.1f} GB is available; close other programs or "
                         f"run another model (--models {'gpt2zh' if model == 'bloom' else 'bloom'})")


def mfu_table(model: str, results: dict, peaks: dict) -> str:
    lines = ["| config | tokens/s | s/epoch | cpu s | peak RSS MB | last-batch loss | train-set loss after | x tutorial "
             "| x tutorial (cpu) | x trainer | MFU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for config, r in results.items():
        lines.append(f"| {config} | {r['tokens_per_s']:.0f} | {r['seconds']:.2f} | {r.get('cpu_seconds', float('nan')):.2f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} | {r['train_set_loss']:.4f} | "
                     f"{r.get('speedup_vs_tutorial') or float('nan'):.2f} | "
                     f"{r.get('speedup_vs_tutorial_cpu') or float('nan'):.2f} | "
                     f"{r.get('speedup_vs_trainer') or float('nan'):.2f} | {100 * r['mfu']:.1f} % "
                     f"({r['precision']} peak) |")
    for config, r in results.items():
        if r.get("mfu_with_prep"):
            lines.append(f"\n{config}: the one-time bf16 preparation before the loop (frozen weights cast to bf16, "
                         f"the LM head packed for the fused loss) took {r['prep_cpu_seconds']:.2f} s of CPU; counted as loop time, "
                         f"MFU would be {100 * r['mfu_with_prep']:.1f} %.")
    return "\n".join(lines)


BEGIN, END = "<!-- bench_train.py: begin -->", "<!-- bench_train.py: end -->"


def write_readme(peaks: dict) -> None:
    """The training part of bench/README.md (between the BEGIN/END markers): the machine and one table per
    results file; the rest of the file (evaluation, generation, profile) is kept."""
    import torch

    from clmtune.device import describe_cpu

    parts = [README_HEAD.format(cpu=describe_cpu(), torch=torch.__version__,
                                fp32=peaks["fp32"] / 1e9, bf16=peaks["bf16"] / 1e9,
                                load=" ".join(f"{x:.1f}" for x in os.getloadavg()))]
    for f in (result_path("train", m) for m in ("bloom", "gpt2zh")):
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        if "mfu" not in next(iter(res["results"].values())):
            continue  # an older file without MFU
        parts.append(f"### {res['model']}: {res['description']}\n\nMeasured {res['when']}; {res['setup']}.\n\n"
                     + mfu_table(res["model"], res["results"], res["matmul_peak_flops"]) + "\n")
    block = BEGIN + "\n" + "\n".join(parts) + END
    path = HERE / "README.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = block + "\n\n" + text
    path.write_text(text, encoding="utf-8")


README_HEAD = """# Training benchmark (`bench/bench_train.py`, `make bench`)

One epoch of LoRA (r=8, alpha 32, dropout 0.1; peft's default target modules) with batch 8, AdamW 3e-3, random
weights, real tokenizers and data. Every configuration runs in its own child process, one after another, in the
same run; ratios are against the tutorial's recipe (and Trainer) *of the same run*.

- **tutorial**: peft's causal-LM example: every row padded to `max_length`, `model(**batch).loss` (LM head and
  loss at every position), fp32, plain loop, random batches.
- **trainer**: `transformers.Trainer` + peft with `train_sampling_strategy="group_by_length"` (transformers 5's
  `group_by_length=True`), per-batch padding, full logits, fp32.
- **clmtune**: clmtune with `train.precision: fp32`: length-grouped shuffled batches with per-batch left padding,
  LM head only on the positions that predict a label (a boolean `logits_to_keep` mask), loss per supervised token,
  the frozen head and the cross-entropy fused (`clmtune.train.fusedhead`: one pass over the head's weight per
  step, no logits tensor).
- **clmtune_bf16**: the same in bf16, what `train.precision: auto` (the default) picks on a CPU with avx512_bf16 or
  AMX: bf16 autocast; frozen matmul weights stored in bf16 so autocast does not re-cast them every step, the fused
  head loss on the head's oneDNN-packed vocabulary blocks (`PackedHead`), tanh-GELU as one op.
  The train-set loss after the epoch in bf16 must stay within 2 % of fp32's (checked in the run, see `LOSS_TOL`).
  "s/epoch" is the training loop, as for every config (loading the model is outside it for all); the one-time
  bf16 preparation before it (casting the other frozen weights, packing BLOOM's 250,880 x 1024 head twice: ~1-2 s
  on one thread) is reported under the table, with the MFU it would give if it were counted.
- **clmtune_logits**, **clmtune_bf16_logits** (only when named in `--configs`): the same with the fused head loss
  off ((N, V) logits, then cross-entropy): what `clmtune.train.fusedhead` saves.

tokens/s counts real (non-pad) training tokens. MFU = useful training FLOP/s (LoRA: 4 x transformer-block
parameters per token + the LM head where a label is predicted; the same count for every configuration, see
`training_flops_per_token`) over the matmul peak this script measures on the same machine, for the
configuration's precision. Peak RSS is the child process's maximum resident memory. "last-batch loss" is the
loss of the epoch's last batch (which rows end up there differs per recipe); "train-set loss after" is the mean
per-label-token loss over the whole training split after the epoch, fp32, the same measure for every config.

Threads: the tables below ran with `--threads 1`. This 2-core machine is shared with other jobs; two intra-op
threads then fight for one free core and the per-config times swing by 2x from run to run, while one thread per
run gave steady ratios. Expect wall-clock ratios to move by +-20 % or more with the load.

Machine: {cpu}; torch {torch} (CPU), matmul peak {fp32:.0f} GFLOP/s fp32, {bf16:.0f} GFLOP/s bf16 (2048x2048, best
of 10, measured in the same run). Load average when written: {load} (the machine is shared: absolute numbers move
with the load, ratios within a run much less; "cpu s" is the process's own CPU time of the training loop, the
steadier measure when other jobs take the cores, and "x tutorial (cpu)" its ratio).

Reproduce: `make bench` (or `python bench/bench_train.py --threads 1`; `--models bloom`, `--configs tutorial,clmtune`,
`--quick` for 32 GPT-2-zh rows).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bloom,gpt2zh")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--gpt2zh-rows", type=int, default=96)
    ap.add_argument("--quick", action="store_true", help="32 GPT-2-zh rows instead of 96")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of every configuration and of the matmul peak (default: all cores; on a "
                         "machine shared with other jobs, 1 gives steadier ratios)")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "CFG_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import platform

    import torch

    from clmtune.device import cpu_matrix_features

    os.environ["BENCH_THREADS"] = str(args.threads)  # read by the children
    torch.set_num_threads(args.threads)  # the peak with the same threads as the runs
    peaks = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
    print(f"matmul peak on this machine: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s")
    descriptions = {"bloom": "BLOOM architecture, 4 layers x 1024, vocabulary 250,880, RAFT twitter_complaints "
                             "(50 rows, max_length 64)",
                    "gpt2zh": "GPT-2 architecture, 12 layers x 768, vocabulary 21,128 (BERT Chinese characters), "
                              "ChnSentiCorp reviews as 好评/差评 classification (max_length 256)"}
    for model in args.models.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench_{model}_"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # models of up to GBs: never left in /tmp
        model_dir = work / "model"
        build_model(model, model_dir)
        check_memory(model, model_dir)
        rows = 32 if args.quick else args.gpt2zh_rows
        cfg = task_config(model, model_dir, rows, work)
        cfg_path = work / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        frac, real_tokens, n_rows = supervised_fraction(cfg)
        flops_per_token = training_flops_per_token(model_dir, frac)
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
        base, trainer = results.get("tutorial"), results.get("trainer")
        for config, r in results.items():
            r["precision"] = "bf16" if "bf16" in config else "fp32"
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            r["speedup_vs_tutorial"] = base["seconds"] / r["seconds"] if base else None
            r["speedup_vs_tutorial_cpu"] = base["cpu_seconds"] / r["cpu_seconds"] if base else None
            r["speedup_vs_trainer"] = trainer["seconds"] / r["seconds"] if trainer else None
            r["achieved_flops"] = flops_per_token * r["tokens_per_s"]
            r["mfu"] = r["achieved_flops"] / peaks[r["precision"]]
            if r.get("prep_cpu_seconds"):  # counting the one-time bf16 preparation as if it were loop time
                r["mfu_with_prep"] = r["mfu"] * r["seconds"] / (r["seconds"] + r["prep_cpu_seconds"])
        print(f"\n{model}: 1 epoch, batch 8\n" + mfu_table(model, results, peaks))
        if "clmtune" in results and "clmtune_bf16" in results:
            a, b = results["clmtune"]["train_set_loss"], results["clmtune_bf16"]["train_set_loss"]
            rel = abs(b - a) / abs(a)
            print(f"train-set loss after the epoch: fp32 {a:.4f}, bf16 {b:.4f} ({100 * rel:.2f} % apart; tolerance "
                  f"{100 * LOSS_TOL:.0f} %: {'ok' if rel <= LOSS_TOL else 'EXCEEDED'})")
            results["clmtune_bf16"]["loss_vs_fp32"] = {"relative": rel, "tolerance": LOSS_TOL, "ok": rel <= LOSS_TOL}
        out = {"model": model, "description": descriptions[model],
               "when": time.strftime("%Y-%m-%d %H:%M"),
               "setup": f"{n_rows} training rows, {real_tokens} real tokens, {100 * frac:.1f} % of them supervised, "
                        f"{flops_per_token / 1e6:.0f} MFLOP per token, {args.threads}"
                        " torch threads",
               "machine": {**cpu_matrix_features(), "platform": platform.platform(),
                           "processor": platform.processor(), "load_average": os.getloadavg()},
               "matmul_peak_flops": peaks, "flops_per_token": flops_per_token, "supervised_fraction": frac,
               "results": results}
        result_path("train", model).write_text(json.dumps(out, indent=2, ensure_ascii=False))
        print(f"written {result_path('train', model)}\n")
    write_readme(peaks)
    print("written bench/README.md")


if __name__ == "__main__":
    main()
