"""`make demo`: what fine-tuning the shipped pretrained Chinese GPT-2 (builtin:gpt2-zh-small) does, on real data.

    python scripts/demo.py [--out runs/demo] [--classify-steps N] [--lm-steps N]

1. Classification on ChnSentiCorp_htl_all.csv (好评/差评, 80/20 split, seed 123), LoRA and then full fine-tuning:
   accuracy and macro-F1 on the held-out 20 %, against the majority class (LoRA covers the character embedding
   too: without it this small model's adapter stays near the majority class; see the model card).
2. LoRA language-model fine-tuning on the hotel reviews: perplexity of the held-out 10 % before and after, then
   top-k sampling from 早餐太差，无论去多少人 and two more prompts.
3. Chat fine-tuning on the chatterbot-zh conversations (configs/chat_zh.yaml, capped at --chat-steps): the
   replies to two held-out questions before and after, the held-out assistant-token loss and reply ROUGE-L.
4. A summary table (also in OUT/summary.json) and OUT/report.html (curves, metrics, wrong predictions; each run
   also has its own loss.png).

Training is capped (train.max_steps) so the whole demo stays near ~10-15 minutes on 2 CPU cores; the configs in
configs/ train for full epochs. Everything goes through clmtune's own stage functions (train, evaluate, generate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["早餐太差，无论去多少人", "房间很干净，服务员", "这家酒店的位置"]


def chat_step(model_name: str, out: Path, steps: int, rows: list) -> list[dict]:
    """Full fine-tuning on chatterbot-zh (configs/chat_zh.yaml, ``steps`` steps): the replies to two held-out
    questions before and after, the held-out assistant-token loss and reply ROUGE-L (appended to ``rows``)."""
    import dataclasses

    from clmtune.chat import ChatSession
    from clmtune.chat_templates import install_chat_template
    from clmtune.config import load_config
    from clmtune.data import load_task
    from clmtune.models import load_model, load_tokenizer
    from clmtune.run import RunDir
    from clmtune.workflows import train_and_evaluate

    print("\n== 3/3 chat fine-tuning on the chatterbot-zh conversations (full fine-tuning, zh template) ==",
          flush=True)
    t0 = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "chat_zh.yaml", {
        "model": {"name_or_path": model_name},
        "train": {"output_dir": str(out / "chat"), "overwrite": True, "max_steps": steps}})
    greedy = dataclasses.replace(cfg.generate, temperature=0.0, max_new_tokens=24)
    questions = [e.prompt for e in load_task(cfg.data).eval[:2]]  # held out: never trained on
    base_tok = load_tokenizer(cfg.model)
    install_chat_template(base_tok, cfg.data.chat_template)
    base = ChatSession(load_model(cfg.model).eval(), base_tok, greedy)
    before_replies = [ask(base, q) for q in questions]
    done = train_and_evaluate(cfg)
    res, chat_metrics = done.train, done.metrics
    run = RunDir(res.output_dir)
    model, tok = run.load_model(cfg=run.load_config())
    tuned = ChatSession(model, tok, greedy)  # the template comes from the run's saved tokenizer
    after_replies = [ask(tuned, q) for q in questions]
    rows.append(("chatterbot-zh chat (full)", f"{res.steps} steps", "asst. loss", chat_metrics["loss"], None))
    rows.append(("", "", "ROUGE-L x100", chat_metrics["replies"]["rouge_l"], time.perf_counter() - t0))
    print(f"held-out assistant-token loss {chat_metrics['loss']:.3f} (perplexity {chat_metrics['perplexity']:.1f}), "
          f"reply ROUGE-L {chat_metrics['replies']['rouge_l']:.1f}, BLEU-4 {chat_metrics['replies']['bleu4']:.1f}")
    print("\nheld-out questions (greedy, repetition penalty %.1f): before -> after fine-tuning" %
          greedy.repetition_penalty)
    for q, b, a in zip(questions, before_replies, after_replies):
        print(f"  用户：{q}\n    before: {b or '(empty)'}\n    after:  {a or '(empty)'}")

    return [{"question": q, "before": b, "after": a} for q, b, a in zip(questions, before_replies, after_replies)]


def ask(session, question: str) -> str:
    """A one-turn reply (the session's history is cleared first)."""
    session.reset()
    return session.send(question)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for the two runs and summary.json")
    ap.add_argument("--model", default="builtin:gpt2-zh-small")
    ap.add_argument("--classify-steps", type=int, default=150, help="LoRA steps of 16 reviews (1 epoch = 389)")
    ap.add_argument("--full-steps", type=int, default=150, help="full fine-tuning steps of 16 reviews")
    ap.add_argument("--lm-steps", type=int, default=120, help="LoRA steps of 8 blocks of 128 tokens")
    ap.add_argument("--chat-steps", type=int, default=36, help="full fine-tuning steps of 16 conversations "
                                                              "(1 epoch = 24)")
    args = ap.parse_args()

    import torch

    from clmtune.config import ADAPTER_KEYS, PeftSettings, load_config
    from clmtune.console import setup_console
    from clmtune.text import format_table
    from clmtune.data import prepare_data
    from clmtune.evaluate import perplexity
    from clmtune.generate import generate
    from clmtune.models import load_model, load_tokenizer
    from clmtune.run import RunDir
    from clmtune.workflows import train_and_evaluate

    setup_console()
    out = Path(args.out)
    rows, t_all = [], time.perf_counter()

    # 1. classification ---------------------------------------------------------------------------------------
    print("== 1/3 classification: ChnSentiCorp_htl_all, 80/20 split (seed 123), LoRA then full fine-tuning ==",
          flush=True)
    for method, steps in (("lora", args.classify_steps), ("full", args.full_steps)):
        t0 = time.perf_counter()
        # full fine-tuning uses none of the config's LoRA keys (r, target_modules); its learning rate is the
        # per-method default (train.learning_rate: auto -> 3e-4 for full, 2e-3 for LoRA)
        no_adapter = {k: getattr(PeftSettings(), k) for k in ADAPTER_KEYS} if method == "full" else {}
        cfg = load_config(ROOT / "configs" / "chnsenticorp_classify.yaml", {
            "model": {"name_or_path": args.model},
            "peft": {"method": method, **no_adapter},
            "train": {"output_dir": str(out / f"classify-{method}"), "overwrite": True, "max_steps": steps,
                      "eval_steps": 75, "eval_max_rows": 200}})  # curves of held-out loss/accuracy
        done = train_and_evaluate(cfg)
        res, metrics = done.train, done.metrics
        support = [c["support"] for c in metrics["per_class"].values()]
        majority = max(support) / sum(support)  # accuracy of always answering the most frequent label
        rows.append((f"classify 好评/差评 ({method})", f"{res.steps} steps", "accuracy", metrics["accuracy"],
                     time.perf_counter() - t0))
        rows.append(("", "", "macro-F1", metrics["macro_f1"], None))
        print(f"{method}: held-out accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
              flush=True)
    rows.append(("", "", "majority class", majority, None))

    # 2. LM fine-tuning + generation -----------------------------------------------------------------------------
    print("== 2/3 LoRA language-model fine-tuning on the hotel reviews ==", flush=True)
    t0 = time.perf_counter()
    cfg = load_config(ROOT / "configs" / "chnsenticorp_lm.yaml", {
        "model": {"name_or_path": args.model},
        "train": {"output_dir": str(out / "lm"), "overwrite": True, "max_steps": args.lm_steps,
                  "eval_steps": 60, "eval_max_rows": 64}})
    tok = load_tokenizer(cfg.model)
    held_out = prepare_data(tok, cfg.data, progress=False).eval
    feats = [{"input_ids": i, "labels": lab} for i, lab in zip(held_out["input_ids"], held_out["labels"])]
    before = perplexity(load_model(cfg.model), feats, tok.pad_token_id, batch_size=16, progress=True)
    done = train_and_evaluate(cfg)
    res, after = done.train, done.metrics
    rows.append(("hotel-review LM (LoRA)", f"{res.steps} steps", "ppl before", before["perplexity"], None))
    rows.append(("", "", "ppl after", after["perplexity"], time.perf_counter() - t0))
    print(f"held-out perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
          f"({after['tokens']} tokens)", flush=True)

    run = RunDir(res.output_dir)
    run_cfg = run.load_config()
    model, tok = run.load_model(cfg=run_cfg)
    settings = dataclasses.replace(run_cfg.generate, max_new_tokens=48, top_k=10, temperature=1.0, seed=0)
    with torch.no_grad():
        gens = generate(model, tok, PROMPTS, settings)
    print("\ngeneration (top-k 10, temperature 1.0, seed 0):")
    for g in gens:
        print(f"  {g.prompt} | {g.outputs[0]}")

    # 3. chat fine-tuning -----------------------------------------------------------------------------------------
    chat = chat_step(args.model, out, args.chat_steps, rows)

    # summary --------------------------------------------------------------------------------------------------
    total = time.perf_counter() - t_all
    table = [(name, steps, metric, f"{value:.4f}", "" if secs is None else f"{secs:.0f}s")
             for name, steps, metric, value, secs in rows] + [("total", "", "", "", f"{total:.0f}s")]
    print("\n" + format_table(("step", "training", "metric", "value", "time"), table, align="<<<>>"))
    summary = {"model": args.model, "rows": [dict(zip(("step", "training", "metric", "value", "seconds"), r))
                                             for r in rows],
               "generations": [{"prompt": g.prompt, "output": g.outputs[0]} for g in gens],
               "chat": chat, "seconds": total}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    from clmtune.report import write_report

    report = write_report([out / name for name in ("classify-lora", "classify-full", "lm", "chat")], out / "report.html")
    print(f"demo finished: runs, metrics and generations are in {out}/ (summary.json)\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
