"""Helpers for the training tests: a 12-row slice of the shipped RAFT task and small configs.

With 12 rows and ``eval_fraction=0.25`` a run trains on 9 rows; ``batch_size=9`` makes every optimizer step see
the same batch, so the training loss must go down step after step (no shuffling noise).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from clmtune.config import DataConfig, ModelConfig, PeftSettings, RunConfig, TrainConfig
from clmtune.data import assets_path

LABELS = ["complaint", "no complaint"]
LR = {"lora": 1e-2, "ia3": 3e-2, "prefix_tuning": 3e-2, "prompt_tuning": 3e-2, "p_tuning": 3e-2, "full": 1e-3}


def twitter_rows(tmp_path: Path, n: int = 12) -> Path:
    rows = list(csv.DictReader(open(assets_path("raft/twitter_complaints/train.csv"), encoding="utf-8")))[:n]
    path = tmp_path / f"twitter{n}.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def tiny_cfg(tmp_path: Path, method: str = "lora", model: str = "builtin:tiny-opt", name: str = "run",
             peft: dict | None = None, data: dict | None = None, **train) -> RunConfig:
    data_kw = {"source": str(twitter_rows(tmp_path)), "eval_fraction": 0.25, "max_length": 48, "labels": LABELS,
               **(data or {})}
    train_kw = {"output_dir": str(tmp_path / name), "epochs": 4, "batch_size": 9, "learning_rate": LR[method],
                **train}
    return RunConfig(data=DataConfig(**data_kw), model=ModelConfig(name_or_path=model),
                     peft=PeftSettings(method=method, **(peft or {})), train=TrainConfig(**train_kw)).validate()


@pytest.fixture
def one_thread():
    """The test machine's 2 cores are shared; one intra-op thread is ~3x faster than two fighting ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def crash_training_at(monkeypatch, batch: int, cfg, train) -> None:
    """Run ``train(cfg)`` with a crash in its ``batch``-th loss computation (whichever loss path the run takes:
    ``causal_lm_loss`` or the fused ``frozen_head_loss``), then put the real loss functions back."""
    import clmtune.train.step as train_mod  # where train_window looks the loss functions up

    calls = {"n": 0}
    real = {name: getattr(train_mod, name) for name in ("causal_lm_loss", "frozen_head_loss")}

    def crashing(name):
        def loss(*args, **kw):
            calls["n"] += 1
            if calls["n"] == batch:
                raise RuntimeError("simulated crash")
            return real[name](*args, **kw)
        return loss

    for name in real:
        monkeypatch.setattr(train_mod, name, crashing(name))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False)
    for name, fn in real.items():
        monkeypatch.setattr(train_mod, name, fn)


def load_run(run_dir, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, config) of a finished run folder, in eval mode on ``device``."""
    from clmtune.run import RunDir

    run = RunDir(run_dir)
    cfg = run.load_config()
    model, tok = run.load_model(device=device, dtype=dtype, cfg=cfg)
    return model, tok, cfg
