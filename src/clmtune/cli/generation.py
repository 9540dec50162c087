"""``clmtune generate`` and ``chat``: their arguments (the sampling flags they share) and what each runs."""

from __future__ import annotations

import argparse
import json

from clmtune.cli.command import Command
from clmtune.errors import ClmtuneError


def sampling_flags(p: argparse.ArgumentParser) -> None:
    """The flags ``generate_settings`` reads, shared by ``generate`` and ``chat``."""
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy decoding")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off; default 10)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1] (1 = off)")
    p.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same output)")
    p.add_argument("--device", help="auto (the GPU when there is one), cpu, cuda, cuda:N or mps")


def add_generate(sub) -> argparse.ArgumentParser:
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
    sampling_flags(g)
    g.add_argument("--num-return-sequences", type=int)
    g.add_argument("--stop", action="append", help="stop at this string (repeatable); it is not printed")
    g.add_argument("--batch-size", type=int, help="prompts per batch (left-padded)")
    g.add_argument("--dtype", help="auto (bf16 where the CPU/GPU has native bf16 matrix units, else fp32), "
                                   "bf16 or fp32; default: generate.dtype (auto)")
    g.add_argument("--no-truncate", action="store_true",
                   help="error on a prompt longer than the model's context instead of keeping its end")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return g


def add_chat(sub) -> argparse.ArgumentParser:
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
    sampling_flags(c)
    return c


def generate_settings(args: argparse.Namespace, more: dict):
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

    settings = generate_settings(args, {})
    model, tok = load_for_generation(args.run, args.model, settings.device, settings.dtype)  # as `generate`
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
    settings = generate_settings(args, {"num_return_sequences": args.num_return_sequences, "stop": args.stop,
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


COMMANDS = [Command("generate", add_generate, cmd_generate), Command("chat", add_chat, cmd_chat)]
