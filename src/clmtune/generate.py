"""Generate stage: sample continuations with ``transformers``' ``generate`` (KV cache on), cleanly decoded."""

from __future__ import annotations

import re

import torch

from clmtune.config import GenerateConfig, ModelConfig
from clmtune.data import leading_special_ids, left_pad
from clmtune.errors import ClmtuneError
from clmtune.models import load_model, load_run, load_tokenizer

_CJK = r"\u2e80-\u2fff\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])")


def clean_text(text: str) -> str:
    """Remove the spaces a character tokenizer puts between CJK characters (``游 泳 池`` -> ``游泳池``);
    spaces between Latin words stay."""
    return _SPACE_BETWEEN_CJK.sub("", text).strip()


def load_for_generation(run: str | None = None, model: str | None = None):
    """(model, tokenizer) from a run folder (base + adapter) or a plain/merged model folder or hub id."""
    if (run is None) == (model is None):
        raise ClmtuneError("give exactly one of --run RUN_DIR or --model MODEL")
    if run is not None:
        m, tok, _ = load_run(run)
        return m, tok
    cfg = ModelConfig(name_or_path=model)
    m = load_model(cfg)
    m.eval()
    return m, load_tokenizer(cfg)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], settings: GenerateConfig) -> list[list[str]]:
    """For each prompt, ``num_return_sequences`` continuations (the prompt itself not included)."""
    bad = [i for i, p in enumerate(prompts) if not p.strip()]
    if bad:
        raise ClmtuneError(f"prompt #{bad[0] + 1} is empty; give some text to continue")
    prefix = leading_special_ids(tokenizer)
    ids = [prefix + x for x in tokenizer(prompts, add_special_tokens=False).input_ids]
    input_ids = left_pad(ids, tokenizer.pad_token_id)  # (B, T), left-padded
    attention_mask = left_pad([[1] * len(x) for x in ids], 0)
    torch.manual_seed(settings.seed)
    sample = settings.temperature > 0
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
        do_sample=sample, temperature=settings.temperature if sample else None,
        top_k=settings.top_k if sample else None, top_p=settings.top_p if sample else None,
        num_return_sequences=settings.num_return_sequences, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, use_cache=True)
    new = out[:, input_ids.shape[1]:]  # (B * num_return_sequences, new tokens)
    texts = [clean_text(tokenizer.decode(row, skip_special_tokens=True)) for row in new.tolist()]
    k = settings.num_return_sequences
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
