"""Generation speed: clmtune's generate (its own decoding loop, KV cache on) vs the tutorial's loop and
transformers' ``generate``, same run.

    python bench/bench_generate.py             # 86 new tokens, 3 timed repeats each (about a minute on 2 cores)
    python bench/bench_generate.py --repeats 1

The tutorial's loop re-runs the whole sequence for every new token and takes the last position's logits:

    for _ in range(86):
        logits = model(input_ids).logits[:, -1, :]        # (1, T, V) computed, T grows by one each step
        keep the 10 best, softmax, sample one, append it to input_ids

Model: GPT-2 architecture, 12 layers x 768 wide, 12 heads, 1,024 positions, vocabulary 21,128 (the BERT Chinese
character tokenizer shipped with clmtune), random weights (seed 0); batch 1; top-k 10 sampling, temperature 1.
Both paths must produce all 86 tokens (counted with a forward hook); a run that stopped early at [SEP]/[PAD]
would be unfairly short, so the seed is moved on until it does not.
Paths: the tutorial's loop (fp32, as users ran it), clmtune's ``generate`` with fp32 weights, clmtune with the
weights in the precision ``--dtype`` picks (``auto``: bf16 with oneDNN-packed matmuls where the CPU has native
bf16 units, see ``clmtune.inference``), and ``transformers``' ``generate`` on those same weights (same sampling,
``min_new_tokens`` so it writes all 86 tokens too): whether clmtune's hand-written loop costs anything. Timed repeats alternate between the paths (the machine is shared); the
medians are compared, by wall-clock time and by the process's CPU time (on a machine where other jobs take the
cores, CPU time is the steadier measure of the work done; both are printed).
Also: greedy outputs of bf16 vs fp32 on 50 ChnSentiCorp prompts (32 new tokens; exact-match rate and the share of
tokens before the first difference), and batched throughput at batch 8 and 32 (rows x steps per second).
Threads: 1 by default (``--threads``). On this 2-core machine shared by three developers, 2 torch threads make every
small op of a one-token step wait on an OpenMP barrier (a 12-layer one-token forward: ~30 ms with 1 thread,
~150 ms with 2), which measures the neighbours rather than the code. Both paths always use the same setting.
Writes bench/results/generate_gpt2zh_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import copy

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))
from common import result_path  # noqa: E402  (bench/common.py)

from clmtune.config import GenerateConfig  # noqa: E402
from clmtune.device import cpu_matrix_features, describe_cpu  # noqa: E402
from clmtune.inference import for_inference  # noqa: E402
from clmtune.generate import generate  # noqa: E402
from clmtune.models import bert_chinese_tokenizer  # noqa: E402

PROMPT = "这是很久之前的事情了，"
NEW_TOKENS = 86


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bert_chinese_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=21128, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                                       bos_token_id=tok.cls_token_id))
    model.eval()
    return model, tok


@torch.no_grad()
def tutorial_loop(model, input_ids: torch.Tensor, n: int, k: int = 10) -> torch.Tensor:
    for _ in range(n):
        logits = model(input_ids).logits[:, -1, :]  # full re-run: (1, T, V) logits, only the last one used
        top = torch.topk(logits, k)
        filtered = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values)
        nxt = torch.multinomial(torch.softmax(filtered, dim=-1), 1)  # (1, 1)
        input_ids = torch.cat([input_ids, nxt], dim=1)
    return input_ids


class Calls:
    """Counts forward passes of a model (one per new token in every path) and the rows they ran (one new token
    each: the row-tokens a batched run generated, whichever rows ended early)."""

    def __init__(self, *models):
        self.n = self.rows = 0
        for m in models:
            m.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.n += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += 0 if ids is None else ids.shape[0]


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def review_prompts(n: int) -> list[str]:
    import csv

    path = HERE.parent / "src/clmtune/assets/chnsenticorp/ChnSentiCorp_htl_all.csv"
    with open(path, encoding="utf-8") as fh:
        rows = [r["review"] for _, r in zip(range(10 * n), csv.DictReader(fh))]
    return [r[:40] for r in rows[::10][:n]]  # every 10th review, its first 40 characters


def greedy_agreement(m32, m16, tok, prompts: list[str], new: int = 32) -> dict:
    s = GenerateConfig(max_new_tokens=new, temperature=0, batch_size=8)
    a = [g.outputs[0] for g in generate(m32, tok, prompts, s)]
    b = [g.outputs[0] for g in generate(m16, tok, prompts, s)]
    same = sum(x == y for x, y in zip(a, b))
    prefix = sum(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
                 for x, y in zip(a, b))
    return {"prompts": len(prompts), "new_tokens": new, "identical": same, "identical_share": same / len(prompts),
            "chars_before_first_difference_share": prefix / max(1, sum(len(x) for x in a))}


class Paths:
    """The timed ways to write NEW_TOKENS tokens; each returns (wall, cpu) seconds and leaves ``calls`` counted."""

    def __init__(self, model, fast, tok, calls: Calls):
        self.model, self.fast, self.tok, self.calls = model, fast, tok, calls
        self.input_ids = torch.tensor([tok(PROMPT, add_special_tokens=False).input_ids])

    def clmtune(self, m, seed: int, prompts=(PROMPT,), batch: int = 1):
        s = GenerateConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=10, seed=seed, batch_size=batch)
        self.calls.n = self.calls.rows = 0
        t = clocks()
        generate(m, self.tok, list(prompts), s)
        return since(t)

    def transformers(self, m, seed: int, prompts=(PROMPT,)):
        batch = self.tok(list(prompts), add_special_tokens=False, return_tensors="pt", padding=True,
                         padding_side="left", return_token_type_ids=False)
        torch.manual_seed(seed)
        self.calls.n = self.calls.rows = 0
        t = clocks()
        with torch.no_grad():
            m.generate(**batch, do_sample=True, top_k=10, temperature=1.0, max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, pad_token_id=self.tok.pad_token_id)
        return since(t)

    def tutorial(self, seed: int):
        torch.manual_seed(seed)
        self.calls.n = 0
        t = clocks()
        tutorial_loop(self.model, self.input_ids, NEW_TOKENS)
        return since(t)

    def full_length_seed(self) -> int:
        """A seed whose sample does not end early on an end/pad token, in both clmtune paths."""
        seed = 0
        while True:
            self.clmtune(self.model, seed)
            ok = self.calls.n == NEW_TOKENS
            self.clmtune(self.fast, seed)
            if ok and self.calls.n == NEW_TOKENS:
                return seed
            seed += 1


def timed(paths: dict, calls: Calls, seed: int, repeats: int) -> tuple[dict, dict]:
    """(wall, cpu) seconds of every path, ``repeats`` times, the paths alternating."""
    wall: dict[str, list[float]] = {k: [] for k in paths}
    cpu: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for k, f in paths.items():
            w, c = f(seed)
            assert calls.n == NEW_TOKENS, (k, calls.n)
            wall[k].append(w)
            cpu[k].append(c)
    return wall, cpu


def batched_rows(runs: dict, calls: Calls, sizes: list[int]) -> dict:
    batched = {}
    for b in sizes:
        for k, f in runs.items():
            w, c = f(b)
            batched[f"{k} batch {b}"] = {"rows": b, "steps": calls.n, "row_tokens": calls.rows, "wall_s": w,
                                         "cpu_s": c, "row_tokens_per_s_wall": calls.rows / w,
                                         "row_tokens_per_s_cpu": calls.rows / c}
    return batched


def show(result: dict, out: Path) -> None:
    med, med_cpu, agreement = result["median_seconds"], result["median_cpu_seconds"], result["greedy_bf16_vs_fp32"]
    print(f"{describe_cpu()}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'path':<18} {'wall s':>8} {'tokens/s':>9} {'x tut':>7} {'cpu s':>8} {'x tut (cpu)':>12}")
    for k in med:
        print(f"{k:<18} {med[k]:>8.2f} {NEW_TOKENS / med[k]:>9.1f} {med['tutorial'] / med[k]:>6.2f}x "
              f"{med_cpu[k]:>8.2f} {med_cpu['tutorial'] / med_cpu[k]:>11.2f}x")
    for k, r in result["batched"].items():
        print(f"{k:<30} {r['row_tokens_per_s_wall']:>7.1f} row-tokens/s wall, {r['row_tokens_per_s_cpu']:>7.1f} cpu "
              f"({r['steps']} steps, {r['row_tokens']} row-tokens)")
    if agreement:
        print(f"greedy {result['fast_precision']} vs fp32 on {agreement['prompts']} prompts: {agreement['identical']} "
              f"identical, {100 * agreement['chars_before_first_difference_share']:.1f} % of characters before the "
              "first difference")
    print(f"written to {out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for all paths")
    ap.add_argument("--dtype", default="auto", help="precision of the fast clmtune path (auto, bf16, fp32)")
    ap.add_argument("--batch-sizes", default="8,32", help="batched throughput; empty: skip")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = build_model()
    fast, precision, why = for_inference(copy.deepcopy(model), args.dtype)
    calls = Calls(model, fast)
    run = Paths(model, fast, tok, calls)
    seed = run.full_length_seed()
    run.tutorial(seed)  # warm-up of the long shapes
    paths = {"tutorial": run.tutorial, "clmtune_fp32": lambda s: run.clmtune(model, s)}
    if precision != "fp32":
        paths[f"clmtune_{precision}"] = lambda s: run.clmtune(fast, s)
    paths[f"transformers_{precision}"] = lambda s: run.transformers(fast, s)
    wall, cpu = timed(paths, calls, seed, args.repeats)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    prompts = review_prompts(50)
    runs = {"clmtune_fp32": lambda b: run.clmtune(model, seed, prompts[:b], batch=b)}
    if precision != "fp32":
        runs[f"clmtune_{precision}"] = lambda b: run.clmtune(fast, seed, prompts[:b], batch=b)
    runs[f"transformers_{precision}"] = lambda b: run.transformers(fast, seed, prompts[:b])
    batched = batched_rows(runs, calls, [int(x) for x in args.batch_sizes.split(",") if x])
    agreement = greedy_agreement(model, fast, tok, prompts) if precision != "fp32" else None
    result = {
        "model": "GPT-2 12 layers x 768, vocab 21,128, random weights", "batch": 1,
        "prompt_tokens": run.input_ids.shape[1], "new_tokens": NEW_TOKENS, "sampling": "top-k 10, temperature 1",
        "seed": seed, "repeats": args.repeats, "dtype": args.dtype, "fast_precision": precision,
        "fast_precision_reason": why, "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {**cpu_matrix_features(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "seconds": wall, "cpu_seconds": cpu, "median_seconds": med, "median_cpu_seconds": med_cpu,
        "tokens_per_s": {k: NEW_TOKENS / v for k, v in med.items()},
        "speedup_vs_tutorial": {k: med["tutorial"] / v for k, v in med.items()},
        "speedup_vs_tutorial_cpu_time": {k: med_cpu["tutorial"] / v for k, v in med_cpu.items()},
        "batched": batched, "greedy_bf16_vs_fp32": agreement,
    }
    out = result_path("generate", "gpt2zh")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    show(result, out)


if __name__ == "__main__":
    main()
