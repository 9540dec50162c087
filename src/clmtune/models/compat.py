"""Compatibility shims between the installed peft and transformers versions."""

from __future__ import annotations

import inspect

from clmtune.models.peft_methods import is_prompt_learning


def _renaming_kwarg(fn, name: str, as_name: str):
    """``fn`` called with keyword ``name`` passed as ``as_name``, and ``as_name`` in its output dict renamed back."""

    def wrapped(*args, **kwargs):
        if name in kwargs:
            kwargs[as_name] = kwargs.pop(name)
        out = fn(*args, **kwargs)
        if as_name in out:
            out[name] = out.pop(as_name)
        return out

    return wrapped


def fix_prompt_learning_generation(model) -> None:
    """Make peft's generation with virtual tokens work on transformers >= 5.2x (in place, idempotent).

    transformers renamed the KV cache argument ``past_key_values`` -> ``cache``; peft 0.21's
    ``prepare_inputs_for_generation`` still reads and writes ``past_key_values``. Measured without this shim
    (tests/test_peft_methods.py): prefix tuning generates exactly like the base model (the learned prefix is put in
    ``past_key_values`` and dropped in favour of ``cache``), and prompt tuning re-inserts the virtual tokens at
    every step. The shim renames the key on the way into peft's function and back on the way out; peft's own logic
    is unchanged. No-op for LoRA/IA3 (peft does not touch the cache) and for a transformers that still uses
    ``past_key_values``.
    """
    if not is_prompt_learning(model) or getattr(model, "_clmtune_cache_shim", False):
        return
    base_prepare = model.base_model_prepare_inputs_for_generation
    if "cache" not in inspect.signature(base_prepare).parameters:
        return
    peft_prepare = model.prepare_inputs_for_generation

    base_prepare_as_peft_expects = _renaming_kwarg(base_prepare, "past_key_values", "cache")
    prepare = _renaming_kwarg(peft_prepare, "cache", "past_key_values")

    model.base_model_prepare_inputs_for_generation = base_prepare_as_peft_expects
    model.prepare_inputs_for_generation = prepare  # peft.generate installs this on the base model
    model._clmtune_cache_shim = True


# transformers 5.x renamed the KV cache argument and output field ``past_key_values`` -> ``cache`` within the
# major version (the old name warns, and goes later); pyproject allows transformers>=5.0, so both names are used
# through these two helpers: evaluation (search, scoring, constrained) and the server's decode loop.


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` (newer 5.x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a forward's output, under either name (None when there is none)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
