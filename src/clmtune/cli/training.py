"""``clmtune train``, ``prepare`` and ``eval``: their arguments and what each runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clmtune.cli.command import Command
from clmtune.errors import ClmtuneError


def add_train(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="fine-tune an adapter (and evaluate on the held-out split)",
                       description="Train with a YAML config (embedded defaults when none is given). "
                                   "Override any key with --section.key VALUE, e.g. --train.epochs 5. "
                                   "--train.max_steps N trains exactly N optimizer steps; train.epochs is ignored "
                                   "when it is set (as in transformers' Trainer).")
    t.add_argument("--config", help="YAML config file (see configs/)")
    t.add_argument("--output-dir", help="shortcut for --train.output_dir")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    t.add_argument("--no-eval", action="store_true", help="skip evaluation after training")
    t.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue an interrupted run: alone, from the latest checkpoint in the output folder; "
                        "or from the checkpoint folder given (RUN/checkpoints/step-NNNNNN)")
    t.add_argument("--deepspeed", metavar="FILE", help="shortcut for --train.deepspeed FILE (a DeepSpeed JSON "
                                                        "config, see configs/deepspeed/)")
    return t


def add_prepare(sub) -> argparse.ArgumentParser:
    r = sub.add_parser("prepare", help="load, filter, split and tokenize the data; print a summary",
                       description="Check a config's data in seconds: rows read/dropped/truncated per split, label "
                                   "counts, token lengths, pad/end tokens. Override keys with --section.key VALUE.")
    r.add_argument("--config", help="YAML config file (see configs/)")
    r.add_argument("--save", help="write the tokenized splits (Arrow) here; train reuses them with "
                                  "--data.prepared DIR")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier `prepare --save` folder (never a file, "
                   "a run folder or the data read)")
    r.add_argument("--json", action="store_true", help="print the full report as JSON instead of the table")
    return r


def add_eval(sub) -> argparse.ArgumentParser:
    e = sub.add_parser("eval", help="evaluate a trained run; write eval.json and predictions.csv")
    e.add_argument("--run", required=True, help="run folder written by `clmtune train`")
    e.add_argument("--split", default="eval", choices=["eval", "test"],
                   help="held-out labelled split (eval) or the unlabelled test file (test -> RAFT ID,Label)")
    e.add_argument("--data", help="evaluate on this file instead (labelled if it has the label column)")
    e.add_argument("--method", choices=["auto", "rank", "constrained", "generate"],
                   help="override the run's eval.method (auto: rank, or constrained for a big label tree)")
    e.add_argument("--dtype", choices=["auto", "fp32", "bf16"], help="override the run's eval.dtype (default auto: "
                   "bf16 where the hardware has native bf16 matrix units, else fp32; fp32: bit-reproducible)")
    e.add_argument("--data.encoding", dest="data_encoding", metavar="ENCODING",
                   help="text encoding of --data FILE (default: the run's data.encoding, e.g. utf-8; gbk, utf-16)")
    e.add_argument("--data.delimiter", dest="data_delimiter", metavar="SEP",
                   help="column separator of a --data CSV/TSV file (default: the run's data.delimiter)")
    e.add_argument("--out", help="folder for eval.json and predictions.csv")
    e.add_argument("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:N or mps; "
                                    "default: the run's eval.device")
    return e


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.config import load_config, merge, parse_overrides
    from clmtune.run import RunDir
    from clmtune.workflows import is_main_process, train_and_evaluate

    overrides = parse_overrides(extra)
    shortcuts = {}
    if args.output_dir:
        given = overrides.get("train", {}).get("output_dir") if isinstance(overrides.get("train"), dict) else None
        if given is not None and str(given) != args.output_dir:
            raise ClmtuneError(f"--output-dir {args.output_dir!r} and --train.output_dir {str(given)!r} name two "
                               "folders; give one of them")
        shortcuts["output_dir"] = args.output_dir
    if args.overwrite:
        shortcuts["overwrite"] = True
    if args.deepspeed:
        shortcuts["deepspeed"] = args.deepspeed
    cfg = load_config(args.config, merge(overrides, {"train": {**overrides.get("train", {}), **shortcuts}}))

    def report(result) -> None:
        if not is_main_process():
            return  # under torchrun / accelerate launch only rank 0 reports and evaluates
        if result.resumed_from:
            print(f"resumed from {result.resumed_from}")
        print(f"trained {result.steps} steps in {result.seconds:.1f}s, loss {result.first_loss:.4f} -> "
              f"{result.final_loss:.4f}")
        if result.memory and "estimate" in result.memory:
            print(memory_line(result.memory))
        run = RunDir(result.output_dir)
        weights = run.weights(is_peft=cfg.peft.method != "full")
        summary = run.load_summary()
        if summary.get("early_stopped_at"):
            print(f"stopped early at step {summary['early_stopped_at']} (train.early_stopping_patience)")
        if best := summary.get("best"):
            print(f"kept the best weights: step {best['step']} ({best['metric']} {best['value']:.4f})")
        print(f"run folder: {run.path}\n  {weights.name + ':':<10} {weights}\n  tokenizer: {run.tokenizer}\n"
              f"  config:    {run.config_file}\n  log:       {run.log_file}")
        if run.loss_png.is_file():
            print(f"  curves:    {run.loss_png}   (clmtune report {run.path}: report.html)")

    done = train_and_evaluate(cfg, evaluate=not args.no_eval, resume=args.resume, on_trained=report)
    if done.metrics is not None:
        print_eval(done.metrics, done.eval_dir)
    return 0


def memory_line(memory: dict) -> str:
    """``train_summary.json``'s memory as one line: the estimate next to the measured peak."""
    from clmtune.memory import mib

    est = memory["estimate"]
    cpu = memory["measured"].startswith("peak resident")  # RSS holds the runtime too
    expected = est["total"] + (est["runtime"] if cpu else 0)
    return (f"memory: estimated {mib(expected)} ({mib(est['total'])} for the training step"
            + (f" + {mib(est['runtime'])} runtime" if cpu else "") + f"), measured peak {mib(memory['measured_peak'])}"
            f" ({memory['measured']})")


def cmd_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.config import load_config, parse_overrides
    from clmtune.prepare import format_summary, prepare

    cfg = load_config(args.config, parse_overrides(extra))
    result = prepare(cfg, save=args.save, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.report, indent=2, ensure_ascii=False))
    else:
        print(format_summary(result.report))
        print(result.memory.table() if result.memory is not None else result.memory_note)
        print(f"prepared in {result.seconds:.1f}s")
    if result.saved_to is not None:
        print(f"saved to {result.saved_to} (train with --data.prepared {result.saved_to})")
    return 0


def print_eval(metrics: dict, where: Path) -> None:
    from clmtune.run import EVAL_JSON, PREDICTIONS_CSV, PREDICTIONS_JSONL

    if metrics["method"] in ("perplexity", "perplexity+replies"):
        print(f"eval (perplexity, n={metrics['n']} sequences, {metrics['tokens']} scored tokens): loss "
              f"{metrics['nll_per_token']:.4f}, perplexity {metrics['perplexity']:.2f}")
        if "replies" in metrics:
            r = metrics["replies"]
            print(f"replies ({r['decoding']}, n={r['n']}): ROUGE-L {r['rouge_l']:.2f}, BLEU-4 {r['bleu4']:.2f}, "
                  f"exact match {r['exact_match']:.2f} (character level, x100)\n"
                  f"  predictions: {where / PREDICTIONS_JSONL}")
        print(f"  results:     {where / EVAL_JSON}")
        return
    if "reward_accuracy" in metrics:  # a preference run
        print(f"eval ({metrics['method']}, n={metrics['n']} pairs): reward accuracy {metrics['reward_accuracy']:.4f}, "
              f"reward margin {metrics['reward_margin']:.4f}, loss {metrics['loss']:.4f}\n"
              f"  results:     {where / EVAL_JSON}")
        return
    line = f"eval ({metrics['method']}, n={metrics['n']}):"
    if "accuracy" in metrics:
        line += f" accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f},"
    line += f" invalid {metrics['invalid']}"
    if "mapped_to_nearest_label" in metrics:
        mapped = metrics["mapped_to_nearest_label"]
        line += f" (mapped to the nearest label: accuracy {mapped['accuracy']:.4f}, macro-F1 {mapped['macro_f1']:.4f})"
    print(f"{line}; {metrics['examples_per_s']:.1f} examples/s")
    print(f"  results:     {where / EVAL_JSON}\n  predictions: {where / PREDICTIONS_CSV}")
    if "confusion_matrix_png" in metrics.get("files", {}):
        print(f"  confusion:   {where / metrics['files']['confusion_matrix_png']}")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.evaluate import evaluate_run

    reading = {k: v for k, v in (("encoding", args.data_encoding), ("delimiter", args.data_delimiter)) if v}
    if reading and not args.data:
        raise ClmtuneError(f"--data.{next(iter(reading))} is about reading --data FILE; give --data FILE (the run's "
                           "own splits are read as in training)")
    metrics, where = evaluate_run(args.run, args.split, args.data, args.method, args.out, device=args.device,
                                  dtype=args.dtype, data_reading=reading)
    print_eval(metrics, where)
    return 0


COMMANDS = [Command("train", add_train, cmd_train, overrides=True),
            Command("prepare", add_prepare, cmd_prepare, overrides=True),
            Command("eval", add_eval, cmd_eval)]
