"""The evaluation during training (``train.eval_steps``) runs on the model ``clmtune eval`` would load from the same
weights (``clmtune.train.evalcopy``): its numbers are those of ``clmtune eval``, and it leaves the training alone
(the same weights with it on or off, dropout included)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_report import LABELS, _chinese_csv

from clmtune.config import load_config
from clmtune.evaluate import evaluate_run
from clmtune.train import train


def _cfg(tmp_path, name, task="classify", precision="bf16", **train_kw):
    data = _chinese_csv(tmp_path)
    shape = ({"task": "classify", "template": "评论：{review} 评价：", "label_column": "label", "labels": LABELS}
             if task == "classify" else {"task": "lm", "text_column": "review", "packing": False})
    return load_config(overrides={
        "data": {"source": str(data), **shape, "eval_fraction": 0.25, "max_length": 48},
        "model": {"name_or_path": "builtin:tiny-gpt2"},
        "peft": {"method": "lora", "lora_dropout": 0.2},  # dropout draws random numbers at every training step
        "train": {"output_dir": str(tmp_path / name), "epochs": 2, "batch_size": 9, "learning_rate": 1e-2,
                  "seed": 5, "precision": precision, **train_kw},
        "eval": {"method": "rank", "dtype": "auto"}})


def _adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _evals(run):
    lines = (run / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "eval_rows" in r]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_evaluating_during_training_does_not_change_the_trained_weights(tmp_path, one_thread, precision):
    off = train(_cfg(tmp_path, "off", precision=precision), progress=False)
    on = train(_cfg(tmp_path, "on", precision=precision, eval_steps=2, eval_max_rows=12), progress=False)
    assert len(_evals(on.output_dir)) >= 4 and not _evals(off.output_dir)
    a, b = _adapter(off.output_dir), _adapter(on.output_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_off = [r["loss"] for r in map(json.loads, (off.output_dir / "train_log.jsonl").read_text().splitlines())]
    log_on = [r["loss"] for r in map(json.loads, (on.output_dir / "train_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert log_on == log_off


def test_held_out_accuracy_during_training_is_what_clmtune_eval_computes(tmp_path, one_thread):
    # one evaluation, after the last step, on every held-out row: the weights clmtune eval loads
    res = train(_cfg(tmp_path, "run", epochs=3, eval_steps=100, eval_max_rows=1000), progress=False)
    during = _evals(res.output_dir)[-1]
    final, _ = evaluate_run(res.output_dir, progress=False)
    assert during["eval_rows"] == final["n"] == 12
    assert final["precision"] == "bf16" or not torch.backends.mkldnn.is_available()
    assert during["eval_accuracy"] == round(final["accuracy"], 6)
    assert during["eval_macro_f1"] == round(final["macro_f1"], 6)


def test_held_out_loss_during_training_is_what_clmtune_eval_computes(tmp_path, one_thread):
    res = train(_cfg(tmp_path, "lm", task="lm", eval_steps=100, eval_max_rows=1000), progress=False)
    during = _evals(res.output_dir)[-1]
    final, _ = evaluate_run(res.output_dir, progress=False)
    assert during["eval_rows"] == final["n"]
    # the same model (bf16, adapter merged, packed matmuls), the same rows and batches: the same number
    assert during["eval_loss"] == round(final["nll_per_token"], 6)


def test_the_inference_copy_leaves_the_training_model_alone(tmp_path, one_thread):
    """The copy holds the frozen weights as loaded (not the bf16 copies training uses) and the original activation
    modules; the training model keeps its swapped weights, modules and adapter, and draws no random number."""
    from clmtune.inference import TanhGELU
    from clmtune.models import load_model
    from clmtune.models.peft_methods import apply_peft
    from clmtune.packed import PackedLinear
    from clmtune.train.evalcopy import inference_copy
    from clmtune.train.precision import frozen_matmul_weights_to_bf16, one_op_tanh_gelu

    cfg = _cfg(tmp_path, "x")
    model = apply_peft(load_model(cfg.model, torch.float32), cfg.peft)
    swapped = frozen_matmul_weights_to_bf16(model)
    activations = one_op_tanh_gelu(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    copy = inference_copy(model, swapped, activations, "bf16")
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, TanhGELU) for m in model.modules())  # training keeps its one-op GELU
    assert any(isinstance(m, PackedLinear) for m in copy.modules())  # merged, bf16, packed
    assert not any(type(m).__name__ == "LoraLayer" or hasattr(m, "lora_A") for m in copy.modules())
    # the copy computes what the model computes with the fp32 originals put back (up to bf16 rounding)
    ids = torch.tensor([[5, 9, 14, 3, 7, 2]])
    with torch.no_grad():
        got = copy(input_ids=ids).logits.float()
        for w, data in swapped:
            w.data = data
        want = model.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=0.05, rtol=0.05)
