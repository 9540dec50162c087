"""Train stage end to end on the built-in tiny OPT model: what changed, what did not, what was saved."""

from __future__ import annotations

import json

import pytest
import torch
from tinyrun import load_run

from clmtune.config import load_config
from clmtune.data import collate
from clmtune.errors import ClmtuneError
from clmtune.models import forward_inputs, load_model


def test_lora_trains_only_the_adapter(trained):
    cfg, result = trained
    base = load_model(cfg.model)
    trained_state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.cpu()
                     for k, v in result.model.state_dict().items()}
    changed_lora = 0
    for name, value in trained_state.items():
        if "lora_" in name:
            changed_lora += "lora_B" in name and bool(value.abs().sum() > 0)  # lora_B starts at exactly zero
        else:
            assert torch.equal(value, base.state_dict()[name]), f"base weight {name} changed"
    assert changed_lora == 2 * base.config.num_hidden_layers  # q_proj and v_proj in every layer (peft's OPT default)


def test_loss_goes_down_on_a_set_it_can_overfit(trained):
    cfg, result = trained
    losses = [json.loads(line)["loss"] for line in open(result.output_dir / "train_log.jsonl")]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_run_folder_contents(trained):
    cfg, result = trained
    out = result.output_dir
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "tokenizer/tokenizer_config.json",
                 "config.yaml", "train_log.jsonl", "train_summary.json"):
        assert (out / name).is_file(), name
    record = json.loads(open(out / "train_log.jsonl").readline())
    assert set(record) >= {"step", "loss", "learning_rate", "tokens_per_s"}
    assert load_config(out / "config.yaml") == cfg


def test_saved_adapter_loads_with_plain_peft_and_gives_the_same_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, result = trained
    out = result.output_dir
    ours, tok, _ = load_run(out)
    base_dir = json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "adapter")).eval()
    plain_tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = [plain_tok("Tweet text : my order never came label : ", add_special_tokens=False).input_ids,
           plain_tok("Tweet text : thanks label : ", add_special_tokens=False).input_ids]
    batch = collate([{"input_ids": i} for i in ids], tok.pad_token_id)
    with torch.no_grad():
        a = ours(**forward_inputs(ours, batch)).logits
        b = plain(**forward_inputs(plain, batch)).logits
        # the model left in memory by train() (on the GPU when there is one) gives the same logits as the reloads
        trained = result.model.eval()
        device = next(trained.parameters()).device
        trained_logits = trained(**{k: v.to(device) for k, v in forward_inputs(trained, batch).items()}).logits.cpu()
    assert torch.equal(a, b)
    assert torch.allclose(a, trained_logits, atol=1e-4)


def test_refuses_to_overwrite_a_finished_run(trained):
    from clmtune.train import train

    cfg, _ = trained
    with pytest.raises(ClmtuneError, match="already holds a finished run"):
        train(cfg, progress=False)
