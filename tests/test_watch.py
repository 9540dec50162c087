"""Watching training: evaluation every N steps, the best weights as the result, early stopping, exact resume with
both, TensorBoard through accelerate, loss.png at the end of every run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_report import LABELS, _chinese_csv
from tinyrun import crash_training_at

from clmtune.config import load_config
from clmtune.errors import ClmtuneError, ConfigError
from clmtune.train import train


def _cfg(tmp_path, name, **train_kw):
    data = _chinese_csv(tmp_path)
    return load_config(overrides={
        "data": {"source": str(data), "task": "classify", "template": "评论：{review} 评价：", "label_column": "label",
                 "labels": LABELS, "eval_fraction": 0.25, "max_length": 48},
        "model": {"name_or_path": "builtin:tiny-gpt2"},
        "train": {"output_dir": str(tmp_path / name), "epochs": 3, "batch_size": 9, "learning_rate": 1e-2,
                  "seed": 5, **train_kw}})


def _log(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]


def _adapter(folder):
    return load_file(folder / "adapter" / "adapter_model.safetensors")




@pytest.mark.slow
def test_eval_steps_log_best_weights_loss_png_and_tensorboard(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # 36 training rows / batch 9 = 4 steps per epoch, 3 epochs = 12 steps; evaluations at 3, 6, 9, 12
    # fp32: the held-out loss below is compared with an fp32 evaluation of the saved weights (bf16 losses differ
    # in the 4th decimal)
    cfg = _cfg(tmp_path, "run", eval_steps=3, eval_max_rows=10, save_best={"metric": "eval_loss"},
               save_steps=3, save_total_limit=None, report_to=["tensorboard"], precision="fp32")
    cfg.eval.dtype = "fp32"  # the evaluation during training runs in eval.dtype, as clmtune eval does
    res = train(cfg, progress=False)
    out = res.output_dir
    log = _log(out)
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    assert all(r["eval_rows"] == 10 and 0 <= r["eval_accuracy"] <= 1 and 0 <= r["eval_macro_f1"] <= 1
               for r in evals)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    # the result is the best evaluation's weights, exactly those of the checkpoint written at that step
    summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["best"] == {"metric": "eval_loss", "mode": "min", "value": best["eval_loss"], "step": best["step"]}
    assert summary["eval_steps"] == 3 and summary["early_stopped_at"] is None
    a, b = _adapter(out), _adapter(out / "checkpoints" / f"step-{best['step']:06d}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / "best").exists()  # moved into the result
    assert (out / "loss.png").stat().st_size > 10_000
    # the held-out loss during training is the same number evaluation computes (10 rows, token-weighted)
    from clmtune.data import prepare_data
    from clmtune.metrics import perplexity
    from clmtune.run import RunDir

    model, tok = RunDir(out).load_model()
    held = prepare_data(tok, cfg.data, progress=False).eval.select(range(10))
    feats = [{"input_ids": i, "labels": lab} for i, lab in zip(held["input_ids"], held["labels"])]
    assert perplexity(model, feats, tok.pad_token_id)["nll_per_token"] == pytest.approx(best["eval_loss"], abs=1e-4)
    # TensorBoard: every logged value is in the event file, at its step
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss", "eval_accuracy",
            "eval_macro_f1"} <= tags
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval_loss")] == \
        [(r["step"], round(r["eval_loss"], 4)) for r in evals]
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 13))


def test_early_stopping(tmp_path, one_thread, monkeypatch):
    from clmtune.train.watch import Watch

    scripted = iter([5.0, 4.0, 4.5, 4.2, 3.0, 2.0])  # best at the 2nd evaluation, then 2 without improvement

    def fake_evaluate(self, model):
        return {"eval_loss": next(scripted), "eval_rows": 1, "eval_seconds": 0.0}

    monkeypatch.setattr(Watch, "evaluate", fake_evaluate)
    res = train(_cfg(tmp_path, "early", eval_steps=2, early_stopping_patience=2), progress=False)
    assert res.steps == 8  # evaluations at 2, 4 (best), 6, 8 -> stop
    summary = json.loads((res.output_dir / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["early_stopped_at"] == 8 and summary["best"] is None and summary["steps"] == 8
    assert [r["eval_loss"] for r in _log(res.output_dir) if "eval_loss" in r] == [5.0, 4.0, 4.5, 4.2]


# eval_accuracy: the best comes after the checkpoint the run resumes from; eval_loss with mode max (the loss falls, so
# the first evaluation stays best): the best comes before it, so the resumed run must restore the best-so-far state
@pytest.mark.slow
@pytest.mark.parametrize("best", [{"metric": "eval_accuracy", "mode": "max"}, {"metric": "eval_loss", "mode": "max"}])
def test_resume_with_eval_and_save_best_matches_uninterrupted(tmp_path, one_thread, monkeypatch, best):
    kw = dict(eval_steps=2, save_best=best, save_steps=3, save_total_limit=2)
    straight = train(_cfg(tmp_path, "straight", **kw), progress=False)

    cfg = _cfg(tmp_path, "crashed", **kw)
    crash_training_at(monkeypatch, 8, cfg, train)
    resumed = train(cfg, progress=False, resume="latest")
    assert resumed.resumed_from.name == "step-000006"
    a, b = _adapter(straight.output_dir), _adapter(resumed.output_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    s1, s2 = (json.loads((r.output_dir / "train_summary.json").read_text(encoding="utf-8")) for r in (straight, resumed))
    assert s1["best"] == s2["best"] and s1["best"]["step"] in (2, 4, 6, 8, 10, 12)

    def evals(run):
        return [x for r in _log(run) if "eval_loss" in r for x in (r["step"], r["eval_loss"], r["eval_accuracy"])]

    assert evals(resumed.output_dir) == pytest.approx(evals(straight.output_dir), abs=1e-5)


@pytest.mark.slow
def test_lm_task_eval_loss_only(tmp_path, one_thread):
    data = _chinese_csv(tmp_path)
    cfg = load_config(overrides={
        "data": {"source": str(data), "task": "lm", "text_column": "review", "block_size": 32, "max_length": 32,
                 "eval_fraction": 0.2},
        "model": {"name_or_path": "builtin:tiny-gpt2"},
        "train": {"output_dir": str(tmp_path / "lm"), "max_steps": 4, "batch_size": 8, "eval_steps": 2,
                  "save_best": {"metric": "eval_loss"}}})
    res = train(cfg, progress=False)
    evals = [r for r in _log(res.output_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and not any("eval_accuracy" in r for r in evals)
    summary = json.loads((res.output_dir / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["best"]["step"] == min(evals, key=lambda r: r["eval_loss"])["step"]


def test_watch_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"train": {"save_best": {"metric": "eval_accuracy"}, "early_stopping_patience": 0,
                                         "report_to": ["wandb"], "eval_max_rows": 0}})
    msg = str(e.value)
    for part in ("train.save_best needs train.eval_steps", "train.early_stopping_patience=0 must be > 0",
                 "train.report_to has ['wandb']", "train.eval_max_rows=0 must be > 0"):
        assert part in msg
    with pytest.raises(ConfigError, match="train.save_best.metric='eval_accuracy' is not one of eval_loss"):
        load_config(overrides={"data": {"task": "lm", "text_column": "text"},
                               "train": {"eval_steps": 5, "save_best": {"metric": "eval_accuracy"}}})
    with pytest.raises(ConfigError, match="mode='up' must be max or min"):
        load_config(overrides={"train": {"eval_steps": 5, "save_best": {"metric": "eval_loss", "mode": "up"}}})

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ClmtuneError, match=r"pip install 'clmtune\[tensorboard\]'"):
        train(_cfg(tmp_path, "tb", max_steps=1, report_to=["tensorboard"]), progress=False)
    cfg = _cfg(tmp_path, "noeval", max_steps=1, eval_steps=1)
    cfg.data.eval_fraction = 0.0
    with pytest.raises(ClmtuneError, match="train.eval_steps needs a held-out split"):
        train(cfg, progress=False)


@pytest.mark.slow
def test_cli_train_prints_best_weights_and_curves(tmp_path, capsys, one_thread):
    from clmtune.cli import main

    data = _chinese_csv(tmp_path)
    out = tmp_path / "cli"
    rc = main(["train", "--output-dir", str(out), "--no-eval", "--data.source", str(data),
               "--data.template", "评论：{review} 评价：", "--data.label_column", "label", "--data.labels", "[差评, 好评]",
               "--data.max_length", "48", "--model.name_or_path", "builtin:tiny-gpt2", "--train.max_steps", "4",
               "--train.batch_size", "9", "--train.eval_steps", "2", "--train.save_best", "{metric: eval_loss}"])
    assert rc == 0
    printed = capsys.readouterr().out
    best = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))["best"]
    assert f"kept the best weights: step {best['step']} (eval_loss {best['value']:.4f})" in printed
    assert f"curves:    {out / 'loss.png'}" in printed
