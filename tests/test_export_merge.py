"""Export: merged full models that plain transformers loads, adapters in peft's format, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from tinyrun import load_run, one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.data import collate
from clmtune.errors import ClmtuneError
from clmtune.export import export_run
from clmtune.models import forward_inputs, load_model
from clmtune.train import train


def _probe(tok):
    rows = [tok("Tweet text : the delivery never came").input_ids, tok("Tweet text : thanks").input_ids]
    return collate([{"input_ids": r} for r in rows], tok.pad_token_id)


@pytest.mark.parametrize("method,model,targets", [
    ("lora", "builtin:tiny-gpt2", None),
    ("ia3", "builtin:tiny-llama", None),
    # a LoRA on GPT-2's input embedding, which is tied to the LM head: merging must not change the head
    ("lora", "builtin:tiny-gpt2-zh", ["c_attn", "wte"]),
])
@pytest.mark.slow
def test_merge_writes_a_model_transformers_loads(tmp_path, one_thread, method, model, targets):
    """GPT-2's Conv1D stores weights transposed: the merged logits only match if peft's fan_in_fan_out is right."""
    from transformers import AutoModelForCausalLM, pipeline

    peft = {"target_modules": targets} if targets else None
    run = train(tiny_cfg(tmp_path, method, model=model, peft=peft, max_steps=2), progress=False).output_dir
    adapter_model, tok, _ = load_run(run)
    to = export_run(run, tmp_path / "merged", merge=True)
    assert (to / "model.safetensors").is_file() and not (to / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(to).eval()
    batch = _probe(tok)
    with torch.no_grad():
        want = adapter_model(**forward_inputs(adapter_model, batch)).logits
        got = merged(**forward_inputs(merged, batch)).logits
        base = load_model(load_run(run)[2].model)(**forward_inputs(merged, batch)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - base).abs().max() > 1e-4  # the adapter did something, so the comparison means something
    assert all(torch.isfinite(p).all() for p in merged.parameters())
    if targets and "wte" in targets:  # the export holds the trained embedding and the untouched head
        assert merged.config.tie_word_embeddings is False
        assert merged.lm_head.weight.data_ptr() != merged.transformer.wte.weight.data_ptr()
        torch.testing.assert_close(merged.lm_head.weight, load_model(load_run(run)[2].model).lm_head.weight)

    gen = pipeline("text-generation", model=str(to), device="cpu")
    out = gen("Tweet text : I hate this label :", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("Tweet text : I hate this label :")


@pytest.mark.slow
def test_adapter_export_and_refusals(tmp_path, one_thread):
    from peft import PeftModel

    lora = train(tiny_cfg(tmp_path, "lora", name="lora", max_steps=1), progress=False).output_dir
    to = export_run(lora, tmp_path / "adapter")
    assert json.loads((to / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model, tok, cfg = load_run(lora)
    reloaded = PeftModel.from_pretrained(load_model(cfg.model), str(to)).eval()
    batch = _probe(tok)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**forward_inputs(reloaded, batch)).logits,
                                   model(**forward_inputs(model, batch)).logits)
    with pytest.raises(ClmtuneError, match="not empty"):
        export_run(lora, to)

    prompt = train(tiny_cfg(tmp_path, "prompt_tuning", name="prompt", max_steps=1), progress=False).output_dir
    with pytest.raises(ClmtuneError, match="prompt_tuning adapter is not mergeable"):
        export_run(prompt, tmp_path / "never", merge=True)
    assert not (tmp_path / "never").exists()
    assert (export_run(prompt, tmp_path / "prompt-adapter") / "adapter_model.safetensors").is_file()


def test_full_finetune_exports_its_model(tmp_path, one_thread):
    from transformers import pipeline

    run = train(tiny_cfg(tmp_path, "full", max_steps=1), progress=False).output_dir
    to = export_run(run, tmp_path / "full", merge=True)
    gen = pipeline("text-generation", model=str(to), device="cpu")
    assert gen("Tweet text : hello label :", max_new_tokens=2, do_sample=False)[0]["generated_text"]
