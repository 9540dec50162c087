"""Export stage: the adapter in peft's own format, or a merged full model that plain ``transformers`` loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from clmtune.config import MERGEABLE_METHODS
from clmtune.data import collate
from clmtune.errors import ClmtuneError
from clmtune.models import forward_inputs, load_run, read_run_config


def export_run(run_dir: str | Path, to: str | Path, merge: bool = False, overwrite: bool = False) -> Path:
    """Copy the adapter (``merge=False``) or write base + adapter merged into one model (``merge=True``).

    Merging checks that every merged weight is finite and that the merged model's logits equal the adapter
    model's logits on a probe batch before anything is written. A ``full`` run has no adapter: its fine-tuned
    model is exported as it is (with or without ``merge``). Prompt-learning adapters cannot be merged.
    """
    run_dir, to = Path(run_dir), Path(to)
    if to.exists() and any(to.iterdir()) and not overwrite:
        raise ClmtuneError(f"{to} exists and is not empty; choose another folder or pass --overwrite")
    method = read_run_config(run_dir).peft.method
    if merge and method not in MERGEABLE_METHODS + ("full",):
        raise ClmtuneError(f"--merge: a {method} adapter is not mergeable (its learned virtual tokens are extra "
                           "inputs, not changes to the base weights); export without --merge and load it with peft, "
                           f"or train with peft.method {' or '.join(MERGEABLE_METHODS)}")
    model, tokenizer, _ = load_run(run_dir)
    if method == "full":  # already a full model
        model.save_pretrained(to, safe_serialization=True)
        tokenizer.save_pretrained(to)
        return to
    if not merge:
        shutil.copytree(run_dir / "adapter", to, dirs_exist_ok=True)
        tokenizer.save_pretrained(to)
        return to
    probe = collate([{"input_ids": tokenizer("clmtune merge check 合并", add_special_tokens=False).input_ids}],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**forward_inputs(model, probe)).logits
        merged = model.merge_and_unload()
        bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ClmtuneError(f"merged weights are not finite in {bad[:5]}; the adapter is broken, not exported")
        after = merged(**forward_inputs(merged, probe)).logits
    if not torch.allclose(before, after, atol=1e-4, rtol=1e-4):
        raise ClmtuneError(f"merged logits differ from adapter logits (max diff {(before - after).abs().max():.2e}); "
                           "not exported")
    merged.save_pretrained(to, safe_serialization=True)
    tokenizer.save_pretrained(to)
    return to
