"""Two data-parallel processes on CPU (torchrun, gloo) run the same `clmtune train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tinyrun import twitter_rows

from clmtune.config import ModelConfig
from clmtune.models import builtin_model_path, load_model

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    builtin_model_path("tiny-opt")  # build the cached model once, not in two processes at the same time
    data = twitter_rows(tmp_path, 16)  # 12 train rows = 4 batches of 3 = 2 per process per epoch
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1",
           # the CPU/gloo path, also on a machine with one GPU (two processes cannot share cuda:0 under NCCL)
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "clmtune", "train", "--output-dir", str(out), "--no-eval", "--data.source", str(data),
           "--data.eval_fraction", "0.25", "--data.labels", "[complaint, no complaint]", "--train.batch_size", "3",
           "--train.epochs", "2", "--train.save_steps", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 4 steps") == 1  # only rank 0 reports

    summary = json.loads((out / "train_summary.json").read_text())
    rank0, rank1 = summary["distributed"]["rows_seen_first_epoch_per_rank"]
    assert summary["distributed"]["num_processes"] == 2 and summary["steps"] == 4
    assert len(rank0) == len(rank1) == 6 and not set(rank0) & set(rank1)  # each process saw different rows
    assert sorted(rank0 + rank1) == list(range(12))
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "config.yaml", "loss.png", "tokenizer",
                                                     "train_log.jsonl", "train_summary.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path="builtin:tiny-opt")), str(out / "adapter"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)


def test_zero3_partitioned_parameters_keep_their_full_size():
    """Under DeepSpeed ZeRO-3 every local parameter tensor is empty and ``ds_shape``/``ds_numel`` hold the full
    size. On an H100 (bench/gpu_check.py) the tokenizer check stopped such a run with "the model's embedding has
    0 rows"; the check and the memory estimate read the full size now. Emulated here: no DeepSpeed on a CPU."""
    from clmtune.memory import estimate_for_model
    from clmtune.models import check_tokenizer_fits, load_tokenizer

    cfg = ModelConfig(name_or_path="builtin:tiny-opt")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    before = estimate_for_model(model, batch_size=2, seq_len=16, head_positions=2)
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    check_tokenizer_fits(model, tok, "builtin:tiny-opt")  # 50,265 entries, 50,265 rows (not 0)
    after = estimate_for_model(model, batch_size=2, seq_len=16, head_positions=2)
    assert after.weights == before.weights > 0 and after.total == before.total
