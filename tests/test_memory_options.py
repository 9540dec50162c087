"""Memory options: gradient checkpointing (same loss and gradients, less memory), a bf16-loaded base (fp32
adapter that plain peft loads), bitsandbytes switches, deterministic kernels, the estimate in the run summary,
and FSDP refused on a CPU-only machine instead of silently running DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.config import ModelConfig, PeftSettings, RunConfig, TrainConfig
from clmtune.errors import ClmtuneError, ConfigError
from clmtune.models import apply_peft, builtin_model_path, load_model
from clmtune.train import train
from clmtune.train.resources import prepare_base

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def _loss_and_grads(checkpointing: bool):
    cfg = RunConfig(model=ModelConfig(name_or_path="builtin:tiny-opt"),
                    train=TrainConfig(gradient_checkpointing=checkpointing),
                    # dropout on: the recomputation must replay its mask; random B so every LoRA weight gets a gradient
                    peft=PeftSettings(lora_dropout=0.3, options={"init_lora_weights": False}))
    torch.manual_seed(0)
    model = apply_peft(prepare_base(load_model(cfg.model), cfg), cfg.peft)
    model.train()
    ids = torch.randint(3, 1000, (3, 20))
    torch.manual_seed(1)
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.item(), grads


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(one_thread):
    model, loss, grads = _loss_and_grads(False)
    model_ck, loss_ck, grads_ck = _loss_and_grads(True)
    assert model_ck.get_base_model().is_gradient_checkpointing and not model.get_base_model().is_gradient_checkpointing
    assert loss_ck == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ck.keys() and len(grads) == 8  # LoRA A/B on q_proj, v_proj of 2 layers
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_ck[name], g, rtol=1e-5, atol=1e-7)


PEAK_SCRIPT = """
import gc, json, sys, torch
torch.set_num_threads(1)
from transformers import GPT2Config, GPT2LMHeadModel
from peft import LoraConfig, get_peft_model
from clmtune.config import RunConfig, TrainConfig
from clmtune.memory import current_rss, estimate_for_model, peak_rss, reset_peak
from clmtune.train.resources import prepare_base
ck = sys.argv[1] == "1"
torch.manual_seed(0)
base = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=512, n_positions=256))
base = prepare_base(base, RunConfig(train=TrainConfig(gradient_checkpointing=ck)))
model = get_peft_model(base, LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
model.train()
ids = torch.randint(0, 512, (8, 256))
model(input_ids=ids[:1, :8]).logits.sum().backward()  # one-time costs (kernels, autograd engine) first
model.zero_grad(set_to_none=True)
gc.collect()
before = current_rss()
reset_peak()  # the peak from here on (VmHWM reset)
model(input_ids=ids, logits_to_keep=1).logits.float().sum().backward()
est = estimate_for_model(model, batch_size=8, seq_len=256, head_positions=8, gradient_checkpointing=ck)
print(json.dumps({"grew": peak_rss() - before, "activations": est.activations}))
"""


def _measure_peaks() -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    procs = {ck: subprocess.Popen([sys.executable, "-c", PEAK_SCRIPT, "1" if ck else "0"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for ck in (True, False)}
    res = {}
    for ck, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-2000:]
        res["ck" if ck else "plain"] = json.loads(out.strip().splitlines()[-1])
    return res


@pytest.mark.slow
def test_gradient_checkpointing_lowers_the_measured_peak():
    """4 layers x 256 on 8 x 256 tokens: ~0.25 GB of activations without checkpointing, ~0.07 GB with it. Each
    setting in a fresh process (in one process the allocator's reuse of freed memory blurs the second step); the
    peak resident memory during the step above the memory before it is what the step cost. Resident memory is a
    noisy measure on a shared machine (one failure in ~20 loaded runs was seen): a failed measurement is repeated
    once, and both measurements must agree with the estimate to fail the test."""
    failures = []
    for _ in range(2):
        res = _measure_peaks()
        plain, ck = res["plain"], res["ck"]
        assert ck["activations"] < plain["activations"] / 3  # what the estimate predicts
        saved = plain["grew"] - ck["grew"]
        predicted = plain["activations"] - ck["activations"]
        if saved > 0.5 * predicted and plain["grew"] > 0.7 * plain["activations"]:
            return  # checkpointing really saves most of what the estimate says, and the estimate is not inflated
        failures.append(res)
    raise AssertionError(f"checkpointing did not lower the measured peak as estimated, twice: {failures}")


def test_bf16_base_trains_and_saves_an_fp32_adapter_that_plain_peft_loads(tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path, epochs=3)
    cfg.model.dtype = "bf16"
    result = train(cfg.validate(), progress=False)
    assert result.final_loss < result.first_loss
    assert {p.dtype for p in result.model.get_base_model().parameters() if not p.requires_grad} == {torch.bfloat16}
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(builtin_model_path("tiny-opt"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert loaded and any(p.abs().sum() > 0 for p in loaded.values())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    mem = summary["memory"]
    fp32_weights = 4 * summary["all_params"]
    # frozen weights in bf16: about half of fp32 (the fp32 adapter is a sliver)
    assert 0.49 * fp32_weights < mem["estimate"]["weights"] < 0.52 * fp32_weights
    assert mem["measured_peak"] > mem["estimate"]["runtime"] > 0


def test_estimate_and_measured_peak_in_the_summary(tmp_path, one_thread):
    # fp32: under bf16 training stores bf16 copies of the frozen matmul weights, which `prepare` does not model
    cfg = tiny_cfg(tmp_path, epochs=1, gradient_checkpointing=True, deterministic=True, precision="fp32")
    assert not torch.are_deterministic_algorithms_enabled()
    result = train(cfg, progress=False)
    assert not torch.are_deterministic_algorithms_enabled()  # process-wide flag put back after the run
    mem = json.loads((tmp_path / "run" / "train_summary.json").read_text())["memory"]
    assert mem == result.memory and mem["measured"] == "peak resident memory (VmHWM)"
    est = mem["estimate"]
    assert est["gradient_checkpointing"] and est["batch_size"] == 9
    assert est["total"] == (est["weights"] + est["gradients"] + est["optimizer"] + est["activations"]
                            + est["workspace"] + est["lm_head"])
    assert est["peak"] == est["total"] + est["runtime"] and est["measures"].startswith("peak resident memory")
    # LoRA: gradients = trainable fp32 params, AdamW two states each
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert (est["gradients"], est["optimizer"]) == (4 * trainable, 8 * trainable)

    # `clmtune prepare` builds the model on the meta device (no weights read): the same estimate, runtime aside
    from clmtune.prepare import prepare

    before = prepare(cfg, progress=False).memory.as_dict()
    same = ("runtime", "lm_head", "total", "peak")
    assert {k: v for k, v in before.items() if k not in same} == {k: v for k, v in est.items() if k not in same}
    # training fused the head's loss (one vocabulary block, no (positions, V) logits); prepare counts full logits
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["lm_head_loss"] == "fused"
    assert 0 < est["lm_head"] < before["lm_head"]


def test_deterministic_runs_are_identical(tmp_path, one_thread):
    a = train(tiny_cfg(tmp_path, epochs=2, name="a", deterministic=True), progress=False)
    b = train(tiny_cfg(tmp_path, epochs=2, name="b", deterministic=True), progress=False)
    wa = load_file(a.output_dir / "adapter" / "adapter_model.safetensors")
    wb = load_file(b.output_dir / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("change, message", [
    ({"model": {"dtype": "fp8"}}, "model.dtype='fp8' is not one of fp32, bf16, fp16"),
    ({"model": {"dtype": "bf16"}, "peft": {"method": "full"}}, "peft.method=full trains every weight"),
    ({"model": {"load_in_4bit": True, "load_in_8bit": True}}, "both true; choose one"),
    ({"model": {"load_in_8bit": True}, "peft": {"method": "full"}}, "cannot train quantized weights"),
    ({"train": {"gradient_checkpointing": True}, "peft": {"method": "prefix_tuning"}},
     "prefix_tuning does not work with train.gradient_checkpointing"),
    ({"model": {"attn_implementation": "flash"}}, "model.attn_implementation='flash' is not one of sdpa, eager"),
])
def test_memory_option_config_errors(change, message):
    from clmtune.config import from_dict

    with pytest.raises(ConfigError, match=message):
        from_dict(change).validate()


def test_attn_implementation_reaches_transformers_and_eager_equals_sdpa(one_thread):
    """model.attn_implementation picks transformers' attention kernel; eager (the reference) and sdpa give the same
    logits on a padded batch (left padding: the rows' first positions attend to nothing but padding)."""
    models = {impl: load_model(ModelConfig(name_or_path="builtin:gpt2-zh-small", attn_implementation=impl)).eval()
              for impl in ("eager", "sdpa")}
    assert {impl: m.config._attn_implementation for impl, m in models.items()} == {"eager": "eager", "sdpa": "sdpa"}
    ids = torch.tensor([[0, 0, 0, 10, 11, 12], [20, 21, 22, 23, 24, 25]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = {impl: m(input_ids=ids, attention_mask=mask).logits for impl, m in models.items()}
    real = mask.bool()
    torch.testing.assert_close(out["eager"][real], out["sdpa"][real], rtol=1e-4, atol=1e-4)


def test_quantized_loading_without_bitsandbytes_is_one_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ClmtuneError, match=r"model.load_in_4bit needs the bitsandbytes package \(pip install "):
        load_model(ModelConfig(name_or_path="builtin:tiny-opt", load_in_4bit=True), quantize=True)
    load_model(ModelConfig(name_or_path="builtin:tiny-opt", load_in_4bit=True))  # evaluation/export load the plain base: no bitsandbytes needed


@pytest.mark.slow
def test_fsdp_config_on_a_cpu_machine_is_refused_not_run_as_ddp(tmp_path):
    """accelerate 1.15 selects FSDP only on GPUs; on CPU it would train plain DDP (see docs/gpu-and-clusters.md, "Scaling out")."""
    from tinyrun import twitter_rows

    builtin_model_path("tiny-opt")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "-m", "clmtune", "train",
           "--output-dir", str(tmp_path / "run"), "--no-eval", "--data.source", str(twitter_rows(tmp_path)),
           "--train.epochs", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode != 0
    assert "accelerate" in proc.stderr and "silently train plain DDP on the CPU" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "adapter").exists()
