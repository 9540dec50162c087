"""Stop on request (clmtune.train.stop): SIGINT or SIGTERM in the middle of an optimizer step lets the step finish,
writes a checkpoint of it (even without train.save_steps) and ends as an interruption; resuming from it ends with
exactly the weights of an uninterrupted run. A second signal stops at once."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

import clmtune.train.step as train_mod
from clmtune.train import list_checkpoints, train


def _cfg(tmp_path, name):
    # 9 rows / batch 3 = 3 batches per epoch, 2 epochs = 6 steps; no save_steps: no periodic checkpoint
    return tiny_cfg(tmp_path, "lora", model="builtin:tiny-gpt2", name=name, epochs=2, batch_size=3)


def _signal_during(monkeypatch, batch: int, signals: list[int]) -> None:
    """Send ``signals`` to this process inside the ``batch``-th loss computation."""
    calls = {"n": 0}
    for name in ("causal_lm_loss", "frozen_head_loss"):
        real = getattr(train_mod, name)

        def loss(*args, _real=real, **kw):
            calls["n"] += 1
            if calls["n"] == batch:
                for s in signals:
                    try:
                        os.kill(os.getpid(), s)
                    except KeyboardInterrupt:  # the second signal raises at once
                        raise
            return _real(*args, **kw)

        monkeypatch.setattr(train_mod, name, loss)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_a_checkpoint_and_resume_matches(tmp_path, one_thread, monkeypatch, sig):
    full = train(_cfg(tmp_path, "straight"), progress=False)
    cfg = _cfg(tmp_path, "stopped")
    with monkeypatch.context() as m:
        _signal_during(m, 3, [sig])
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    out = tmp_path / "stopped"
    assert [p.name for p in list_checkpoints(out)] == ["step-000003"]  # the step in flight was finished and saved
    assert not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    resumed = train(cfg, progress=False, resume="latest")
    assert resumed.steps == 6 and resumed.resumed_from.name == "step-000003"
    a = load_file(full.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_second_signal_stops_at_once(tmp_path, one_thread, monkeypatch):
    cfg = _cfg(tmp_path, "twice")
    _signal_during(monkeypatch, 2, [signal.SIGINT, signal.SIGINT])
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    assert list_checkpoints(tmp_path / "twice") == []  # no checkpoint of a half-done step
