"""Evaluation speed: ``rank`` vs ``generate`` on the same model and split, measured in the same run.

    python bench/bench_eval.py                      # every case below (about four minutes on 2 shared cores)
    python bench/bench_eval.py --only gpt2zh --batch-sizes 16
    python bench/bench_eval.py --device cuda        # on a GPU (default: auto = the GPU when there is one)

Every method goes through ``clmtune.evaluate.evaluate_examples`` (what ``clmtune eval`` runs) and must agree on the
number of examples. Cases (random weights, real tokenizers and data):
  tiny-opt   clmtune's built-in OPT (2 layers x 64, OPT/GPT-2 BPE vocabulary 50,265), first 320 unlabelled rows of
             RAFT twitter_complaints, labels ``complaint`` / ``no complaint``, max_length 64
  banking77  the same model on the first 32 unlabelled rows of RAFT banking_77: 77 labels of up to 9 tokens
             (a label tree of 232 nodes)
  gpt2zh     GPT-2 12 layers x 768, vocabulary 21,128 (BERT Chinese characters), 48 ChnSentiCorp dev reviews
             (labels 差评 / 好评), max_length 64
Methods ending in ``_bf16`` run the same method on a bf16 copy of the model (``clmtune.inference.for_inference``:
bf16 weights, oneDNN-packed matmuls; the precision eval's ``auto`` picks on a CPU with native bf16 units) and
report how often they predict the same label as fp32.
Methods: ``tutorial`` (what users ran before clmtune: peft's causal-LM example, every prompt left-padded to
``max_length``, ``model.generate(max_new_tokens=10)`` in batches of 8 whatever ``--batch-sizes`` says, decoded and
string-matched to the labels; the same prompt token ids as clmtune), ``rank`` (what ``eval.method: auto`` runs up to
64 tree nodes: the exact best-first search over the label tree, ``clmtune.rank.search``, then, for rows it
leaves open, prompt + label tree in one forward), ``rank_onepass`` (rank without the search: every tree node
scored in one forward), ``constrained`` (greedy decoding on the label tree,
``auto`` above 64 nodes), ``rank_shared_cache`` (the previous
implementation: prompt forward, then its KV cache repeated per label and a second forward; kept for
architectures that cannot take a custom 4D mask, e.g. BLOOM) and ``generate`` (greedy decoding of up to longest
label + 2 tokens with the KV cache, stopping at the end token; random weights never write it, so every step runs).
``--labels K`` (tiny-opt, gpt2zh): the same prompts scored against K labels, the case's own followed by made-up ones
(``EXTRA_LABELS``; English banking labels of 2-5 tokens, Chinese two-character words), to see how each method's
cost grows with the label set (the label tree has more nodes; generation runs as many steps as the longest label).
Batch sizes: 16 (throughput) and 1 (one example per call: the latency-bound regime, where per-call overhead rather
than arithmetic sets the time, as for small models on a GPU).
Timed repeats alternate between the methods; medians are compared, by wall-clock time and by the process's CPU time
(the steadier measure when other jobs share the cores; both are written). Threads: 1 by default, for the reason given in
bench_generate.py (two threads on this shared 2-core machine measure the neighbours).
Writes bench/results/eval_<case>_<machine>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))
from common import result_path  # noqa: E402  (bench/common.py)

import clmtune.evaluate as ev  # noqa: E402
import clmtune.rank.scoring as scoring  # noqa: E402
from clmtune.config import from_dict  # noqa: E402
from clmtune.device import cpu_matrix_features, describe_cpu  # noqa: E402
from clmtune.data import load_task, read_table, render_examples  # noqa: E402
from clmtune.models import (bert_chinese_tokenizer, builtin_model_path, load_model, load_tokenizer,  # noqa: E402
                            resolve_device)

CASES = ("tiny-opt", "banking77", "banking77-trained", "gpt2zh", "gpt2zh-trained")
METHODS = ("tutorial", "rank", "rank_onepass", "rank_shared_cache", "constrained", "generate", "rank_bf16",
           "rank_onepass_bf16", "constrained_bf16", "generate_bf16")
TUTORIAL_BATCH, TUTORIAL_NEW_TOKENS = 8, 10
BF16_COPIES: dict[int, torch.nn.Module] = {}


def setup(name: str, tmp: Path):
    """(model, tokenizer, RunConfig, examples, labels) for one benchmark case."""
    if name in ("tiny-opt", "banking77", "banking77-trained"):
        os.environ.setdefault("CLMTUNE_HOME", str(tmp / "home"))
        # data.max_length is `auto` (resolved by training) unless given; the bench fixes the tutorial's 64
        raw = {"model": {"name_or_path": str(builtin_model_path("tiny-opt"))}, "data": {"max_length": 64}}
        if name.startswith("banking77"):
            raw["data"] = {"source": "builtin:raft/banking_77", "template": "Query : {Query} label : ",
                           "label_column": "Label", "id_column": "ID", "end_token": "eos", "eval_fraction": 0.0,
                           "max_length": 64}
        cfg = from_dict(raw).validate()
        task = load_task(cfg.data)
        examples, labels = task.test[:320 if name == "tiny-opt" else 32], task.labels
        if name == "banking77-trained":
            return trained_banking77(raw, tmp) + (task.train, labels)
    elif name == "gpt2zh-trained":
        return trained_gpt2zh(tmp)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        tok = bert_chinese_tokenizer()
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=21128, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                           pad_token_id=0, eos_token_id=102, bos_token_id=101))
        folder = tmp / "gpt2zh"
        model.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        src = tmp / "reviews.csv"
        shared = next((d for d in (REPO.parent / "shared", REPO / "shared", Path("/work/shared")) if d.is_dir()),
                      REPO.parent / "shared")
        with open(shared / "data/chnsenticorp/dev.tsv", encoding="utf-8") as fh:
            rows = [r for _, r in zip(range(48), csv.DictReader(fh, delimiter="\t"))]
        with open(src, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["review", "label"])
            w.writerows([r["text_a"], "好评" if r["label"] == "1" else "差评"] for r in rows)
        cfg = from_dict({"model": {"name_or_path": str(folder)},
                         "data": {"source": str(src), "template": "评论：{review} 情感：", "label_column": "label",
                                  "labels": ["差评", "好评"], "eval_fraction": 0.0, "max_length": 64}}).validate()
        labels = ["差评", "好评"]
        examples, _ = render_examples(read_table(src), cfg.data, labels, str(src), labelled=True)
    return load_model(cfg.model).eval(), load_tokenizer(cfg.model), cfg, examples, labels


EXTRA_LABELS = {  # --labels K: the case's own labels, then these, up to K labels in all (same prompts and model)
    "tiny-opt": ["activate my card", "card arrival", "exchange rate", "lost or stolen card", "pending transfer",
                 "top up failed", "refund not showing up", "wrong amount of cash received"],
    "gpt2zh-trained": ["一般", "推荐", "失望", "满意", "糟糕", "不错", "很差", "超值"],
    "gpt2zh": ["一般", "推荐", "失望", "满意", "糟糕", "不错", "很差", "超值"],
}


def with_labels(name: str, labels: list[str], k: int | None) -> list[str]:
    """The first ``k`` of the case's labels followed by ``EXTRA_LABELS`` (the gold labels stay among them)."""
    if not k:
        return labels
    extra = [x for x in EXTRA_LABELS.get(name, []) if x not in labels]
    if k > len(labels) + len(extra):
        raise SystemExit(f"--labels {k}: case {name} has {len(labels) + len(extra)} labels at most")
    return (labels + extra)[:k]


@torch.no_grad()
def tutorial_eval(model, tok, cfg, examples, labels, out: Path) -> dict:
    """peft's causal-LM example's evaluation: prompts left-padded to max_length (the start kept when longer), batches
    of 8, ``model.generate(max_new_tokens=10)`` (greedy), the new tokens decoded, a row counts as the label its
    text starts with (the longest such label); writes predictions.csv like clmtune."""
    from clmtune.data import leading_special_ids

    from clmtune.models import context_length

    # the prompts fill max_length, the new tokens must fit the model's positions too (the shipped model has 256)
    length = min(cfg.data.max_length, (context_length(model) or 1 << 30) - TUTORIAL_NEW_TOKENS)
    prefix = leading_special_ids(tok)
    enc = [(prefix + ids)[:length] for ids in tok([e.prompt for e in examples], add_special_tokens=False).input_ids]
    device = next(model.parameters()).device
    eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(tok, "sep_token_id", None)
    preds = []
    t0 = time.perf_counter()
    for k in range(0, len(enc), TUTORIAL_BATCH):
        rows = enc[k:k + TUTORIAL_BATCH]
        ids = torch.tensor([[tok.pad_token_id] * (length - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], device=device)
        outs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=TUTORIAL_NEW_TOKENS,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id, do_sample=False)
        for text in tok.batch_decode(outs[:, length:].cpu().numpy(), skip_special_tokens=True):
            text = text.replace(" ", "") if any("\u4e00" <= c <= "\u9fff" for c in text) else text.strip()
            hit = [lab for lab in labels if text.startswith(lab)]
            preds.append(max(hit, key=len) if hit else text)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "predicted"])
        w.writerows([e.id, e.label, p] for e, p in zip(examples, preds))
    return {"n": len(examples), "seconds": seconds}


def trained_banking77(raw: dict, tmp: Path):
    """tiny-opt fully fine-tuned on the 50 labelled banking_77 rows (40 epochs, fp32), evaluated on the same rows:
    a memorisation test, so that the methods are compared on a model with real preferences among the labels (with
    random weights every label is nearly equally likely and agreement between methods means little)."""
    from clmtune.train import train

    run = dict(raw, peft={"method": "full"},
               train={"output_dir": str(tmp / "bank_run"), "overwrite": True, "epochs": 40, "batch_size": 10,
                      "learning_rate": 3e-3, "precision": "fp32", "seed": 0})
    cfg = from_dict(run).validate()
    result = train(cfg, progress=False)
    return result.model.eval(), load_tokenizer(cfg.model), cfg


def trained_gpt2zh(tmp: Path):
    """The shipped ``builtin:gpt2-zh-small`` with the shipped LoRA config (configs/chnsenticorp_classify.yaml)
    trained for one epoch on 640 ChnSentiCorp reviews, evaluated on 160 others: what a user's classifier looks like
    (its labels 差评/好评 are clear favourites; with ``--labels K`` the made-up labels are offered too)."""
    import random

    import yaml

    from clmtune.data import load_task
    from clmtune.data import assets_path
    from clmtune.train import train

    with open(assets_path("chnsenticorp/ChnSentiCorp_htl_all.csv"), encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(0).shuffle(rows)
    src = tmp / "reviews800.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["label", "review"])
        w.writeheader()
        w.writerows(rows[:800])
    raw = yaml.safe_load((REPO / "configs/chnsenticorp_classify.yaml").read_text(encoding="utf-8"))
    raw["data"]["source"] = str(src)
    raw["train"].update(output_dir=str(tmp / "gpt2zh_run"), overwrite=True, epochs=1)
    cfg = from_dict(raw).validate()
    result = train(cfg, progress=False)
    task = load_task(cfg.data)
    return result.model.eval(), load_tokenizer(cfg.model), cfg, task.eval, task.labels


def run_method(model, tok, cfg, examples, labels, method: str, out: Path) -> dict:
    if method.endswith("_bf16"):  # the same method on the bf16 copy (what eval's precision `auto` would run)
        model, method = BF16_COPIES[id(model)], method[:-5]
    t = time.process_time()
    res = _run_method(model, tok, cfg, examples, labels, method, out)
    res["cpu_seconds"] = time.process_time() - t
    return res


def _run_method(model, tok, cfg, examples, labels, method: str, out: Path) -> dict:
    if method == "tutorial":
        return tutorial_eval(model, tok, cfg, examples, labels, out)
    if method == "rank_onepass":  # rank without the best-first search: every label-tree node scored in one pass
        import functools

        import clmtune.evaluate.run as run_mod

        with mock.patch.object(run_mod, "predict_rank", functools.partial(run_mod.predict_rank, search=False)):
            return ev.evaluate_examples(model, tok, cfg, examples, labels, "rank", out, progress=False)
    if method == "rank_shared_cache":
        with mock.patch.object(scoring, "rank_strategy", lambda m: "shared_cache"):
            return ev.evaluate_examples(model, tok, cfg, examples, labels, "rank", out, progress=False)
    return ev.evaluate_examples(model, tok, cfg, examples, labels, method, out, progress=False)


def bench(name: str, batch_size: int, repeats: int, device: torch.device, tmp: Path,
          methods: tuple[str, ...] = METHODS, n_labels: int | None = None) -> dict:
    model, tok, cfg, examples, labels = setup(name, tmp)
    if name == "banking77-trained" and n_labels:  # the first K gold labels met; scored as unlabelled rows (timing)
        import dataclasses

        gold = list(dict.fromkeys(e.label for e in examples))
        labels = gold[:n_labels] if n_labels <= len(gold) else gold + [x for x in labels if x not in gold]
        labels = labels[:n_labels]
        examples = [dataclasses.replace(e, label=None) for e in examples]
    else:
        labels = with_labels(name, labels, n_labels)
    model.to(device)
    if any(m.endswith("_bf16") for m in methods):
        import copy

        from clmtune.inference import for_inference

        BF16_COPIES[id(model)] = for_inference(copy.deepcopy(model), "bf16")[0]
    cfg.eval.batch_size = batch_size
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:  # warm-up
        run_method(model, tok, cfg, examples[:batch_size], labels, method, tmp / "warm")
    agree, bf16_agree, accuracy = None, {}, {}
    for _ in range(repeats):
        preds = {}
        for method in methods:
            res = run_method(model, tok, cfg, examples, labels, method, tmp / method)
            assert res["n"] == len(examples)
            times[method].append(res["seconds"])
            cpu[method].append(res["cpu_seconds"])
            rows = list(csv.reader(open(tmp / method / "predictions.csv", encoding="utf-8")))[1:]
            preds[method] = [r[-1] for r in rows]
            if "accuracy" in res:
                accuracy[method] = res["accuracy"]
        agree = preds["rank"] == preds.get("rank_shared_cache", preds["rank"])
        assert agree, "the two rank implementations predict differently"
        bf16_agree = {m: sum(a == b for a, b in zip(preds[m], preds[m[:-5]])) / len(examples)
                      for m in preds if m.endswith("_bf16")}
        agree_rank = {m: sum(a == b for a, b in zip(preds[m], preds["rank"])) / len(examples) for m in preds
                      if "rank" in preds}
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"case": name, "examples": len(examples), "labels": len(labels), "batch_size": batch_size,
            "repeats": repeats, "device": str(device),
            "when": time.strftime("%Y-%m-%d %H:%M"), "tutorial_batch_size": TUTORIAL_BATCH,
            "machine": {**cpu_matrix_features(), "load_average": os.getloadavg(),
                        "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
            "seconds": times, "median_seconds": med, "cpu_seconds": cpu, "median_cpu_seconds": med_cpu,
            "speedup_vs_tutorial": {k: med.get("tutorial", math.nan) / v for k, v in med.items()},
            "speedup_vs_tutorial_cpu_time": {k: med_cpu.get("tutorial", math.nan) / v for k, v in med_cpu.items()},
            "speedup_rank_vs_generate_cpu_time": med_cpu["generate"] / med_cpu["rank"],
            "examples_per_s": {k: len(examples) / v for k, v in med.items()},
            "rank_predictions_equal_shared_cache": agree, "bf16_agreement_with_fp32": bf16_agree,
            "accuracy": accuracy, "agreement_with_rank": agree_rank,
            "speedup_rank_vs_generate": med["generate"] / med["rank"],
            "speedup_rank_vs_rank_shared_cache": med.get("rank_shared_cache", float("nan")) / med["rank"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=CASES)
    ap.add_argument("--batch-sizes", default="16,1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--labels", type=int, help="use K labels: the case's own, then made-up ones (EXTRA_LABELS; "
                    "tiny-opt and gpt2zh): the cost of each method as the label set grows")
    ap.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS)
                    + " (tutorial, rank and generate are needed for the ratios)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    names = [args.only] if args.only else list(CASES)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"device {device}, {torch.get_num_threads()} torch thread(s); {describe_cpu()}; load average "
          + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    print(f"{'case':<10} {'n':>4} {'labels':>6} {'batch':>5} {'tutorial s':>10} {'rank s':>8} {'shared s':>9} "
          f"{'generate s':>11} {'rank x tut':>10} {'gen x tut':>9} {'rank/gen':>9} {'(cpu)':>6} {'rank/shared':>12}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = []
            for b in sizes:
                r = bench(name, b, args.repeats, device, Path(tmp), tuple(args.methods.split(",")), args.labels)
                results[name].append(r)
                m = r["median_seconds"]
                x = r["speedup_vs_tutorial"]
                print(f"{name:<10} {r['examples']:>4} {r['labels']:>6} {b:>5} {m.get('tutorial', math.nan):>10.2f} {m['rank']:>8.2f} "
                      f"{m.get('rank_shared_cache', float('nan')):>9.2f} {m['generate']:>11.2f} {x['rank']:>9.2f}x "
                      f"{x['generate']:>8.2f}x {r['speedup_rank_vs_generate']:>8.2f}x "
                      f"{r['speedup_rank_vs_generate_cpu_time']:>5.2f}x {r['speedup_rank_vs_rank_shared_cache']:>11.2f}x",
                      flush=True)
                for k in m:
                    acc = r["accuracy"].get(k)
                    print(f"{'':<10} {k:<17} {m[k]:7.2f} s wall {r['median_cpu_seconds'][k]:7.2f} s cpu "
                          f"{x[k]:6.2f}x tutorial ({r['speedup_vs_tutorial_cpu_time'][k]:.2f}x cpu)"
                          + (f", accuracy {acc:.3f}" if acc is not None else "")
                          + f", same label as rank {100 * r['agreement_with_rank'].get(k, float('nan')):.1f} %"
                          + (f", same as fp32 {100 * r['bf16_agreement_with_fp32'][k]:.1f} %"
                             if k in r["bf16_agreement_with_fp32"] else ""), flush=True)
            out = result_path("eval", name if not args.labels else f"{name}_{args.labels}labels", device)
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(results[name], indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
