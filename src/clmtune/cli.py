"""Command line: a thin map from arguments to the stage functions. Only this module parses arguments and
decides exit codes: 0 success, 2 a user error (one line on stderr; ``--debug`` shows the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``_generate_settings`` reads, shared by ``generate`` and ``chat``."""
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy decoding")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off; default 10)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (1 = off)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same output)")
    p.add_argument("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:N or mps")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clmtune", description=__doc__.split(".")[0] + ".")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune an adapter (and evaluate on the held-out split)",
                       description="Train with a YAML config (embedded defaults when none is given). "
                                   "Override any key with --section.key VALUE, e.g. --train.epochs 5.")
    t.add_argument("--config", help="YAML config file (see configs/)")
    t.add_argument("--output-dir", help="shortcut for --train.output_dir")
    t.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    t.add_argument("--no-eval", action="store_true", help="skip evaluation after training")
    t.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue an interrupted run: alone, from the latest checkpoint in the output folder; "
                        "or from the checkpoint folder given (RUN/checkpoints/step-NNNNNN)")
    t.add_argument("--deepspeed", metavar="FILE", help="shortcut for --train.deepspeed FILE (a DeepSpeed JSON "
                                                        "config, see configs/deepspeed/)")

    r = sub.add_parser("prepare", help="load, filter, split and tokenize the data; print a summary",
                       description="Check a config's data in seconds: rows read/dropped/truncated per split, label "
                                   "counts, token lengths, pad/end tokens. Override keys with --section.key VALUE.")
    r.add_argument("--config", help="YAML config file (see configs/)")
    r.add_argument("--save", help="write the tokenized splits (Arrow) here; train reuses them with "
                                  "--data.prepared DIR")
    r.add_argument("--overwrite", action="store_true", help="replace the --save folder if it is not empty")
    r.add_argument("--json", action="store_true", help="print the full report as JSON instead of the table")

    e = sub.add_parser("eval", help="evaluate a trained run; write eval.json and predictions.csv")
    e.add_argument("--run", required=True, help="run folder written by `clmtune train`")
    e.add_argument("--split", default="eval", choices=["eval", "test"],
                   help="held-out labelled split (eval) or the unlabelled test file (test -> RAFT ID,Label)")
    e.add_argument("--data", help="evaluate on this file instead (labelled if it has the label column)")
    e.add_argument("--method", choices=["auto", "rank", "constrained", "generate"],
                   help="override the run's eval.method (auto: rank, or constrained for a big label tree)")
    e.add_argument("--dtype", choices=["auto", "fp32", "bf16"], help="override the run's eval.dtype (default auto: "
                   "bf16 where the hardware has native bf16 matrix units, else fp32; fp32: bit-reproducible)")
    e.add_argument("--out", help="folder for eval.json and predictions.csv")
    e.add_argument("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:N or mps; "
                                    "default: the run's eval.device")

    g = sub.add_parser("generate", help="continue prompts with a run (base + adapter) or a model folder",
                       description="Continue one prompt, several prompts, or a file of prompts. Sampling defaults "
                                   "come from the run's generate section (with --run) or clmtune's defaults.")
    g.add_argument("prompts", nargs="*", help="prompt text(s)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by `clmtune train`")
    src.add_argument("--model", help="plain or merged model folder (or a run folder), hub id, or builtin:NAME")
    g.add_argument("--prompts-file", help="prompts, one per line; or a CSV/TSV/JSONL file with --column")
    g.add_argument("--column", help="column of --prompts-file that holds the prompts")
    g.add_argument("--output", help="write one JSON line per prompt to this .jsonl file")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    _sampling_flags(g)
    g.add_argument("--num-return-sequences", type=int)
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); it is not printed")
    g.add_argument("--batch-size", type=int, help="prompts per batch (left-padded)")
    g.add_argument("--dtype", help="auto (bf16 where the CPU/GPU has native bf16 matrix units, else fp32), "
                                   "bf16 or fp32; default: generate.dtype (auto)")
    g.add_argument("--no-truncate", action="store_true",
                   help="error on a prompt longer than the model's context instead of keeping its end")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")

    c = sub.add_parser("chat", help="talk to a chat run (or a model with a chat template) in the terminal",
                       description="A multi-turn conversation rendered with the run's chat template; replies are "
                                   "streamed. Commands: /reset, /system TEXT, /history, /exit (or Ctrl-D). "
                                   "Sampling defaults come from the run's generate section.")
    csrc = c.add_mutually_exclusive_group(required=True)
    csrc.add_argument("--run", help="run folder written by `clmtune train` (data.task: chat)")
    csrc.add_argument("--model", help="model folder (or run folder), hub id, or builtin:NAME")
    c.add_argument("--chat-template", help="chatml, alpaca, zh or a .jinja file, for a model without a template "
                                           "(a run keeps the one it was trained with)")
    c.add_argument("--system", help="system prompt to start with")
    _sampling_flags(c)

    x = sub.add_parser("export", help="export the adapter, or a merged full model")
    x.add_argument("--run", required=True)
    x.add_argument("--to", required=True, help="destination folder")
    x.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    x.add_argument("--overwrite", action="store_true")

    v = sub.add_parser("serve", help="serve a run or model over an OpenAI-compatible HTTP API, with a playground",
                       description="OpenAI-compatible /v1/completions, /v1/chat/completions, /v1/models; "
                                   "/v1/classify for classification runs; a browser playground at /. "
                                   "Needs pip install 'clmtune[serve]'.")
    vsrc = v.add_mutually_exclusive_group(required=True)
    vsrc.add_argument("--run", help="run folder written by `clmtune train`")
    vsrc.add_argument("--model", help="plain or merged model folder (or a run folder), hub id, or builtin:NAME")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=os.environ.get("CLMTUNE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $CLMTUNE_API_KEY; none: open)")
    v.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N or mps")
    v.add_argument("--max-batch", type=int, default=16, help="requests (x n) generated together in one batch")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get 429")
    v.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")

    rp = sub.add_parser("report", help="write a self-contained report.html about one or more runs",
                        description="Curves, final metrics, per-class scores, confusion matrix, wrong predictions "
                                    "with their texts, data summary, timings and config; several runs side by side.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) written by `clmtune train`")
    rp.add_argument("--out", help="HTML file to write (default: RUN/report.html; for several runs report.html "
                                  "beside the first)")
    u = sub.add_parser("ui", help="fine-tune from the browser: data, settings, live curves, runs, playground",
                       description="One local page that drives the same `clmtune train/eval/export/serve` commands "
                                   "in a workspace folder. Prints a URL with a random token; only requests with it "
                                   "are answered. Needs pip install 'clmtune[serve]'.")
    u.add_argument("--workspace", default=".", help="folder with the data, configs/ and runs/ (default: here); the "
                                                    "page cannot read or write outside it")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--upload-limit-mb", type=int, default=100, help="largest file the page accepts (MiB)")
    u.add_argument("--open", action="store_true", help="open the page in the default browser")
    return p


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.config import load_config, merge, parse_overrides
    from clmtune.run import RunDir
    from clmtune.workflows import is_main_process, train_and_evaluate

    overrides = parse_overrides(extra)
    shortcuts = {}
    if args.output_dir:
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
        _print_eval(done.metrics, done.eval_dir)
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


def _print_eval(metrics: dict, where: Path) -> None:
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

    metrics, where = evaluate_run(args.run, args.split, args.data, args.method, args.out, device=args.device,
                                  dtype=args.dtype)
    _print_eval(metrics, where)
    return 0


def _generate_settings(args: argparse.Namespace, more: dict):
    """The run's generate section (clmtune's defaults with --model) with the sampling flags the user gave."""
    import dataclasses

    from clmtune.config import GenerateConfig, RunConfig
    from clmtune.errors import ConfigError
    from clmtune.run import RunDir

    base = RunDir(args.run).load_config().generate if args.run else GenerateConfig()
    given = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
             "device": args.device, "dtype": getattr(args, "dtype", None), **more}
    settings = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    try:
        RunConfig(generate=settings).validate()
    except ConfigError as exc:  # also name the flag the user typed: "--top-p: generate.top_p=1.5 must be ..."
        flags = {f"generate.{k}=": "--" + k.replace("_", "-") for k in given}
        problems = [next((f"{flag}: {p}" for key, flag in flags.items() if p.startswith(key)), p)
                    for p in exc.problems]
        raise ConfigError(problems) from None
    return settings


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.chat import ChatSession, repl
    from clmtune.chat_templates import install_chat_template
    from clmtune.generate import load_for_generation

    settings = _generate_settings(args, {})
    model, tok = load_for_generation(args.run, args.model, settings.device)
    if args.chat_template:
        install_chat_template(tok, args.chat_template)
    elif not getattr(tok, "chat_template", None):
        raise ClmtuneError(f"{args.run or args.model} has no chat template; train it with data.task: chat, or pass "
                           "--chat-template chatml|alpaca|zh|FILE.jinja")
    repl(ChatSession(model, tok, settings, system=args.system))
    return 0


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    import dataclasses

    from clmtune.generate import generate, load_for_generation, read_prompts_file, stream, write_jsonl

    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file, args.column)
    elif args.column:
        raise ClmtuneError("--column needs --prompts-file")
    if not prompts:
        raise ClmtuneError("no prompt given; pass prompt text or --prompts-file FILE")
    if args.stream and len(prompts) != 1:
        raise ClmtuneError(f"--stream prints one prompt's continuation, got {len(prompts)} prompts; drop --stream")
    settings = _generate_settings(args, {"num_return_sequences": args.num_return_sequences, "stop": args.stop,
                                         "batch_size": args.batch_size,
                                         "truncate": False if args.no_truncate else None})
    model, tok = load_for_generation(args.run, args.model, settings.device, settings.dtype)
    if args.run:  # a chat run's prompts become user messages under its template (other tasks: as typed)
        from clmtune.run import RunDir
        from clmtune.tasks import get_task

        data_cfg = RunDir(args.run).load_config().data
        task = get_task(data_cfg.task)
        prompts = [task.format_prompt(p, data_cfg, tok) for p in prompts]
        settings = dataclasses.replace(settings, stop=list(settings.stop) + task.stop_strings(tok))
    if args.stream:
        results = [stream(model, tok, prompts[0], settings)]
    else:
        results = generate(model, tok, prompts, settings, progress=len(prompts) > settings.batch_size)
    if args.output:
        path = write_jsonl(results, args.output)
        print(f"wrote {len(results)} prompts x {settings.num_return_sequences} continuations to {path}")
    elif args.json:
        for r in results:
            print(json.dumps(dataclasses.asdict(r), ensure_ascii=False))
    elif not args.stream:
        for r in results:
            for text in r.outputs:
                print(f"{r.prompt}\u2192 {text}")
    return 0


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.export import export_run

    to = export_run(args.run, args.to, merge=args.merge, overwrite=args.overwrite)
    print(f"{'merged model' if args.merge else 'adapter'} written to {to}")
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.report import write_report

    print(f"report written to {write_report(args.runs, args.out)}")
    return 0


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.serve import serve

    for flag in ("port", "max_batch", "max_queue", "max_tokens"):
        if getattr(args, flag) < (0 if flag == "port" else 1):
            raise ClmtuneError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be positive")
    serve(args.run, args.model, host=args.host, port=args.port, api_key=args.api_key or None, device=args.device,
          limits={"max_batch": args.max_batch, "max_queue": args.max_queue, "max_tokens": args.max_tokens})
    return 0


def cmd_ui(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.ui import serve_ui

    if not 0 < args.port < 65536:
        raise ClmtuneError(f"--port {args.port} must be between 1 and 65535")
    if args.upload_limit_mb < 1:
        raise ClmtuneError(f"--upload-limit-mb {args.upload_limit_mb} must be at least 1")
    serve_ui(args.workspace, host=args.host, port=args.port, open_browser=args.open,
             upload_limit_mb=args.upload_limit_mb)
    return 0


COMMANDS = {"train": cmd_train, "prepare": cmd_prepare, "eval": cmd_eval, "generate": cmd_generate, "chat": cmd_chat,
            "export": cmd_export, "serve": cmd_serve, "report": cmd_report,
            "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "prepare"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "prepare":  # tokenizing is all prepare does: let the fast tokenizer use every core
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from clmtune.console import setup_console

    setup_console(args.debug)
    try:
        return COMMANDS[args.command](args, extra)
    except ClmtuneError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"clmtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clmtune: interrupted", file=sys.stderr)
        return 130
