"""`make demo`: what fine-tuning the shipped pretrained Chinese GPT-2 (builtin:gpt2-zh-small) does, on real data.

    python scripts/demo.py [--out runs/demo] [--classify-steps N] [--full-steps N] [--lm-steps N] [--chat-steps N]

1. Classification on ChnSentiCorp_htl_all.csv (好评/差评, 80/20 split, seed 123), LoRA and then full fine-tuning:
   accuracy and macro-F1 on the whole held-out 20 % (1,553 reviews), against the majority class (LoRA covers the
   character embedding too: without it this small model's adapter stays near the majority class; see the model card).
2. LoRA language-model fine-tuning on the hotel reviews: perplexity of the held-out 10 % before and after (the same
   bf16 evaluation both times), then top-k sampling from 早餐太差，无论去多少人 and two more prompts.
3. Chat fine-tuning on the chatterbot-zh conversations (configs/chat_zh.yaml, capped at --chat-steps): the
   replies to two held-out questions before and after, the held-out assistant-token loss and reply ROUGE-L.
4. DPO of that review LM on the shipped preference pairs (prompt 写一条酒店评论：, chosen a positive review,
   rejected a negative one): the share of sampled reviews rated 好评 by a TF-IDF classifier, before and after, and
   the held-out reward accuracy (scripts/preference_demo.py).
5. A summary table with each step's wall and CPU seconds (also in OUT/summary.json, with the CPU and the load
   average, since the same steps take twice as long on a busy machine) and OUT/report.html.

It aims at five minutes on an idle 2-core CPU (summary.json says what a run took, step by step): training is
capped (train.max_steps) and has no held-out evaluation during training (each run is evaluated once, at the end,
on its whole held-out split); the untrained model is loaded once, in bf16 where the CPU multiplies bf16 natively
(clmtune.device), and serves every "before" number; each step releases its models before the next. The configs
in configs/ train for full epochs.
Everything goes through clmtune's own stage functions (train, evaluate, generate, chat).

A step is a function ``step(demo) -> dict`` listed in STEPS: it appends its rows to the table and returns what
goes into summary.json under its name. A further step is one more function and one more entry there.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["早餐太差，无论去多少人", "房间很干净，服务员", "这家酒店的位置"]
NO_EVAL_DURING_TRAINING = {"eval_steps": None, "save_best": None, "early_stopping_patience": None}


@dataclasses.dataclass
class Demo:
    """What the steps share: the arguments, the output folder, the summary table, the runs for the report, and
    the untrained model (loaded once, for inference)."""

    args: argparse.Namespace
    out: Path
    rows: list = dataclasses.field(default_factory=list)
    runs: list = dataclasses.field(default_factory=list)
    _base: object = None

    def base_model(self):
        """The untrained model, loaded once and prepared for inference (bf16 where the CPU has native bf16)."""
        if self._base is None:
            from clmtune.config import ModelConfig
            from clmtune.inference import for_inference
            from clmtune.models import load_model

            self._base, _, _ = for_inference(load_model(ModelConfig(name_or_path=self.args.model)).eval())
        return self._base

    def base_tokenizer(self):
        from clmtune.config import ModelConfig
        from clmtune.models import load_tokenizer

        return load_tokenizer(ModelConfig(name_or_path=self.args.model))


def release() -> None:
    """Collect what a finished step dropped (its models) and give the memory back to the system before the next
    step: glibc keeps freed blocks in its arenas otherwise, and the process grew by each step's peak (5.3 GB
    resident by the chat step)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the memory is reused by the next step anyway
        pass


def resident_mb() -> float | None:
    """This process's resident memory in MB (Linux), to show that each step gives its memory back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def classify_step(demo: Demo) -> dict:
    """LoRA, then full fine-tuning, on 好评/差评; each evaluated once on the whole held-out 20 %."""
    from clmtune.config import ADAPTER_KEYS, PeftSettings, load_config
    from clmtune.workflows import train_and_evaluate

    print("== classification: ChnSentiCorp_htl_all, 80/20 split (seed 123), LoRA then full fine-tuning ==",
          flush=True)
    results = {}
    for method, steps in (("lora", demo.args.classify_steps), ("full", demo.args.full_steps)):
        t0, c0 = time.perf_counter(), time.process_time()
        # full fine-tuning uses none of the config's LoRA keys (r, target_modules); its learning rate is the
        # per-method default (train.learning_rate: auto -> 3e-4 for full, 1e-3 for LoRA on this model)
        no_adapter = {k: getattr(PeftSettings(), k) for k in ADAPTER_KEYS} if method == "full" else {}
        cfg = load_config(ROOT / "configs" / "chnsenticorp_classify.yaml", {
            "model": {"name_or_path": demo.args.model},
            "peft": {"method": method, **no_adapter},
            "train": {"output_dir": str(demo.out / f"classify-{method}"), "overwrite": True, "max_steps": steps,
                      **NO_EVAL_DURING_TRAINING}})
        done = train_and_evaluate(cfg)
        res, metrics = done.train, done.metrics
        support = [c["support"] for c in metrics["per_class"].values()]
        majority = max(support) / sum(support)  # accuracy of always answering the most frequent label
        demo.rows.append((f"classify 好评/差评 ({method})", f"{res.steps} steps", "accuracy", metrics["accuracy"],
                          time.perf_counter() - t0, time.process_time() - c0))
        demo.rows.append(("", "", "macro-F1", metrics["macro_f1"], None, None))
        print(f"{method}: held-out accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
              f"({metrics.get('examples', sum(support))} reviews)", flush=True)
        demo.runs.append(res.output_dir)
        results[method] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "steps": res.steps}
        del done, res
        release()
    demo.rows.append(("", "", "majority class", majority, None, None))
    return {**results, "majority": majority}


def lm_step(demo: Demo) -> dict:
    """LoRA LM fine-tuning on the reviews: held-out perplexity before (the untrained model) and after, then
    top-k samples from the fine-tuned model."""
    import torch

    from clmtune.config import load_config
    from clmtune.data import prepare_data
    from clmtune.evaluate import perplexity
    from clmtune.generate import generate
    from clmtune.inference import for_inference
    from clmtune.run import RunDir
    from clmtune.workflows import train_and_evaluate

    print("== LoRA language-model fine-tuning on the hotel reviews ==", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = load_config(ROOT / "configs" / "chnsenticorp_lm.yaml", {
        "model": {"name_or_path": demo.args.model},
        "train": {"output_dir": str(demo.out / "lm"), "overwrite": True, "max_steps": demo.args.lm_steps,
                  **NO_EVAL_DURING_TRAINING}})
    tok = demo.base_tokenizer()
    held_out = prepare_data(tok, cfg.data, progress=False).eval
    feats = [{"input_ids": i, "labels": lab} for i, lab in zip(held_out["input_ids"], held_out["labels"])]
    # the same held-out blocks, batch size and precision as the evaluation after training (clmtune eval)
    before = perplexity(demo.base_model(), feats, tok.pad_token_id, batch_size=cfg.eval.batch_size, progress=True)
    done = train_and_evaluate(cfg)
    res, after = done.train, done.metrics
    demo.rows.append(("hotel-review LM (LoRA)", f"{res.steps} steps", "ppl before", before["perplexity"], None, None))
    print(f"held-out perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
          f"({after['tokens']} tokens)", flush=True)

    run = RunDir(res.output_dir)
    run_cfg = run.load_config()
    model, tok = run.load_model(cfg=run_cfg)
    model, _, _ = for_inference(model, run_cfg.generate.dtype)
    settings = dataclasses.replace(run_cfg.generate, max_new_tokens=48, top_k=10, temperature=1.0, seed=0)
    with torch.no_grad():
        gens = generate(model, tok, PROMPTS, settings)
    print("\ngeneration (top-k 10, temperature 1.0, seed 0):")
    for g in gens:
        print(f"  {g.prompt} | {g.outputs[0]}")
    demo.rows.append(("", "", "ppl after", after["perplexity"], time.perf_counter() - t0, time.process_time() - c0))
    demo.runs.append(res.output_dir)
    return {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "tokens": after["tokens"], "generations": [{"prompt": g.prompt, "output": g.outputs[0]} for g in gens]}


def ask(session, question: str) -> str:
    """A one-turn reply (the session's history is cleared first)."""
    session.reset()
    return session.send(question)


def chat_step(demo: Demo) -> dict:
    """Full fine-tuning on chatterbot-zh (configs/chat_zh.yaml, --chat-steps steps): the replies to two held-out
    questions before and after, the held-out assistant-token loss and reply ROUGE-L."""
    from clmtune.chat import ChatSession
    from clmtune.chat_templates import install_chat_template
    from clmtune.config import load_config
    from clmtune.data import load_task
    from clmtune.inference import for_inference
    from clmtune.run import RunDir
    from clmtune.workflows import train_and_evaluate

    print("\n== chat fine-tuning on the chatterbot-zh conversations (full fine-tuning, zh template) ==", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = load_config(ROOT / "configs" / "chat_zh.yaml", {
        "model": {"name_or_path": demo.args.model},
        "train": {"output_dir": str(demo.out / "chat"), "overwrite": True, "max_steps": demo.args.chat_steps,
                  **NO_EVAL_DURING_TRAINING}})
    greedy = dataclasses.replace(cfg.generate, temperature=0.0, max_new_tokens=24)
    questions = [e.prompt for e in load_task(cfg.data).eval[:2]]  # held out: never trained on
    base_tok = demo.base_tokenizer()
    install_chat_template(base_tok, cfg.data.chat_template)
    before_replies = [ask(ChatSession(demo.base_model(), base_tok, greedy), q) for q in questions]
    done = train_and_evaluate(cfg)
    res, chat_metrics = done.train, done.metrics
    run = RunDir(res.output_dir)
    model, tok = run.load_model(cfg=run.load_config())
    model, _, _ = for_inference(model, cfg.generate.dtype)
    tuned = ChatSession(model, tok, greedy)  # the template comes from the run's saved tokenizer
    after_replies = [ask(tuned, q) for q in questions]
    demo.rows.append(("chatterbot-zh chat (full)", f"{res.steps} steps", "asst. loss", chat_metrics["loss"], None,
                      None))
    demo.rows.append(("", "", "ROUGE-L x100", chat_metrics["replies"]["rouge_l"], time.perf_counter() - t0,
                      time.process_time() - c0))
    print(f"held-out assistant-token loss {chat_metrics['loss']:.3f} (perplexity {chat_metrics['perplexity']:.1f}), "
          f"reply ROUGE-L {chat_metrics['replies']['rouge_l']:.1f}, BLEU-4 {chat_metrics['replies']['bleu4']:.1f}")
    print("\nheld-out questions (greedy, repetition penalty %.1f): before -> after fine-tuning" %
          greedy.repetition_penalty)
    for q, b, a in zip(questions, before_replies, after_replies):
        print(f"  用户：{q}\n    before: {b or '(empty)'}\n    after:  {a or '(empty)'}")
    demo.runs.append(res.output_dir)
    return {"loss": chat_metrics["loss"], "rouge_l": chat_metrics["replies"]["rouge_l"],
            "replies": [{"question": q, "before": b, "after": a}
                        for q, b, a in zip(questions, before_replies, after_replies)]}


def preference_step(demo: Demo) -> dict:
    """DPO of the review LM just trained (step "lm") towards positive reviews: the share of sampled reviews that
    a TF-IDF sentiment classifier rates 好评, before and after, and the held-out reward accuracy
    (scripts/preference_demo.py; its own command samples 200 reviews and trains longer)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from preference_demo import preference_step as dpo_step

    lm_run = demo.out / "lm"
    if not (lm_run / "config.yaml").is_file():
        raise SystemExit(f"the preference step starts from the LM run {lm_run}: run the 'lm' step first")
    print("== DPO of the review LM towards positive reviews (shipped ChnSentiCorp pairs) ==", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    res = dpo_step(lm_run, demo.out / "preference", steps=demo.args.preference_steps,
                   samples=demo.args.preference_samples)
    print(f"sampled reviews rated 好评: {res['share_positive_before']:.0%} -> {res['share_positive_after']:.0%} "
          f"({res['samples']} samples); held-out reward accuracy {res['held_out_reward_accuracy']:.3f} "
          f"({res['held_out_pairs']} pairs)", flush=True)
    demo.rows.append(("DPO towards 好评 (LoRA)", f"{res['dpo_steps']} steps", "好评 share before",
                      res["share_positive_before"], None, None))
    demo.rows.append(("", "", "好评 share after", res["share_positive_after"], None, None))
    demo.rows.append(("", "", "reward accuracy", res["held_out_reward_accuracy"], time.perf_counter() - t0,
                      time.process_time() - c0))
    demo.runs.append(demo.out / "preference" / "dpo")
    return {k: v for k, v in res.items() if not k.startswith("examples")}


# The demo's steps, in order: (name in summary.json, function). A new step is one function and one entry here.
STEPS: list[tuple[str, Callable[[Demo], dict]]] = [
    ("classify", classify_step),
    ("lm", lm_step),
    ("preference", preference_step),
    ("chat", chat_step),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for the runs, summary.json and report.html")
    ap.add_argument("--model", default="builtin:gpt2-zh-small")
    ap.add_argument("--classify-steps", type=int, default=150, help="LoRA steps of 16 reviews (1 epoch = 389)")
    ap.add_argument("--full-steps", type=int, default=150, help="full fine-tuning steps of 16 reviews")
    ap.add_argument("--lm-steps", type=int, default=120, help="LoRA steps of 8 blocks of 128 tokens")
    ap.add_argument("--chat-steps", type=int, default=36, help="full fine-tuning steps of 16 conversations "
                                                              "(1 epoch = 24)")
    ap.add_argument("--preference-steps", type=int, default=40, help="DPO steps of 8 review pairs")
    ap.add_argument("--preference-samples", type=int, default=100,
                    help="reviews sampled before and after DPO to measure the share rated 好评")
    ap.add_argument("--only", nargs="+", choices=[name for name, _ in STEPS], help="run only these steps")
    args = ap.parse_args()

    from clmtune.console import setup_console
    from clmtune.device import describe_cpu
    from clmtune.report import write_report
    from clmtune.text import format_table

    setup_console()
    demo = Demo(args=args, out=Path(args.out))
    load_before = os.getloadavg()
    t_all, c_all = time.perf_counter(), time.process_time()
    steps = {}
    for name, step in STEPS:
        if not args.only or name in args.only:
            t0 = time.perf_counter()
            steps[name] = {**step(demo), "seconds": round(time.perf_counter() - t0, 1)}
            release()  # the step's models went with its frame
            steps[name]["resident_mb_after"] = resident_mb()
    demo._base = None
    release()

    total, cpu = time.perf_counter() - t_all, time.process_time() - c_all
    table = [(name, steps_, metric, f"{value:.4f}", "" if secs is None else f"{secs:.0f}s",
              "" if cpus is None else f"{cpus:.0f}s")
             for name, steps_, metric, value, secs, cpus in demo.rows]
    table.append(("total", "", "", "", f"{total:.0f}s", f"{cpu:.0f}s"))
    print("\n" + format_table(("step", "training", "metric", "value", "wall", "CPU"), table, align="<<<>>>"))
    machine = {"cpu": describe_cpu(), "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    print(f"{machine['cpu']}; load average before {machine['load_average_before'][0]}, after "
          f"{machine['load_average_after'][0]} (the timings double on a busy machine)")
    summary = {"model": args.model, "machine": machine, "seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
               "rows": [dict(zip(("step", "training", "metric", "value", "seconds", "cpu_seconds"), r))
                        for r in demo.rows], "steps": steps}
    demo.out.mkdir(parents=True, exist_ok=True)
    (demo.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    report = write_report(demo.runs, demo.out / "report.html")
    print(f"demo finished: runs, metrics and generations are in {demo.out}/ (summary.json)\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
