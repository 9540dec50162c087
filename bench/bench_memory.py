"""Real sizes: time and memory of LoRA training on the tutorial's model sizes, clmtune vs the tutorial's recipe,
fp32 / bf16 / bf16 + gradient checkpointing, measured in the same run.

    python bench/bench_memory.py                       # both models (~30-40 min on a shared 2-core CPU)
    python bench/bench_memory.py --models bloom560m --configs tutorial_fp32,clmtune_fp32

Models (random weights, configs written from the public model configs; real tokenizers of the same languages):
  bloom560m  bigscience/bloomz-560m's architecture: 24 layers x 1024, 16 heads, vocabulary 250,880; the 50
             twitter_complaints rows, max_length 64, batch 8: one full epoch (7 steps)
  llama1b    a 1.1B LLaMA (TinyLlama-1.1B's config: 22 layers x 2048, GQA 32/4 heads, intermediate 5632,
             vocabulary 32,000); ChnSentiCorp reviews as 好评/差评 classification, max_length 256, batch 2,
             --llama-steps optimizer steps (the BERT-Chinese tokenizer stands in for LLaMA's: ids < 21,128)
Configurations (each in its own child process, one after another, so the peak RSS is its own):
  tutorial_*  peft's causal-LM example: every row padded to max_length, model(**batch).loss (full logits);
              bf16: the model loaded with dtype=torch.bfloat16; gc: + gradient_checkpointing_enable() and
              enable_input_require_grads(), as peft's docs show
  clmtune_*   clmtune's train(): fp32 default; bf16 = model.dtype: bf16 + train.precision: bf16;
              gc = + train.gradient_checkpointing: true
--matrix [CASES]: the memory estimate against the measured peak on small models instead (the shipped
gpt2-zh-small with LoRA and full fine-tuning, fp32/bf16, checkpointing, classify/LM/chat/DPO; tiny OPT and BLOOM):
each case is `clmtune train --no-eval` for 2 steps in its own child with one torch thread; prints estimate /
measured ratios and writes them to bench/README.md with the date and the CPU (tests/test_memory_peak.py runs the
same cases; ~7 min on a shared 2-core CPU).

Reported: seconds per step (median over steps after the first), seconds per epoch, real (non-pad) tokens/s, peak
RSS of the child, and clmtune's memory estimate for the same step (``clmtune.memory``; runtime + estimate
compared with the peak RSS). Writes bench/results/memory_<model>_cpu.json and its section of
bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, cpu_name, result_path  # noqa: E402  (bench/common.py)
CONFIGS = ["tutorial_fp32", "clmtune_fp32", "tutorial_bf16", "clmtune_bf16", "tutorial_bf16_gc", "clmtune_bf16_gc"]
MODELS = {
    "bloom560m": "BLOOM-560m architecture (24 layers x 1024, vocabulary 250,880), twitter_complaints (50 rows, "
                 "max_length 64, batch 8, one epoch)",
    "llama1b": "1.1B LLaMA architecture (22 layers x 2048, GQA 32/4 heads, intermediate 5632, vocabulary 32,000), "
               "ChnSentiCorp reviews (max_length 256, batch 2)",
}


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", HERE / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_model(name: str, folder: Path) -> None:
    import torch
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    from clmtune.models import opt_bpe_tokenizer, bert_chinese_tokenizer

    torch.manual_seed(0)
    # built directly in bf16 (how it is stored, see below): a 1.1B model in fp32 plus its bf16 copy would need 6.6 GB
    torch.set_default_dtype(torch.bfloat16)
    if name == "bloom560m":  # bigscience/bloomz-560m config.json
        tok = opt_bpe_tokenizer()
        model = BloomForCausalLM(BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16,
                                             layer_norm_epsilon=1e-5, pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    else:  # TinyLlama/TinyLlama-1.1B config.json
        tok = bert_chinese_tokenizer()
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                             num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                                             tie_word_embeddings=False, pad_token_id=0, bos_token_id=101,
                                             eos_token_id=102))
    torch.set_default_dtype(torch.float32)
    # stored in bf16 (half the disk and load time); every configuration loads it in the dtype it asks for
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def task_config(model: str, model_dir: Path, work: Path, rows: int) -> dict:
    bt = _bench_train()
    cfg = bt.task_config("bloom" if model == "bloom560m" else "gpt2zh", model_dir, rows, work)
    if model == "llama1b":
        cfg["train"]["batch_size"] = 2
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# one configuration (child process)


def run_tutorial(cfg_dict: dict, bf16: bool, gc: bool, max_steps: int | None) -> dict:
    from functools import partial

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

    from clmtune.data import collate
    from clmtune.memory import current_rss, estimate_for_model

    bt = _bench_train()
    cfg, tok, enc, feats = bt.features(cfg_dict, "max_length")
    runtime = current_rss()
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path,
                                                 dtype=torch.bfloat16 if bf16 else torch.float32)
    if gc:  # what peft's docs show for gradient checkpointing with a frozen base
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.1))
    bs, length = cfg.train.batch_size, cfg.data.max_length
    loader = torch.utils.data.DataLoader(feats, batch_size=bs, shuffle=True,
                                         collate_fn=partial(collate, pad_id=enc.pad_id, length=length))
    steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    est = estimate_for_model(model, batch_size=bs, seq_len=length, head_positions=bs * length,
                             compute_dtype=torch.bfloat16 if bf16 else torch.float32, gradient_checkpointing=gc,
                             runtime=runtime)
    model.train()
    times, cpu, tokens, losses = [], [], [], []
    for batch in loader:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        tokens.append(int(batch["attention_mask"].sum()))
        if len(times) >= steps:
            break
    return {"step_seconds": times, "step_cpu_seconds": cpu, "step_tokens": tokens, "losses": losses,
            "steps_per_epoch": len(loader), "estimate": est.as_dict()}


def run_clmtune(cfg_dict: dict, bf16: bool, gc: bool, max_steps: int | None) -> dict:
    from clmtune.config import from_dict
    from clmtune.train import TrainRecipe

    t = cfg_dict["train"]
    t.update({"precision": "bf16" if bf16 else "fp32", "gradient_checkpointing": gc, "max_steps": max_steps})
    cfg_dict["model"]["dtype"] = "bf16" if bf16 else "fp32"
    cfg = from_dict(cfg_dict).validate()
    recipe = TrainRecipe(cfg, progress=False).setup()
    # CPU time of each optimizer step: stamp every optimizer.step() call (the step boundaries of the loop)
    stamps, step = [time.process_time()], recipe.opt.optimizer.step

    def stamped_step(*a, **kw):
        out = step(*a, **kw)
        stamps.append(time.process_time())
        return out

    recipe.opt.optimizer.step = stamped_step
    result = recipe.fit().save()
    log = [json.loads(line) for line in open(Path(cfg.train.output_dir) / "train_log.jsonl")]
    summary = json.loads((Path(cfg.train.output_dir) / "train_summary.json").read_text())
    return {"step_seconds": [r["seconds"] for r in log],
            "step_cpu_seconds": [b - a for a, b in zip(stamps, stamps[1:])],
            "step_tokens": [round(r["seconds"] * r["tokens_per_s"]) for r in log],  # log_every 1: one step a line
            "losses": [r["loss"] for r in log],
            "steps_per_epoch": -(-summary["data"]["train"] // cfg.train.batch_size), "memory": result.memory}


def child(config: str, cfg_path: str, max_steps: int | None) -> None:
    import torch

    from clmtune.memory import peak_rss

    torch.set_num_threads(1)
    cfg_dict = json.loads(Path(cfg_path).read_text())
    recipe, precision, *rest = config.split("_")
    bf16, gc = precision == "bf16", bool(rest)
    res = (run_tutorial if recipe == "tutorial" else run_clmtune)(cfg_dict, bf16, gc, max_steps)
    res["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------------------------------------------------------
# the parent: build, run every configuration, tabulate


def summarize(res: dict) -> dict:
    """Per-step numbers. On a shared machine wall time depends on the other jobs; with one torch thread the
    process's CPU time is the work itself, so the CPU-time columns are the ones to compare (and what one free
    core of this CPU would take)."""
    times, cpu, tokens = res["step_seconds"], res["step_cpu_seconds"], res["step_tokens"]
    s_step = statistics.median(times[1:] or times)  # the first step pays one-time costs (allocation, kernel choice)
    cpu_step = statistics.median(cpu[1:] or cpu)
    n_tok = statistics.median(tokens[1:] or tokens)
    out = {"steps": len(times), "s_per_step": s_step, "cpu_s_per_step": cpu_step, "s_first_step": times[0],
           "cpu_s_per_epoch": cpu_step * res["steps_per_epoch"], "s_per_epoch": s_step * res["steps_per_epoch"],
           "steps_per_epoch": res["steps_per_epoch"], "measured_epoch": len(times) == res["steps_per_epoch"],
           "tokens_per_cpu_s": n_tok / cpu_step, "tokens_per_s": n_tok / s_step, "first_loss": res["losses"][0],
           "last_loss": res["losses"][-1], "peak_rss": res["peak_rss"]}
    est = res["estimate"] if "estimate" in res else res["memory"]["estimate"]
    out["estimate"] = est
    out["estimate_plus_runtime"] = est["total"] + est["runtime"]
    out["estimate_over_peak"] = out["estimate_plus_runtime"] / res["peak_rss"]
    return out


PARAMS = {"bloom560m": 559_214_592, "llama1b": 1_100_048_384}


def memory_needed(model: str, config: str, cfg: dict) -> int:
    """Bytes a configuration needs, from the earlier runs: the weights in their dtype, ~0.7 GB of Python/torch/
    tokenizer, and for the tutorial's full logits 4 fp32 copies of batch x max_length x vocabulary (logits, their
    log-softmax and both gradients)."""
    vocab = 250_880 if model == "bloom560m" else 32_000
    need = PARAMS[model] * (2 if "bf16" in config else 4) + int(0.7 * 2 ** 30)
    if config.startswith("tutorial"):
        need += 4 * 4 * cfg["train"]["batch_size"] * cfg["data"]["max_length"] * vocab
    return need


def available_memory() -> int | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def wait_for_memory(model: str, config: str, cfg: dict, patience_s: int = 300) -> str | None:
    """None when the machine has the memory the configuration needs (waiting up to ``patience_s`` for other
    jobs to free it: the machine is shared), else why it was skipped."""
    need, t0 = memory_needed(model, config, cfg), time.time()
    while True:
        free = available_memory()
        if free is None or free > need:
            return None
        if time.time() - t0 > patience_s:
            return (f"needs about {need / 2 ** 30:.1f} GiB, only {free / 2 ** 30:.1f} GiB were available for "
                    f"{patience_s} s (shared machine)")
        time.sleep(10)


def table(results: dict) -> str:
    gib = 2 ** 30
    base = {p: results.get(f"tutorial_{p}") for p in ("fp32", "bf16", "bf16_gc")}
    lines = ["| config | CPU s/step | CPU s/epoch | tokens per CPU s | x tutorial tokens/CPU s (same precision) | wall s/step "
             "(shared) | peak RSS GiB | estimate GiB (runtime + step) | estimate / peak | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        ref = base.get(name.split("_", 1)[1])
        # per real token: the recipes put different rows into their few measured steps (clmtune groups by length)
        ratio = f"{r['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}" if ref else "-"
        epoch = f"{r['cpu_s_per_epoch']:.0f}" + ("" if r["measured_epoch"] else " (est.)")
        e = r["estimate"]
        lines.append(f"| {name} | {r['cpu_s_per_step']:.2f} | {epoch} | {r['tokens_per_cpu_s']:.0f} | {ratio} | "
                     f"{r['s_per_step']:.1f} | {r['peak_rss'] / gib:.2f} | {e['runtime'] / gib:.2f} + "
                     f"{e['total'] / gib:.2f} = {r['estimate_plus_runtime'] / gib:.2f} | "
                     f"{r['estimate_over_peak']:.2f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    return "\n".join(lines)


SECTION_HEAD = """## Real sizes: time and memory (`bench/bench_memory.py`)

LoRA (r=8, peft's default modules) on the tutorial's model sizes with random weights (configs written from the
public `config.json` of bigscience/bloomz-560m and TinyLlama-1.1B), each configuration in its own child process
with one torch thread, one after another in the same run. **tutorial** = peft's causal-LM example (rows padded to
`max_length`, `model(**batch).loss` over every position); its bf16 rows load the model with
`dtype=torch.bfloat16`, its gc rows add `gradient_checkpointing_enable()` + `enable_input_require_grads()`.
**clmtune** = `clmtune train` defaults; bf16 = `model.dtype: bf16` + `train.precision: bf16`; gc =
`train.gradient_checkpointing: true`. CPU s/step is the process's CPU time per optimizer step (one torch thread:
the work itself, what one free core takes), median of the steps after the first; CPU s/epoch is that x the steps
of one epoch ("est.": measured on fewer steps than an epoch; rough for the 1.1B model, whose one measured step
holds rows of different lengths in the two recipes, so compare tokens per CPU s there). Wall s/step is what the shared machine gave. Peak RSS is the child's maximum resident memory;
the estimate is `clmtune.memory` for the same step (weights + gradients + optimizer + activations + logits), plus
the process's resident memory before the weights were loaded ("runtime"), so it compares with the peak RSS.
The machine is shared with other jobs (load average below): absolute times move with the load, ratios within a
run much less.
"""


MEMORY_BEGIN, MEMORY_END = "<!-- bench_memory.py: begin -->", "<!-- bench_memory.py: end -->"


def gpu_note() -> str:
    """The GPU checks' section: what ``bench/gpu_check.py`` recorded (results/gpu_check_*.json), or that none ran."""
    runs = sorted(RESULTS.glob("gpu_check_*.json"))
    head = ("## GPU checks (`bench/gpu_check.py`)\n\n`python bench/gpu_check.py --out DIR` runs them in a few minutes "
            "on one GPU (a CUDA build of torch; `pip install deepspeed bitsandbytes` for those checks, otherwise "
            "reported as skipped). `zero2`, `zero3` (ZeRO-3 + CPU offload), `fsdp` (FSDP2 through `accelerate "
            "launch`) and `qlora` train builtin:tiny-opt 6 steps, save, and compare the saved adapter with the "
            "weights gathered from the engine (non-empty, equal; loaded with plain peft on an fp32 base); `resume` "
            "compares an interrupted + resumed CUDA run with an uninterrupted one (`train.deterministic` off and "
            "on); `padding` trains on left-padded batches under SDPA with transformers' 2D mask and with clmtune's "
            "self-attending 4D mask (`clmtune.models.self_attending_mask`). Memory: the estimate against "
            "`torch.cuda.max_memory_allocated`.\n")
    if not runs:
        return head + "\nNot run yet: no GPU was available to this work.\n"
    rows = []
    for f in runs:
        rep = json.loads(f.read_text())
        rows.append(f"\n{f.name}: {rep['gpu']}, torch {rep['torch']} (CUDA {rep['cuda']}), {rep['when']}; "
                    f"{rep.get('wheels', '')}\n\n| check | result | seconds | what |\n|---|---|---|---|")
        for name, c in rep["checks"].items():
            if "skipped" in c:
                rows.append(f"| {name} | skipped | | {c['skipped']} |")
                continue
            if name == "resume":
                what = "; ".join(f"deterministic {r['deterministic']}: {r['steps']} steps, max difference "
                                 f"{r['max_abs_diff']}, bit-identical {r['bit_identical']}"
                                 for r in (c["nondeterministic"], c["deterministic"]))
                ok = c["nondeterministic"]["bit_identical"] and c["deterministic"]["bit_identical"]
            elif name == "padding":
                nan = "; ".join(f"head dim {k['head_dim']}, length {k['length']}, {k['dtype']}, "
                                f"{'4D self-attending' if k['self_attending_mask'] else '2D'} mask: loss {k['loss']:.3f}, "
                                f"gradient norm {k['grad_norm']}" for k in c["kernel_nan_cases"]) or "none"
                train = "; ".join(f"mask {'off' if k.endswith('False') else 'on'}: "
                                  + (v.get("error") or f"{v['steps']} steps, loss {v['loss'][0]:.2f} -> "
                                     f"{v['loss'][1]:.2f}") for k, v in c["train"].items())
                what = (f"{len(c['kernels'])} kernel cases, NaN in: {nan}. ChnSentiCorp fine-tuning of a random "
                        f"6 x 320 GPT-2 (heads of 64): {train}")
                ok = c["ok"]
            else:
                mem = c.get("memory") or {}
                what = (f"{c.get('steps', 6)} steps, loss {c['loss'][0]:.2f} -> {c['loss'][1]:.2f}; adapter tensors "
                        f"{c['adapter_tensors']}, empty {len(c['empty_tensors'])}, max difference "
                        f"{c['max_abs_diff_vs_trained']}; peak {c['cuda_max_allocated'] / 2 ** 20:.0f} MiB"
                        + (f" (estimate {mem['estimate']['total'] / 2 ** 20:.1f} MiB)" if mem else "")) \
                    if "loss" in c else c.get("error", "")
                ok = c.get("ok")
            rows.append(f"| {name} | {'ok' if ok else 'FAILED'} | {c.get('seconds', '')} | {what} |")
            if c.get("note"):
                rows.append(f"| | | | {c['note']} |")
    return head + "\n".join(rows) + "\n"



def user_sentence(results_by_model: dict) -> str:
    bloom = results_by_model.get("bloom560m", {})
    parts = []
    if "clmtune_bf16" in bloom and "tutorial_fp32" in bloom:
        parts.append(f"One epoch of twitter_complaints (50 rows, batch 8) with bloomz-560m's architecture takes about "
                     f"{bloom['clmtune_bf16']['cpu_s_per_epoch']:.0f} s of one core of this CPU with clmtune in bf16 "
                     f"({bloom['clmtune_fp32']['cpu_s_per_epoch']:.0f} s in fp32), against "
                     f"{bloom['tutorial_fp32']['cpu_s_per_epoch']:.0f} s with the tutorial's fp32 recipe, and needs "
                     f"{bloom['clmtune_bf16']['peak_rss'] / 2 ** 30:.1f} GiB of RAM (tutorial: "
                     f"{bloom['tutorial_fp32']['peak_rss'] / 2 ** 30:.1f} GiB).")
    llama = results_by_model.get("llama1b", {})
    best = min(llama.values(), key=lambda r: r["peak_rss"]) if llama else None
    if best:
        name = next(k for k, v in llama.items() if v is best)
        parts.append(f"A 1.1B LLaMA trains with LoRA in {best['peak_rss'] / 2 ** 30:.1f} GiB ({name}) at "
                     f"{best['cpu_s_per_step']:.0f} CPU s per step of 2 ChnSentiCorp reviews: on a CPU that is for trying a "
                     "setup out, not for training on 9,600 rows.")
    return " ".join(parts)


def write_markdown() -> Path:
    parts, by_model = [], {}
    for f in sorted(RESULTS.glob("memory_*_cpu.json")):
        res = json.loads(f.read_text())
        by_model[res["model"]] = res["results"]
        m = res["machine"]
        parts.append(f"### {res['description']}\n\nMeasured {res['when']} on {m['cpu']} ({m['cpu_count']} cores, "
                     f"{m['capability']}, torch {m['torch']}, 1 torch thread per run), load average "
                     f"{m['load_average_start']} at the start and {m['load_average_end']} at the end; "
                     f"{res['setup']}.\n\n" + table(res["results"]) + "\n"
                     + "".join(f"\n{k} not run: {v}\n" for k, v in res.get("skipped", {}).items()))
    body = SECTION_HEAD + "\n" + user_sentence(by_model) + "\n\n" + "\n".join(parts) + "\n" + gpu_note()
    readme = HERE / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    section = f"{MEMORY_BEGIN}\n{body}\n{MEMORY_END}"
    if MEMORY_BEGIN in text:
        text = text[:text.index(MEMORY_BEGIN)] + section + text[text.index(MEMORY_END) + len(MEMORY_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(text, encoding="utf-8")
    return readme



# ---------------------------------------------------------------------------------------------------------------
# --matrix: the estimate against the measured peak on the shipped and built-in models (tests/test_memory_peak.py)

CONFIGS_DIR = HERE.parent / "configs"
CLASSIFY, CHAT, DPO, LM = (str(CONFIGS_DIR / f) for f in ("chnsenticorp_classify.yaml", "chat_zh.yaml",
                                                          "chnsenticorp_dpo.yaml", "chnsenticorp_lm.yaml"))
TINY = ["--peft.target_modules", "null", "--train.precision", "fp32"]
MATRIX = {  # name: (config file, overrides); every case trains MATRIX_STEPS steps, the longest batch first
    "gpt2zh_lora_bf16_b16_L256": (CLASSIFY, []),
    "gpt2zh_lora_fp32_b16_L256": (CLASSIFY, ["--train.precision", "fp32"]),
    "gpt2zh_lora_bf16_b8_L128": (CLASSIFY, ["--train.batch_size", "8", "--data.max_length", "128"]),
    "gpt2zh_full_fp32_b16_L256": (CLASSIFY, ["--peft.method", "full", "--train.precision", "fp32"]),
    "gpt2zh_full_bf16_b8_L128": (CLASSIFY, ["--peft.method", "full", "--train.batch_size", "8",
                                            "--data.max_length", "128"]),
    "gpt2zh_lora_bf16_gc_b16_L256": (CLASSIFY, ["--train.gradient_checkpointing", "true"]),
    "gpt2zh_lm_lora_bf16_b8_L128": (LM, []),
    "gpt2zh_chat_full_bf16_b16_L256": (CHAT, []),
    "gpt2zh_chat_lora_fp32_b8_L256": (CHAT, ["--peft.method", "lora", "--train.batch_size", "8",
                                             "--train.precision", "fp32"]),
    "gpt2zh_dpo_lora_bf16_b8_L80": (DPO, []),
    "gpt2zh_dpo_full_fp32_b8_L80": (DPO, ["--peft.method", "full", "--train.precision", "fp32",
                                          "--train.learning_rate", "1e-4"]),
    "tinyopt_lora_fp32_b16_L256": (CLASSIFY, ["--model.name_or_path", "builtin:tiny-opt", *TINY]),
    "tinybloom_lora_fp32_b8_L256": (CLASSIFY, ["--model.name_or_path", "builtin:tiny-bloom", *TINY,
                                               "--train.batch_size", "8"]),
    "tinyopt_full_fp32_b16_L128": (CLASSIFY, ["--model.name_or_path", "builtin:tiny-opt", *TINY,
                                              "--peft.method", "full", "--data.max_length", "128",
                                              "--train.learning_rate", "1e-4"]),
}
FAST = ["tinyopt_lora_fp32_b16_L256", "gpt2zh_lora_bf16_b8_L128"]
"""The cases tests/test_memory_peak.py runs without the slow marker (about 15 s each on an idle core)."""
MATRIX_STEPS = 2


def measure_case(name: str, work: Path) -> dict:
    """Train one case with the real CLI (``clmtune train --no-eval``) in a child process with one torch thread,
    and compare its estimate (train_summary.json) with the child's peak resident memory: its VmHWM at exit (Linux;
    elsewhere ``ru_maxrss`` from ``os.wait4``), from exec to exit, nothing subtracted."""
    config, overrides = MATRIX[name]
    out = work / name
    hwm = work / f"{name}.vmhwm"
    args = ["clmtune", "train", "--config", config, *overrides, "--no-eval", "--train.max_steps", str(MATRIX_STEPS),
            "--train.output_dir", str(out), "--train.overwrite", "true"]
    # On Linux a child's ru_maxrss also counts the parent's resident memory at the fork (exec keeps the forked
    # copy's high-water mark): from a large parent such as a long pytest session every case measured the parent.
    # The child's own VmHWM, read at its exit, starts at its exec.
    cmd = [sys.executable, "-c", f"import atexit, runpy, sys; sys.argv = {args!r}; atexit.register(lambda: "
           f"open({str(hwm)!r}, 'w').write(open('/proc/self/status').read())); "
           "runpy.run_module('clmtune', run_name='__main__')"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{name} failed:\n{log.read().decode(errors='replace')[-3000:]}")
    lines = hwm.read_text().splitlines() if hwm.is_file() else []
    vmhwm = [int(x.split()[1]) * 1024 for x in lines if x.startswith("VmHWM:")]
    peak = vmhwm[0] if vmhwm else usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    summary = json.loads((out / "train_summary.json").read_text())
    est = summary["memory"]["estimate"]
    shutil.rmtree(out, ignore_errors=True)
    return {"case": name, "estimate": est["total"] + est["runtime"], "runtime": est["runtime"],
            "step": est["total"], "activations": est["activations"], "measured": peak,
            "ratio": round((est["total"] + est["runtime"]) / peak, 3)}


def matrix_table(rows: list[dict]) -> str:
    out = ["| case | estimated peak MiB (runtime + step) | measured peak RSS MiB | estimate / measured |",
           "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['runtime'] / MIB:,.0f} + {r['step'] / MIB:,.0f} = {r['estimate'] / MIB:,.0f} "
                   f"| {r['measured'] / MIB:,.0f} | {r['ratio']:.2f} |")
    return "\n".join(out)


MIB = 2 ** 20
MATRIX_BEGIN, MATRIX_END = "<!-- bench_memory.py --matrix: begin -->", "<!-- bench_memory.py --matrix: end -->"


def run_matrix(names: list[str]) -> None:
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench_memory_matrix_"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = []
    for name in names:
        r = measure_case(name, work)
        rows.append(r)
        print(f"{name:<34} estimate {r['estimate'] / MIB:7,.0f} MiB  measured {r['measured'] / MIB:7,.0f} MiB  "
              f"ratio {r['ratio']:.2f}", flush=True)
    machine = (f"{cpu_name()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, torch "
               f"{torch.__version__}, 1 torch thread)")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result_path("memory", "matrix").write_text(json.dumps({"when": when, "machine": machine, "rows": rows},
                                                          indent=2))
    body = (f"## The estimate against the measured peak (`bench/bench_memory.py --matrix`)\n\n"
            f"Measured {when} on {machine}, load average {load_start}. Each case is `clmtune train --no-eval` for "
            f"{MATRIX_STEPS} steps (the longest batch comes first) in its own child process; measured = that child's "
            "peak resident memory (its VmHWM at exit: the whole process from exec to exit, Python and "
            "imports included, nothing subtracted); estimated = `train_summary.json`'s estimate of that peak "
            "(`runtime`, measured before the weights load, + the training step's parts). tests/test_memory_peak.py "
            "holds every case within 0.75-1.25.\n\n" + matrix_table(rows) + "\n")
    readme = HERE / "README.md"
    text = readme.read_text(encoding="utf-8")
    section = f"{MATRIX_BEGIN}\n{body}{MATRIX_END}"
    if MATRIX_BEGIN in text:
        text = text[:text.index(MATRIX_BEGIN)] + section + text[text.index(MATRIX_END) + len(MATRIX_END):]
    else:
        text = text.replace(MEMORY_BEGIN, section + "\n\n" + MEMORY_BEGIN)
    readme.write_text(text, encoding="utf-8")
    print(matrix_table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--bloom-steps", type=int, default=3,
                    help="optimizer steps of each bloom560m configuration (7 = the whole epoch; fewer: the epoch "
                         "time is extrapolated from the median step)")
    ap.add_argument("--llama-steps", type=int, default=2, help="optimizer steps of each llama1b configuration")
    ap.add_argument("--llama-rows", type=int, default=64, help="ChnSentiCorp rows of the llama1b task")
    ap.add_argument("--matrix", nargs="?", const="all", metavar="CASES",
                    help="the estimate against the measured peak RSS on small models (comma-separated cases of "
                         f"{', '.join(MATRIX)}; default all), written to bench/README.md")
    ap.add_argument("--child", nargs=3, metavar=("CONFIG", "CFG_JSON", "MAX_STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.matrix:
        return run_matrix(list(MATRIX) if args.matrix == "all" else args.matrix.split(","))
    if args.child:
        config, cfg_path, steps = args.child
        return child(config, cfg_path, int(steps) if steps != "none" else None)

    import torch

    for model in args.models.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench_memory_{model}_"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)  # models of up to GBs: never left in /tmp
        model_dir = work / "model"
        print(f"[{model}] building the model (random weights) ...", flush=True)
        build_model(model, model_dir)
        cfg = task_config(model, model_dir, work, args.llama_rows)
        cfg_path = work / "cfg.json"
        cfg_path.write_text(json.dumps(cfg))
        steps = str(args.llama_steps if model == "llama1b" else args.bloom_steps)
        load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
        results, skipped = {}, {}

        def save() -> None:  # after every configuration: an interrupted run keeps what it measured
            rows = "50 twitter_complaints rows, batch 8" if model == "bloom560m" else \
                f"{args.llama_rows} ChnSentiCorp rows, batch 2, {args.llama_steps} steps per configuration"
            out = {"model": model, "description": MODELS[model], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "setup": f"{rows}; LoRA r=8 on peft's default modules",
                   "machine": {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                               "capability": torch.backends.cpu.get_cpu_capability(), "load_average_start": load_start,
                               "load_average_end": " ".join(f"{x:.1f}" for x in os.getloadavg())},
                   "results": results, "skipped": skipped}
            result_path("memory", model).write_text(json.dumps(out, indent=2, ensure_ascii=False))

        for config in args.configs.split(","):
            print(f"[{model}] {config} ...", flush=True)
            if (why := wait_for_memory(model, config, cfg)) is not None:
                print(f"    skipped: {why}", flush=True)
                skipped[config] = why
                save()
                continue
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", config, str(cfg_path), steps],
                                  capture_output=True, text=True,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-3000:])
                raise SystemExit(f"{model}/{config} failed")
            results[config] = summarize(json.loads(line[0][7:]))
            save()
            r = results[config]
            print(f"    {r['cpu_s_per_step']:.2f} CPU s/step ({r['s_per_step']:.1f} wall), peak {r['peak_rss'] / 2 ** 30:.2f}"
                  f" GiB, estimate {r['estimate_plus_runtime'] / 2 ** 30:.2f} GiB ({time.perf_counter() - t0:.0f} s "
                  "with loading)", flush=True)
        print(f"\n{model}\n" + table(results) + "\n", flush=True)
    print(f"written {write_markdown()}")


if __name__ == "__main__":
    main()
