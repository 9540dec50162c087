"""The allowed values of a run configuration's keys, and the one table of PEFT methods (``PEFT_TABLE``)."""

from __future__ import annotations

import re
from dataclasses import dataclass


TEXT_SAMPLE_BY = ("line", "paragraph", "document")
END_TOKENS = ("eos", "pad")
TRUNCATION_SIDES = ("left", "right")
PADDING = ("longest", "max_length")


@dataclass(frozen=True)
class PeftMethod:
    """One ``peft.method``, everything clmtune knows about it in one row of ``PEFT_TABLE``: adding a method is one
    row (plus, for a method with its own settings, its keys in ``PeftSettings``)."""

    name: str
    config_class: str | None
    """peft's config class (``None``: ``full`` trains every weight, no adapter)."""
    learning_rate: float
    """``train.learning_rate: auto`` (``DEFAULT_LEARNING_RATES``)."""
    settings: tuple[str, ...] = ()
    """``PeftSettings`` keys handed to the config class."""
    mergeable: bool = False
    """``clmtune export --merge`` folds the adapter into the base weights."""


PEFT_TABLE = {m.name: m for m in (
    PeftMethod("lora", "LoraConfig", 2e-3, ("r", "lora_alpha", "lora_dropout", "target_modules"), mergeable=True),
    PeftMethod("prefix_tuning", "PrefixTuningConfig", 1e-2, ("num_virtual_tokens",)),
    PeftMethod("prompt_tuning", "PromptTuningConfig", 3e-2, ("num_virtual_tokens",)),
    PeftMethod("p_tuning", "PromptEncoderConfig", 1e-3, ("num_virtual_tokens",)),
    PeftMethod("ia3", "IA3Config", 3e-3, ("target_modules",), mergeable=True),
    PeftMethod("full", None, 3e-4),
)}
PEFT_METHODS = tuple(PEFT_TABLE)
PEFT_CONFIG_CLASSES = {n: m.config_class for n, m in PEFT_TABLE.items() if m.config_class}
"""peft config class of each method (``full`` has none: every weight is trained, no adapter)."""
MERGEABLE_METHODS = tuple(n for n, m in PEFT_TABLE.items() if m.mergeable)
EVAL_METHODS = ("auto", "rank", "constrained", "generate")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
"""Values of ``eval.device`` / ``generate.device``."""


def device_problem(name: object) -> str | None:
    """Why ``name`` is not a device setting (``"'gpu' is not a device: use ..."``), or None when it is one."""
    if re.fullmatch(DEVICE_PATTERN, str(name)):
        return None
    return f"{name!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "fp32", "bf16")
"""Values of ``train.precision``, ``eval.dtype`` and ``generate.dtype`` (``auto``: see ``clmtune.device``)."""
MODEL_DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Values of ``model.attn_implementation`` (transformers' names)."""
AUTO = "auto"
"""Value of a key that clmtune chooses from the data and the method (``model.name_or_path``,
``train.learning_rate``, ``data.max_length``); the numeric keys also take ``null`` for it."""
AUTO_KEYS = ("data.max_length", "train.learning_rate", "model.name_or_path", "train.device_loss", "train.fused_adamw")
DEFAULT_LEARNING_RATES = {n: m.learning_rate for n, m in PEFT_TABLE.items()}
"""``train.learning_rate: auto`` per ``peft.method`` (``defaults.MODEL_LORA`` can name another LoRA rate for a
shipped model: 1e-3 for ``builtin:gpt2-zh-small``). Full fine-tuning 3e-4 vs 2e-3 on ChnSentiCorp with the first
shipped model: 89.0 % vs 84.8 %; prompt tuning 3e-2 and prefix tuning 1e-2 are peft's example values (few
parameters need large steps). For full fine-tuning of models of more than ~100 M parameters use less (1e-5..5e-5)."""
ADAPTER_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens", "init_text")
"""``peft`` keys that only adapters use (``peft.method: full`` ignores them, with a warning)."""
PREFERENCE_LOSSES = ("dpo", "ipo", "orpo", "simpo")
"""Values of ``preference.loss``."""
