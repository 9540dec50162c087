"""Shared fixtures. Tests run on CPU with tiny models built from configs and the real tokenizer/data files."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from browser import launched
from tinyrun import one_thread  # noqa: F401  (one fixture for every test module that asks for it)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # ../shared beside the checkout (CI has it too)


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Built-in models are cached in a per-session folder, not in the user's ~/.cache."""
    os.environ["CLMTUNE_HOME"] = str(tmp_path_factory.mktemp("clmtune_home"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} not found")
    return SHARED


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """8 tweets, 40 LoRA steps: small enough to overfit, fast enough for every test run."""
    from clmtune.config import load_config
    from clmtune.train import train

    tmp = tmp_path_factory.mktemp("run")
    with open(REPO / "src/clmtune/assets/raft/twitter_complaints/train.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:8]
    data = tmp / "tweets.csv"
    with open(data, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=rows[0].keys())
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(overrides={
        "data": {"source": str(data), "eval_fraction": 0.0, "labels": ["complaint", "no complaint"], "max_length": 64},
        "model": {"name_or_path": "builtin:tiny-opt"},
        "train": {"output_dir": str(tmp / "out"), "max_steps": 40, "epochs": 40, "batch_size": 8,
                  "learning_rate": 1e-2, "seed": 7}})
    result = train(cfg, progress=False)
    return cfg, result


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory):
    """(run folder, CLMTUNE_HOME) of a finished tiny chat run (tests/chatrun.py), trained once per test session."""
    from chatrun import train_chat_run

    return train_chat_run(tmp_path_factory.mktemp("chatrun")), os.environ["CLMTUNE_HOME"]


@pytest.fixture(scope="module")
def browser():
    """Headless chromium, one per test module that drives a page."""
    with launched() as b:
        yield b
