"""A tiny chat run for the chat tests: 12 chatterbot-zh conversations, the tiny GPT-2 with the BERT character
vocabulary, full fine-tuning, the built-in ``zh`` template (saved with the run's tokenizer). The finished run is the
session fixture ``chat_run`` (conftest.py): trained once, shared by every test that only reads it."""

from __future__ import annotations

import json
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def chat_file(tmp_path: Path, n: int = 12) -> Path:
    src = REPO / "src/clmtune/assets/chat/chatterbot-zh/train.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines()
    multi = [x for x in lines if len(json.loads(x)["messages"]) in (4, 6)][:2]  # two multi-turn conversations
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines[:n - len(multi)] + multi) + "\n", encoding="utf-8")
    return path


def chat_cfg(tmp_path: Path, out: str = "run", **train):
    from clmtune.config import load_config

    return load_config(REPO / "configs" / "chat_zh.yaml", {
        "data": {"source": str(chat_file(tmp_path)), "eval_fraction": 0.25, "max_length": 64},
        "model": {"name_or_path": "builtin:tiny-gpt2-zh"},
        "train": {"output_dir": str(tmp_path / out), "batch_size": 4, "learning_rate": 3e-3, "epochs": 30,
                  "seed": 7, **train},
        "generate": {"max_new_tokens": 8}})


def train_chat_run(tmp: Path) -> Path:
    """Train the tiny chat run into ``tmp/run`` (the session fixture ``chat_run`` in conftest.py does this once)."""
    import torch

    from clmtune.train import train

    torch.set_num_threads(1)
    train(chat_cfg(tmp).validate(), progress=False)
    return tmp / "run"
