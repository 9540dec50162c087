"""peft adapters: build the config of a method, attach it, and what a (possibly wrapped) peft model is."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from clmtune.config import PEFT_CONFIG_CLASSES, PEFT_METHODS, PEFT_TABLE, PeftSettings
from clmtune.errors import ClmtuneError


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the model's Linear/Conv1D layers: the valid ``target_modules`` values."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def build_peft_config(settings: PeftSettings, tokenizer_path: str | None = None):
    """The peft config object for ``settings`` (``None`` for ``full``). ``options`` override the named fields."""
    import peft

    method = settings.method
    if method == "full":
        return None
    if method not in PEFT_CONFIG_CLASSES:
        raise ClmtuneError(f"peft.method={method!r} is not one of {', '.join(PEFT_METHODS)}")
    cls = getattr(peft, PEFT_CONFIG_CLASSES[method])
    kwargs: dict[str, Any] = {"task_type": peft.TaskType.CAUSAL_LM,
                              **{k: getattr(settings, k) for k in PEFT_TABLE[method].settings}}
    if method == "prompt_tuning":
        if settings.init_text is not None:
            kwargs.update(prompt_tuning_init=peft.PromptTuningInit.TEXT,
                          prompt_tuning_init_text=settings.init_text, tokenizer_name_or_path=tokenizer_path)
        else:
            kwargs.update(prompt_tuning_init=peft.PromptTuningInit.RANDOM)
    kwargs.update(settings.options)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # unknown option (validate() normally catches it first)
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        raise ClmtuneError(f"peft.options: {exc}; valid options of {cls.__name__}: {', '.join(known)}") from None
    except ValueError as exc:  # peft's own checks on option values
        raise ClmtuneError(f"peft.options for {method}: {str(exc).splitlines()[0][:300]}") from None


def apply_peft(model, settings: PeftSettings, tokenizer_path: str | None = None):
    """Wrap the model with a fresh adapter from ``peft``; ``full`` returns the model with every weight trainable.

    ``tokenizer_path``: where peft loads the tokenizer for ``prompt_tuning`` text init (the model folder).
    """
    from peft import get_peft_model

    peft_cfg = build_peft_config(settings, tokenizer_path)
    if peft_cfg is None:
        model.requires_grad_(True)
        return model
    if hasattr(peft_cfg, "fan_in_fan_out") and "fan_in_fan_out" not in settings.options and any(
            type(m).__name__ == "Conv1D" for m in model.modules()):
        # GPT-2's Conv1D stores its weight as (in, out): peft needs fan_in_fan_out=True and otherwise sets it
        # itself, with a warning per run. Saying it up front gives the same adapter, without the warning.
        peft_cfg.fan_in_fan_out = True
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # e.g. "Target modules {'foo'} not found in the base model"
        raise ClmtuneError(f"peft could not apply {settings.method} (target_modules={settings.target_modules}): "
                           f"{str(exc).splitlines()[0][:200]}; linear layers of this model: "
                           f"{linear_layer_names(model)}") from None


def unwrap(model):
    """The model inside a DistributedDataParallel / DeepSpeed engine wrapper (the model itself when unwrapped)."""
    return getattr(model, "module", model)


def peft_type(model) -> str | None:
    """The active peft method of a (possibly DDP-wrapped) model, e.g. ``"PROMPT_TUNING"``; ``None`` for a plain
    transformers model."""
    cfg = getattr(unwrap(model), "active_peft_config", None)
    return None if cfg is None else str(getattr(cfg.peft_type, "value", cfg.peft_type))


def is_prompt_learning(model) -> bool:
    """peft prompt learning (prefix, prompt, p-tuning): virtual tokens in front of the input or in the KV cache,
    added inside peft's ``forward``/``generate``."""
    cfg = getattr(unwrap(model), "active_peft_config", None)
    return bool(getattr(cfg, "is_prompt_learning", False))


def input_virtual_tokens(model) -> int:
    """Positions peft puts in front of the input (prompt tuning, p-tuning); prefix tuning's go to the KV cache."""
    if peft_type(model) in ("PROMPT_TUNING", "P_TUNING"):
        return int(unwrap(model).active_peft_config.num_virtual_tokens)
    return 0


# Architectures whose forward takes explicit ``position_ids`` and a custom 4D attention mask as-is (transformers 5
# ``masking_utils``), each checked against naive scoring in tests/test_eval_methods.py. BLOOM is not here: its
# ALiBi bias is built from a 2D mask. A sliding window (Mistral) is not applied to a custom mask.
CUSTOM_MASK_MODEL_TYPES = frozenset({"gpt2", "opt", "llama", "mistral", "qwen2", "qwen3"})


def self_attending_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool SDPA mask (True = attend) for a padded (B, T) attention mask: causal over the real tokens,
    and every position may also attend to itself.

    With left padding, a pad position's query sees no real key under the causal mask: a fully masked row. CUDA's
    SDPA (torch 2.11, a boolean mask) turned such rows into NaN in the backward pass, and NaN reaches the real rows
    through their 0 attention weights on the pad positions (0 x NaN = NaN): the gradient norm is NaN. Fine-tunings
    of head-dim-64 GPT-2 models on an H200 stopped so at step 68, the first padded batch whose length was a multiple
    of 32 (bench/results/gpu_pretrain_sweep_h200.json); on an H100 ``bench/gpu_check.py`` (``padding``) reproduced
    it at head dim 64, length 192, bf16, and not at head dim 36 or lengths 191/256.
    Letting each pad position attend to itself changes nothing for the real positions (they never attend to pads)
    and leaves no row fully masked. The same trick as ``rank.scoring``'s packed mask.
    """
    t = mask.shape[1]
    allowed = torch.ones((t, t), dtype=torch.bool, device=mask.device).tril() & mask.bool()[:, None, :]  # (B, T, T)
    allowed |= torch.eye(t, dtype=torch.bool, device=mask.device)
    return allowed[:, None]


def forward_inputs(model, batch: dict[str, torch.Tensor], backward: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for a left-padded batch.

    With left padding, positions must start at 0 on each row's first real token; OPT and BLOOM derive this from the
    attention mask, but GPT-2 and LLaMA number positions from the sequence start unless ``position_ids`` is given,
    so we pass ``position_ids`` (B, T) when the model takes them.

    peft and positions (peft 0.21, ``_adjust_prompt_learning_kwargs``):
    - prefix tuning: peft shifts our position_ids by num_virtual_tokens (the prefix sits in the KV cache): correct.
    - prompt tuning / p-tuning: peft *drops* position_ids (with a warning) and prepends the virtual tokens before
      the pads, so GPT-2/LLaMA number positions 0..n_virtual+T-1 over [virtual | pads | text]. We do not pass them
      (no warning per batch); training, ``logits_to_keep`` scoring and peft's ``generate`` all see the same
      numbering, so results are consistent, but the text's positions depend on the row's left padding.
      Fall-back kept on purpose: fixing it would mean re-implementing peft's forward and generate.

    ``backward``: the batch is for training. A padded batch for an SDPA model that takes a custom mask then gets a
    4D mask in which no row is fully masked (``self_attending_mask``: CUDA's SDPA backward gives NaN otherwise).
    Not with prefix tuning, whose forward appends its prefix to a 2D mask (nor prompt tuning / p-tuning, above).
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    unwrapped = unwrap(model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    if input_virtual_tokens(unwrapped):
        return inputs
    if "position_ids" in inspect.signature(base.forward).parameters:
        mask = batch["attention_mask"]
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    config = getattr(base, "config", None)
    on = SELF_ATTENDING_PADS
    if on is None:  # a GPU (or other accelerator) holds the batch or the weights
        weight = next(base.parameters(), None)
        on = batch["attention_mask"].device.type != "cpu" or (weight is not None and weight.device.type != "cpu")
    if (backward and on and not bool(batch["attention_mask"].all())
            and not is_prompt_learning(model) and getattr(config, "model_type", None) in CUSTOM_MASK_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) == "sdpa"):
        inputs["attention_mask"] = self_attending_mask(batch["attention_mask"])  # (B, 1, T, T)
    return inputs


SELF_ATTENDING_PADS: bool | None = None
"""``forward_inputs(backward=True)`` gives padded SDPA batches a mask without fully masked rows: ``None`` on every
device but the CPU (PyTorch's CPU kernels give 0, not NaN, for such rows, and the 4D mask cost ~3 % of a GPT-2 step
there), ``True``/``False`` everywhere (tests; bench/gpu_check.py shows what it prevents)."""


def untie_adapted_embeddings(model) -> bool:
    """Give the output head its own copy of a tied embedding matrix when the adapter changes only one side.

    GPT-2, BLOOM and most small models tie the LM head to the input embedding (one tensor). A LoRA on the embedding
    (``target_modules: [..., wte]``) adds its delta to the lookup only; merging it writes the delta into the shared
    tensor, so the head would change too and the merged model would differ from the adapter model (by ~4 logits on
    clmtune's Chinese GPT-2). Untying first keeps the merged model equal to what was trained; the export then holds
    both matrices (``tie_word_embeddings: false``). Returns whether it untied.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    if inp is None or out is None:
        return False
    inner_in, inner_out = getattr(inp, "base_layer", inp), getattr(out, "base_layer", out)
    if inner_in.weight is not inner_out.weight:
        return False
    adapted_in, adapted_out = isinstance(inp, BaseTunerLayer), isinstance(out, BaseTunerLayer)
    if adapted_in == adapted_out:  # neither (nothing to merge there) or both (peft's ensure_weight_tying)
        return False
    plain = inner_out if adapted_in else inner_in
    plain.weight = torch.nn.Parameter(plain.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    base.config.get_text_config().tie_word_embeddings = False  # the same object for text-only models
    return True


def merge_adapter(model):
    """The base model with a mergeable adapter (LoRA, IA3, ...) merged into its weights, in place; ``model`` itself
    when there is nothing to merge (a plain model, prompt learning: virtual tokens are no weights).

    An embedding shared with the LM head is untied first (``untie_adapted_embeddings``), so the merged model computes
    what the adapter model computed. Used by ``clmtune export --merge`` and by bf16 inference on a CPU
    (``clmtune.inference.for_inference``: merged weights can be packed and their activation fused).
    """
    if peft_type(model) is None or is_prompt_learning(model) or not hasattr(model, "merge_and_unload"):
        return model
    untie_adapted_embeddings(model)
    return model.merge_and_unload()
