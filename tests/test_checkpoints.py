"""Checkpoints: atomic, rotated, and a resumed run ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tinyrun import crash_training_at, one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.errors import ClmtuneError
from clmtune.train import list_checkpoints, resolve_resume, train


def _cfg(tmp_path, name, method="lora"):
    # GPT-2 has dropout (0.1) in the model and LoRA dropout: resuming must restore the RNG state too.
    # 9 rows / batch 3 = 3 batches per epoch, 2 epochs = 6 steps; checkpoints at 2, 4 (mid-epoch), 6.
    return tiny_cfg(tmp_path, method, model="builtin:tiny-gpt2", name=name, epochs=2, batch_size=3,
                    save_steps=2, save_total_limit=2)


def _weights(out, method="lora"):
    if method == "full":
        return load_file(out / "model" / "model.safetensors")
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "full"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, one_thread, monkeypatch, method):
    full = train(_cfg(tmp_path, "straight", method), progress=False)
    assert [p.name for p in list_checkpoints(full.output_dir)] == ["step-000004", "step-000006"]  # keep last 2

    cfg = _cfg(tmp_path, "crashed", method)
    crash_training_at(monkeypatch, 5, cfg, train)
    out = full.output_dir.parent / "crashed"
    assert not (out / "adapter").exists() and not (out / "model").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)  # resumes in the middle of the second epoch

    resumed = train(cfg, progress=False, resume="latest")
    assert resumed.steps == 6 and resumed.resumed_from.name == "step-000004"
    a, b = _weights(full.output_dir, method), _weights(out, method)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-5)


@pytest.mark.slow
def test_incomplete_checkpoints_are_ignored_and_bad_resume_refused(tmp_path, one_thread):
    cfg = _cfg(tmp_path, "run")
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-000008-123").mkdir(parents=True)  # a killed writer's leftovers
    (out / "checkpoints" / "step-000009").mkdir()  # no trainer_state.json: not complete
    with pytest.raises(ClmtuneError, match="no checkpoint to resume"):
        train(cfg, progress=False, resume="latest")
    with pytest.raises(ClmtuneError, match="not a checkpoint"):
        resolve_resume(out, str(out / "checkpoints" / "step-000009"))

    cfg.train.max_steps = 2
    train(cfg, progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["step-000002"]
    with pytest.raises(ClmtuneError, match="already holds a finished run; nothing to resume"):
        train(cfg, progress=False, resume="latest")
    with pytest.raises(ClmtuneError, match="already holds a finished run"):
        train(cfg, progress=False)

    # unfinished run with checkpoints: a fresh start must be explicit, and the config must match on resume
    (out / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(ClmtuneError, match="--resume"):
        train(cfg, progress=False)
    cfg.train.learning_rate = 0.5
    with pytest.raises(ClmtuneError, match="train.learning_rate"):
        train(cfg, progress=False, resume="latest")
