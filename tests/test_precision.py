"""bf16 autocast on CPU reaches about the fp32 loss; trainable weights stay fp32."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.train import train


@pytest.mark.slow
def test_bf16_training_tracks_fp32(tmp_path, one_thread):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_cfg(tmp_path, "lora", name=precision, epochs=6, precision=precision, learning_rate=3e-2)
        runs[precision] = train(cfg, progress=False)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    drop = fp32.first_loss - fp32.final_loss
    assert drop > 0.5  # the tiny overfit task really trains
    assert bf16.final_loss < bf16.first_loss - 0.8 * drop
    assert abs(bf16.final_loss - fp32.final_loss) < 0.1 * drop
    assert bf16.final_loss != fp32.final_loss  # bf16 autocast really ran (matmuls in bf16)
    weights = load_file(bf16.output_dir / "adapter" / "adapter_model.safetensors")
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}  # fp32 master weights
    assert json.loads((bf16.output_dir / "train_summary.json").read_text())["precision"] == "bf16"


@pytest.mark.slow
def test_auto_precision_follows_the_hardware_and_says_why(tmp_path, one_thread, monkeypatch):
    from clmtune import device
    from clmtune.device import native_bf16

    cfg = tiny_cfg(tmp_path, "lora", name="auto", max_steps=1)
    assert cfg.train.precision == "auto"  # the default
    train(cfg, progress=False)
    summary = json.loads((tmp_path / "auto" / "train_summary.json").read_text())
    native, why = native_bf16("cpu")
    assert summary["precision"] == ("bf16" if native else "fp32")
    assert summary["precision_reason"] == f"auto: {why}"
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2"}))  # a CPU without bf16 units
    train(tiny_cfg(tmp_path, "lora", name="auto_old_cpu", max_steps=1), progress=False)
    summary = json.loads((tmp_path / "auto_old_cpu" / "train_summary.json").read_text())
    assert summary["precision"] == "fp32" and "no native bf16 matrix units" in summary["precision_reason"]
