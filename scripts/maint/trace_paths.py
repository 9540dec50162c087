"""Trace the path of one chat run from file to loss, and of one evaluation from run folder to files: which clmtune
modules run, how often the data file is opened, and how many texts go through the tokenizer (issue 25, item 9).

    python scripts/maint/trace_paths.py OUT_DIR            # this checkout
    PYTHONPATH=/tmp/old/src python scripts/maint/trace_paths.py OUT_DIR   # another commit's source, same venv

Each stage runs in a child process (an audit hook cannot be removed): ``train`` with one optimizer step and no
in-training evaluation, then ``eval`` of that run. Writes ``OUT_DIR/trace.json`` and prints a summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child(stage: str, data: str, run: str, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    import clmtune
    from transformers import PreTrainedTokenizerBase

    src = str(Path(clmtune.__file__).resolve().parent)
    data_path = str(Path(data).resolve())
    opens = []

    def where() -> str:  # the innermost clmtune function that opened the file
        f = sys._getframe(1)
        while f is not None and not f.f_code.co_filename.startswith(src):
            f = f.f_back
        return f"{os.path.relpath(f.f_code.co_filename, src)}:{f.f_code.co_name}" if f else "?"

    def audit(ev, args):
        if ev == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) \
                and os.path.realpath(os.fsdecode(args[0])) == data_path:
            opens.append(where())
    sys.addaudithook(audit)
    modules: dict[str, int] = {}
    lookups: dict[str, int] = {}

    def importing(frame) -> bool:  # run by a clmtune module's import (class bodies, registrations), not by the path
        while frame is not None:
            if frame.f_code.co_name == "<module>" and frame.f_code.co_filename.startswith(src):
                return True
            frame = frame.f_back
        return False

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_name != "<module>":  # code that runs, not modules imported
            f = frame.f_code.co_filename
            if f.startswith(src) and not importing(frame):
                name = "clmtune." + os.path.relpath(f, src)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                modules.setdefault(name, len(modules))
                if frame.f_code.co_name in ("get_task", "load_task"):  # the task looked up, the data loaded
                    caller = frame.f_back
                    key = f"{frame.f_code.co_name} <- {os.path.relpath(caller.f_code.co_filename, src)}:{caller.f_code.co_name}"
                    lookups[key] = lookups.get(key, 0) + 1

    texts = {"calls": 0, "texts": 0, "by": {}}
    depth = [0]

    def counted(fn):
        def wrapper(self, *a, **k):
            if depth[0] == 0:
                texts["calls"] += 1
                texts["by"][where()] = texts["by"].get(where(), 0) + 1
                first = a[0] if a else (k.get("text") or k.get("conversation"))
                texts["texts"] += len(first) if isinstance(first, (list, tuple)) and first and not isinstance(first[0], (dict, int)) else 1
            depth[0] += 1
            try:
                return fn(self, *a, **k)
            finally:
                depth[0] -= 1
        return wrapper

    for name in ("__call__", "encode", "apply_chat_template"):
        setattr(PreTrainedTokenizerBase, name, counted(getattr(PreTrainedTokenizerBase, name)))
    from clmtune.cli import main

    if stage == "train":
        argv = ["train", "--config", str(REPO / "configs/chat_zh.yaml"), "--data.source", data,
                "--model.name_or_path", "builtin:tiny-gpt2-zh", "--data.max_length", "64", "--train.batch_size", "4",
                "--train.max_steps", "1", "--train.output_dir", run]
    else:
        argv = ["eval", "--run", run]
    sys.setprofile(prof)
    try:
        rc = main(argv)
    finally:
        sys.setprofile(None)
    Path(out).write_text(json.dumps({"rc": rc, "modules": sorted(modules, key=modules.get),
                                     "data_opens": len(opens), "opened_by": opens, "tokenizer": texts, "lookups": lookups}, indent=1))


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = REPO / "src/clmtune/assets/chat/chatterbot-zh/train.jsonl"
    data = out / "chats.jsonl"
    data.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    run = tempfile.mkdtemp(prefix="run-", dir=out)  # a fresh folder each time: train refuses an existing run
    os.rmdir(run)
    result = {}
    for stage in ("train", "eval"):
        f = out / f"{stage}.json"
        subprocess.run([sys.executable, __file__, "--child", stage, str(data), run, str(f)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        result[stage] = json.loads(f.read_text())
        if result[stage]["rc"]:
            raise SystemExit(f"clmtune {stage} exited with {result[stage]['rc']}")
        r = result[stage]
        print(f"{stage}: {len(r['modules'])} clmtune modules, data file opened {r['data_opens']}x, "
              f"tokenizer: {r['tokenizer']['calls']} calls over {r['tokenizer']['texts']} texts (40 conversations)")
    (out / "trace.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:6])
    else:
        main()
