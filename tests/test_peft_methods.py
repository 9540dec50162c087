"""Every training method end to end on a tiny model: trains, saves, reloads, evaluates, generates."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from tinyrun import load_run, one_thread, tiny_cfg  # noqa: F401  (fixture)

from clmtune.config import GenerateConfig, ModelConfig, PeftSettings
from clmtune.data import collate
from clmtune.evaluate import evaluate_run
from clmtune.generate import generate
from clmtune.models import apply_peft, forward_inputs, load_model, load_tokenizer, resolve_model_path
from clmtune.train import train

INIT_TEXT = "Classify if the tweet is a complaint or not:"
CASES = [
    ("lora", {}, "LORA"),
    ("prefix_tuning", {}, "PREFIX_TUNING"),
    ("prompt_tuning", {}, "PROMPT_TUNING"),
    ("prompt_tuning", {"init_text": INIT_TEXT}, "PROMPT_TUNING"),
    ("p_tuning", {}, "P_TUNING"),
    ("ia3", {}, "IA3"),
    ("full", {}, None),
]


def _strip_peft(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".base_layer", "")


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,peft_type", CASES, ids=[c[0] + ("-text" if c[1] else "") for c in CASES])
def test_method_end_to_end(tmp_path, one_thread, method, extra, peft_type):
    cfg = tiny_cfg(tmp_path, method, peft=extra)
    result = train(cfg, progress=False)
    out = result.output_dir
    assert result.steps == 4
    assert result.final_loss < result.first_loss  # the same 9-row batch every step
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == method

    model, tok, _ = load_run(out)
    base = load_model(cfg.model).eval()
    base_sd = base.state_dict()
    if peft_type is None:  # full fine-tuning: a plain transformers model with changed weights
        assert not (out / "adapter").exists() and (out / "model" / "model.safetensors").is_file()
        assert any(not torch.equal(w, base_sd[n]) for n, w in model.state_dict().items())
    else:
        adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["peft_type"] == peft_type
        if extra.get("init_text"):
            assert adapter_cfg["prompt_tuning_init"] == "TEXT"
        # frozen base weights are exactly the base model's
        inner = {_strip_peft(n): w for n, w in model.get_base_model().state_dict().items()
                 if "lora_" not in n and "ia3_" not in n}
        assert inner.keys() == base_sd.keys()
        assert all(torch.equal(inner[n], w) for n, w in base_sd.items())

    # rank scoring's logits_to_keep sees the same last positions as a full forward, with virtual tokens too
    ids = [tok("Tweet text : I hate waiting").input_ids, tok("Tweet text : thanks a lot for the help today").input_ids]
    batch = collate([{"input_ids": x} for x in ids], tok.pad_token_id)
    with torch.no_grad():
        full = model(**forward_inputs(model, batch)).logits
        kept = model(**forward_inputs(model, batch), logits_to_keep=3).logits
        base_logits = base(**forward_inputs(base, batch)).logits
    assert kept.shape[1] == 3
    torch.testing.assert_close(kept, full[:, -3:], atol=1e-5, rtol=1e-5)
    assert (full[:, -1] - base_logits[:, -1]).abs().max() > 1e-3  # the trained weights/tokens change the output

    metrics, where = evaluate_run(out, "eval", progress=False)
    assert metrics["n"] == 3 and 0 <= metrics["accuracy"] <= 1 and (where / "predictions.csv").is_file()

    # generation uses the learned weights / virtual tokens: each step's scores equal a teacher-forced forward
    one = collate([{"input_ids": ids[0]}], tok.pad_token_id)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Position ids are not supported ..." for prompt methods
        gen = model.generate(**one, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        seq = gen.sequences[0].tolist()
        for k in range(len(gen.scores)):  # fewer than 3 when the model already ends with its end token
            step = collate([{"input_ids": seq[:len(ids[0]) + k]}], tok.pad_token_id)
            torch.testing.assert_close(gen.scores[k][0], model(**forward_inputs(model, step)).logits[0, -1],
                                       atol=1e-4, rtol=1e-4)
        base_first = base(**one).logits[0, -1]
    assert (gen.scores[0][0] - base_first).abs().max() > 1e-3  # differs from the base model's generation
    texts = [g.outputs for g in generate(model, tok, ["Tweet text : I hate this label :"],
                                         GenerateConfig(temperature=0, max_new_tokens=4))]
    assert len(texts) == 1 and len(texts[0]) == 1


def test_prompt_tuning_text_init_copies_the_texts_embeddings(one_thread):
    """peft's TEXT init: virtual token k starts as the embedding of the init text's token k (repeated to fill)."""
    settings = PeftSettings(method="prompt_tuning", init_text=INIT_TEXT, num_virtual_tokens=6)
    model_cfg = ModelConfig(name_or_path="builtin:tiny-opt")
    model = apply_peft(load_model(model_cfg), settings, tokenizer_path=resolve_model_path(model_cfg.name_or_path))
    token_ids = load_tokenizer(model_cfg)(INIT_TEXT).input_ids[:6]
    assert len(token_ids) == 6
    virtual = model.prompt_encoder["default"].embedding.weight  # (num_virtual_tokens, hidden)
    expected = model.get_input_embeddings().weight[token_ids]
    torch.testing.assert_close(virtual, expected, atol=0, rtol=0)
