"""Export stage: the adapter in peft's own format, or a merged full model that plain ``transformers`` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from clmtune.config import MERGEABLE_METHODS
from clmtune.data import collate
from clmtune.errors import ClmtuneError
from clmtune.fsutil import atomic_folder, check_writable, clean_stale_tmp
from clmtune.models import forward_inputs, merge_adapter
from clmtune.run import RunDir, check_replace_target

EXPORT_MARK = "clmtune_export.json"  # in every export folder: what --overwrite may replace


def export_run(run_dir: str | Path, to: str | Path, merge: bool = False, overwrite: bool = False) -> Path:
    """Copy the adapter (``merge=False``) or write base + adapter merged into one model (``merge=True``).

    Merging checks that every merged weight is finite and that the merged model's logits equal the adapter
    model's logits on a probe batch before anything is written. A ``full`` run has no adapter: its fine-tuned
    model is exported as it is (with or without ``merge``). Prompt-learning adapters cannot be merged.
    """
    run, to = RunDir(run_dir), Path(to)
    check_replace_target(to, overwrite, option="--to", marker=EXPORT_MARK, kind="`clmtune export`")
    check_writable(to.parent, "the folder of --to")
    clean_stale_tmp(to.parent, to.name)
    cfg = run.load_config()
    run.check_finished("export")
    method = cfg.peft.method
    if merge and method not in MERGEABLE_METHODS + ("full",):
        raise ClmtuneError(f"--merge: a {method} adapter is not mergeable (its learned virtual tokens are extra "
                           "inputs, not changes to the base weights); export without --merge and load it with peft, "
                           f"or train with peft.method {' or '.join(MERGEABLE_METHODS)}")
    model, tokenizer = run.load_model(cfg=cfg)
    # Everything is written into a hidden sibling folder renamed to `to` at the end: a killed export leaves no
    # half folder that loads, and --overwrite replaces the old folder as a whole (no stale adapter_config.json).
    with atomic_folder(to, replace=overwrite) as tmp:
        if method == "full":  # already a full model
            model.save_pretrained(tmp, safe_serialization=True)
        elif not merge:
            shutil.copytree(run.adapter, tmp, dirs_exist_ok=True)
        else:
            _merged(model, tokenizer).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_MARK).write_text(json.dumps({"run": str(run.path.resolve()), "merge": merge, "method": method},
                                                  indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return to


def _merged(model, tokenizer):
    """The adapter merged into the base weights, checked (finite; same logits as the adapter model)."""
    probe = collate([{"input_ids": tokenizer("clmtune merge check 合并", add_special_tokens=False).input_ids}],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**forward_inputs(model, probe)).logits
        merged = merge_adapter(model)
        bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise ClmtuneError(f"merged weights are not finite in {bad[:5]}; the adapter is broken, not exported")
        after = merged(**forward_inputs(merged, probe)).logits
    if not torch.allclose(before, after, atol=1e-4, rtol=1e-4):
        raise ClmtuneError(f"merged logits differ from adapter logits (max diff {(before - after).abs().max():.2e}); "
                           "not exported")
    return merged
