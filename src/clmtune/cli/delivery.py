"""``clmtune export``, ``serve``, ``report`` and ``ui``: a trained run handed on (files, an HTTP API, a report, the
browser page); their arguments and what each runs."""

from __future__ import annotations

import argparse
import os

from clmtune.cli.command import Command
from clmtune.errors import ClmtuneError


def add_export(sub) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help="export the adapter, or a merged full model")
    x.add_argument("--run", required=True)
    x.add_argument("--to", required=True, help="destination folder")
    x.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier `clmtune export` folder (never a file "
                   "or a run folder)")
    return x


def add_serve(sub) -> argparse.ArgumentParser:
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
    return v


def add_report(sub) -> argparse.ArgumentParser:
    rp = sub.add_parser("report", help="write a self-contained report.html about one or more runs",
                        description="Curves, final metrics, per-class scores, confusion matrix, wrong predictions "
                                    "with their texts, data summary, timings and config; several runs side by side.")
    rp.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) written by `clmtune train`")
    rp.add_argument("--out", help="HTML file to write (default: RUN/report.html; for several runs report.html "
                                  "beside the first)")
    return rp


def add_ui(sub) -> argparse.ArgumentParser:
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
    return u


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.export import export_run

    to = export_run(args.run, args.to, merge=args.merge, overwrite=args.overwrite)
    print(f"{'merged model' if args.merge else 'adapter'} written to {to}")
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from clmtune.report import evaluation_lines, write_report

    out = write_report(args.runs, args.out)
    for line in evaluation_lines(args.runs):  # every evaluation of the index, held-out or not
        print(line)
    print(f"report written to {out}")
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


COMMANDS = [Command("export", add_export, cmd_export), Command("serve", add_serve, cmd_serve),
            Command("report", add_report, cmd_report), Command("ui", add_ui, cmd_ui)]
