"""The memory estimate: hand-computed numbers, and activations against what autograd really keeps."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from clmtune.memory import ModelShape, estimate, estimate_for_model, measured_peak


def test_shape_from_gpt2_and_llama_configs():
    g = ModelShape.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100))
    assert g == ModelShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=100, mlp_saved=5,
                           attn_dropout=0.1, hidden_dropout=0.1)  # GPT-2's default attn_pdrop / resid_pdrop
    ll = ModelShape.from_config(LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000))
    assert ll == ModelShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000,
                            mlp_saved=4)


def test_hand_computed_lora_estimate():
    # d=64, 2 layers, 4 heads (kv 4), f=256, V=100; batch 2 x 8 tokens, 3 head positions, fp32, sdpa, no dropout
    shape = ModelShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=100, mlp_saved=2)
    e = estimate(shape, total_params=1000, trainable_params=10, batch_size=2, seq_len=8, head_positions=3)
    per_layer = (2 * 64 + 64 + 2 * 64 + 64) + (2 * 64 + 2 * 256)  # attention 384 + MLP 640
    assert per_layer == 1024
    assert e.activations == 16 * (2 * 1024 + 2 * 64) * 4
    assert e.workspace == int(0.25 * e.activations) - 40  # the CPU's backward temporaries beyond the gradients
    assert (e.weights, e.gradients, e.optimizer) == (4000, 40, 80)
    assert e.lm_head == 2 * 4 * 3 * 100
    assert e.total == 4000 + 40 + 80 + e.activations + e.workspace + 2400
    assert e.peak == e.total + e.runtime and "resident" in e.measures and "estimated peak" in e.table()
    ck = estimate(shape, total_params=1000, trainable_params=10, batch_size=2, seq_len=8, head_positions=3,
                  gradient_checkpointing=True)
    assert ck.activations == 16 * (2 * 64 + 1024 + 2 * 64) * 4
    assert ck.workspace == 16 * 1024 * 4 - 40  # the recomputed layer's backward: one more layer's set
    bf = estimate(shape, total_params=1000, trainable_params=10, batch_size=2, seq_len=8, head_positions=3,
                  compute_dtype=torch.bfloat16)
    assert bf.activations * 2 == e.activations
    gpu = estimate(shape, total_params=1000, trainable_params=10, batch_size=2, seq_len=8, head_positions=3,
                   device="cuda", runtime=123)
    assert gpu.workspace == 0 and gpu.peak == gpu.total and "cuda" in gpu.measures


def test_dropout_makes_cpu_attention_unfused():
    # CPU: SDPA with dropout on the probabilities runs its math kernel: fp32 q, k, v and 3 x heads x L probabilities;
    # each residual-branch dropout keeps a noise tensor. CUDA: fused attention, a bool mask per dropout.
    plain = ModelShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=100, mlp_saved=2)
    drop = ModelShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=100, mlp_saved=2,
                      attn_dropout=0.1, hidden_dropout=0.1)
    kw = dict(total_params=1000, trainable_params=10, batch_size=2, seq_len=8, head_positions=3)
    base = estimate(plain, **kw).activations
    extra_layer = 4 * (3 * 4 * 8 + 64 + 2 * 64) + 2 * 64 * 4
    assert estimate(drop, **kw).activations == base + 16 * (2 * extra_layer + 64 * 4)
    assert estimate(drop, device="cuda", **kw).activations == base + 16 * (2 * 2 * 64 + 64)


def saved_tensor_bytes(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves for backward during one forward (what activations cost)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        if t.requires_grad and t.is_leaf:  # a parameter, counted as weights
            return t
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.logits.float().sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt2-one-op-gelu", "gpt2-dropout", "gpt2-dropout-lora"])
def test_activation_estimate_close_to_what_autograd_saves(arch):
    torch.manual_seed(0)
    if arch.startswith("gpt2"):
        p = 0.1 if "dropout" in arch else 0.0  # GPT-2's default dropout: SDPA's math kernel on the CPU
        cfg = GPT2Config(n_embd=128, n_layer=3, n_head=4, vocab_size=64, n_positions=256, resid_pdrop=p,
                         embd_pdrop=p, attn_pdrop=p)
        model = GPT2LMHeadModel(cfg)
        if arch.endswith("lora"):
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=8, lora_dropout=0.1, target_modules=["c_attn", "c_proj", "c_fc"])
            model = get_peft_model(model, lora)
    else:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    model.train()
    one_op = arch.endswith("one-op-gelu")
    if one_op:  # as bf16 adapter training on a CPU runs gelu_new
        from clmtune.train.precision import one_op_tanh_gelu

        assert len(one_op_tanh_gelu(model)) == 3
    b, length = 4, 128
    batch = {"input_ids": torch.randint(0, 64, (b, length)), "logits_to_keep": 1}
    measured = saved_tensor_bytes(model, batch)
    est = estimate_for_model(model, batch_size=b, seq_len=length, head_positions=b, one_op_gelu=one_op)
    # the LM head runs on 4 positions only here, so activations dominate; the model ignores kernel-internal buffers
    assert 0.75 < est.activations / measured < 1.25, (est.activations, measured)
    assert est.weights == sum(p.numel() * 4 for p in model.parameters())
    if not arch.endswith("lora"):
        assert est.gradients == est.weights and est.optimizer == 2 * est.weights


def test_checkpointing_estimate_is_lower_and_peak_is_measured():
    shape = ModelShape(hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=4096, vocab=250880,
                       mlp_saved=5)
    kw = dict(total_params=559_000_000, trainable_params=800_000, batch_size=8, seq_len=64, head_positions=24)
    assert estimate(shape, gradient_checkpointing=True, **kw).activations < estimate(shape, **kw).activations / 5
    assert measured_peak("cpu") > 50 * 2 ** 20  # this process (torch + transformers imported) has a real RSS
