"""Precision for inference: what the hardware supports (clmtune.device) and bf16 weights with packed matmuls."""

from __future__ import annotations

import copy

import pytest
import torch

from clmtune import device as devmod
from clmtune.config import GenerateConfig, ModelConfig, RunConfig
from clmtune.errors import ConfigError
from clmtune.generate import generate, load_for_generation
from clmtune.inference import for_inference
from clmtune.packed import PackedLinear
from clmtune.models import load_model, load_tokenizer

native, _ = devmod.native_bf16("cpu")
needs_bf16 = pytest.mark.skipif(not native, reason="this CPU has no native bf16 matrix units")


def _tiny(name: str):
    cfg = ModelConfig(f"builtin:{name}")
    return load_model(cfg).eval(), load_tokenizer(cfg)


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(devmod, "_onednn_bf16", lambda: True)
    monkeypatch.setattr(devmod, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert devmod.resolve_precision("auto")[0] == "bf16"
    assert "avx512_bf16" in devmod.resolve_precision("auto")[1]
    monkeypatch.setattr(devmod, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_tile"}))
    assert devmod.resolve_precision("auto")[0] == "bf16"
    monkeypatch.setattr(devmod, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))  # emulated bf16 only
    precision, why = devmod.resolve_precision("auto")
    assert precision == "fp32" and "no native bf16" in why
    assert devmod.resolve_precision("bf16")[0] == "bf16"  # asked for: kept, with a warning in the reason
    assert "slower" in devmod.resolve_precision("bf16")[1]
    assert devmod.resolve_precision("fp32") == ("fp32", "asked for fp32")
    monkeypatch.setattr(devmod, "_onednn_bf16", lambda: False)
    assert devmod.resolve_precision("bf16")[0] == "fp32"


def test_cpu_features_are_reported():
    f = devmod.cpu_matrix_features()
    assert set(f) >= {"cpu", "cores", "avx512_bf16", "amx_bf16"}
    assert "avx512_bf16" in devmod.describe_cpu()


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="generate.dtype='fp16' is not one of auto, fp32, bf16"):
        RunConfig(generate=GenerateConfig(dtype="fp16")).validate()


@needs_bf16
def test_packed_linear_matches_bf16_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40).to(torch.bfloat16)
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    packed = PackedLinear(lin.weight.data, lin.bias, weight_param=lin.weight)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    out = packed(x)
    assert out.shape == (3, 5, 40) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.03, rtol=0.01)  # bf16 rounding of the output only
    assert packed.weight is lin.weight  # shared with a tied embedding


@needs_bf16
# GPT-2 Conv1D (the shipped pretrained model: with random weights greedy decoding meets near-ties that bf16
# rounding flips) and OPT nn.Linear
@pytest.mark.parametrize("name", ["gpt2-zh-small", "tiny-opt"])
def test_bf16_inference_logits_close_to_fp32_and_greedy_text_equal(name):
    model, tok = _tiny(name)
    fast, precision, why = for_inference(copy.deepcopy(model), "auto")
    assert precision == "bf16" and fast.dtype == torch.bfloat16
    packed = [m for m in fast.modules() if isinstance(m, PackedLinear)]
    assert len(packed) >= 4
    assert fast.get_input_embeddings().weight is fast.get_output_embeddings().weight  # still tied
    ids = torch.tensor([tok("房间很干净，服务很好" if "zh" in name else "The room was clean and",
                            add_special_tokens=False).input_ids])
    with torch.no_grad():
        a = torch.log_softmax(model(ids).logits.float(), -1)
        b = torch.log_softmax(fast(ids).logits.float(), -1)
    assert (a - b).abs().mean() < 0.02 and (a - b).abs().max() < 0.25  # bf16 rounding (8-bit mantissa)
    assert torch.equal(a[0, -1].topk(3).indices, b[0, -1].topk(3).indices)
    s = GenerateConfig(max_new_tokens=6, temperature=0)
    prompts = ["房间很干净", "服务"] if "zh" in name else ["The room", "Great"]
    assert [g.outputs for g in generate(model, tok, prompts, s)] == [g.outputs for g in generate(fast, tok, prompts, s)]
    assert for_inference(fast, "auto")[0] is fast  # a second call changes nothing


@needs_bf16
@pytest.mark.parametrize("name, fused_act", [("tiny-gpt2-zh", ("gelu", "tanh")), ("tiny-bloom", ("gelu", "tanh")),
                                             ("tiny-opt", ("relu", ""))])
def test_activations_run_inside_the_packed_matmul(name, fused_act, monkeypatch):
    import clmtune.inference as inference

    model, _ = _tiny(name)
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 64]])
    fast = for_inference(copy.deepcopy(model), "bf16")[0]
    fused = [m for m in fast.modules() if isinstance(m, PackedLinear) and m.activation != ("none", "")]
    assert len(fused) == model.config.num_hidden_layers and {m.activation for m in fused} == {fused_act}
    assert not any(type(m).__name__ in ("NewGELUActivation", "BloomGelu", "ReLU") for m in fast.modules())
    monkeypatch.setattr(inference, "fuse_activations", lambda m: 0)
    plain = for_inference(copy.deepcopy(model), "bf16")[0]  # the activation modules as they were
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits.float(), -1)
        a = torch.log_softmax(fast(ids).logits.float(), -1)
        b = torch.log_softmax(plain(ids).logits.float(), -1)
    assert (a - b).abs().max() < 0.1  # the same function, rounded to bf16 at another point
    assert (a - ref).abs().mean() <= (b - ref).abs().mean() * 1.05  # the fused GELU is not further from fp32
    if name == "tiny-opt":
        assert torch.equal(a, b)  # ReLU commutes with rounding: exactly the same


@needs_bf16
def test_a_lora_adapter_is_merged_then_packed_and_fused():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.activations import NewGELUActivation

    from clmtune.inference import TanhGELU

    x = torch.randn(2, 3, 64)
    assert torch.allclose(TanhGELU()(x), NewGELUActivation()(x), atol=1e-6)  # what an unfusable GELU becomes
    model, _ = _tiny("tiny-gpt2-zh")
    # LoRA on the MLP and on the embedding that the LM head shares: merging must untie them first
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["c_fc", "wte"], fan_in_fan_out=True,
                                            init_lora_weights=False)).eval()
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
    fast = for_inference(lora, "bf16")[0]
    assert not any(isinstance(m, BaseTunerLayer) for m in fast.modules())  # the adapter is in the weights now
    mlps = [m for m in fast.modules() if type(m).__name__ == "GPT2MLP"]
    assert mlps and all(isinstance(m.c_fc, PackedLinear) and m.c_fc.activation[0] != "none" for m in mlps)
    with torch.no_grad():
        got = fast(input_ids=ids).logits.float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding, not a different model
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fp32_leaves_the_model_alone():
    model, _ = _tiny("tiny-opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, precision, _ = for_inference(model, "fp32")
    assert out is model and precision == "fp32"
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_for_generation_applies_the_dtype(trained):
    _, result = trained
    m32, _ = load_for_generation(run=str(result.output_dir), dtype="fp32")
    assert next(m32.parameters()).dtype == torch.float32
    if native:
        m16, tok = load_for_generation(run=str(result.output_dir), dtype="auto")  # base + LoRA adapter
        assert next(m16.parameters()).dtype == torch.bfloat16
        assert any(isinstance(m, PackedLinear) for m in m16.modules())
        out = generate(m16, tok, ["Tweet text : where is my parcel label : "], GenerateConfig(max_new_tokens=4))
        assert len(out[0].outputs) == 1


def test_eval_dtype_auto_runs_bf16_and_records_it(trained, tmp_path):
    from clmtune.data import assets_path
    from clmtune.evaluate import evaluate_run

    _, result = trained
    rows = str(assets_path("raft/twitter_complaints/train.csv"))  # labelled tweets, the run's label set
    m32, _ = evaluate_run(result.output_dir, data_file=rows, out_dir=tmp_path / "fp32", progress=False,
                          dtype="fp32")
    assert m32["precision"] == "fp32"
    m16, _ = evaluate_run(result.output_dir, data_file=rows, out_dir=tmp_path / "auto", progress=False)
    assert m16["precision"] == ("bf16" if native else "fp32")  # eval.dtype defaults to auto
    assert m16["n"] == m32["n"] and m16["invalid"] == 0
