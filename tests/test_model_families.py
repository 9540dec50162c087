"""One tiny config-built model per family: peft's default target modules, training, left-padding invariance."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS
from tinyrun import one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.config import ModelConfig, PeftSettings
from clmtune.data import collate
from clmtune.models import apply_peft, forward_inputs, load_model, load_tokenizer
from clmtune.train import train

FAMILIES = {  # built-in name -> (model_type, layer class peft wraps)
    "tiny-bloom": ("bloom", "Linear"),
    "tiny-gpt2": ("gpt2", "Conv1D"),  # GPT-2 stores weights transposed (fan_in_fan_out): peft handles it
    "tiny-gpt2-zh": ("gpt2", "Conv1D"),
    "tiny-opt": ("opt", "Linear"),
    "tiny-llama": ("llama", "Linear"),
}


def _chinese_rows(tmp_path, shared_data, n=12):
    """12 real ChnSentiCorp hotel reviews, labels spelled as words the model learns to write."""
    names = {"0": "负面", "1": "正面"}
    with open(shared_data / "chnsenticorp" / "dev.tsv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["text_a"].strip()][:n]
    path = tmp_path / "hotel.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "label"])
        w.writerows([r["text_a"][:60], names[r["label"]]] for r in rows)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_trains_with_default_targets(tmp_path, one_thread, name, request):
    model_type, layer_cls = FAMILIES[name]
    data = None
    if name == "tiny-gpt2-zh":
        shared = request.getfixturevalue("shared_data")
        data = {"source": str(_chinese_rows(tmp_path, shared)), "template": "评论：{review} 情感：",
                "label_column": "label", "labels": ["负面", "正面"]}
    cfg = tiny_cfg(tmp_path, "lora", model=f"builtin:{name}", data=data, epochs=3, learning_rate=3e-2)
    result = train(cfg, progress=False)
    assert result.final_loss < result.first_loss

    adapter_cfg = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == sorted(LORA_TARGETS[model_type])  # peft's own default
    model = apply_peft(load_model(cfg.model), cfg.peft)
    wrapped = [type(m.base_layer).__name__ for n, m in model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and set(wrapped) == {layer_cls}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bloom"])
@pytest.mark.parametrize("method", ["lora", "prefix_tuning", "full"])
def test_left_padding_does_not_change_logits(one_thread, name, method):
    """A row's logits are the same alone and left-padded next to a longer row (position_ids from the mask;
    peft shifts them by the prefix length under prefix tuning)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path=f"builtin:{name}")
    tok = load_tokenizer(cfg)
    model = apply_peft(load_model(cfg), PeftSettings(method=method, num_virtual_tokens=4)).eval()
    if method == "lora":  # LoRA B starts at zero; make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    short = tok("I hate waiting", add_special_tokens=False).input_ids
    long = tok("thanks a lot for the quick help with my broken phone today", add_special_tokens=False).input_ids
    with torch.no_grad():
        alone = model(**forward_inputs(model, collate([{"input_ids": short}], tok.pad_token_id))).logits[0]
        both = model(**forward_inputs(model, collate([{"input_ids": short}, {"input_ids": long}],
                                                     tok.pad_token_id))).logits[0, -len(short):]
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-4)
