"""Models (a foundation): load tokenizers and causal LMs, build the tiny built-in models, attach adapters.

Everything goes through ``transformers``' Auto classes and ``peft``; the only hand-written parts are the
built-in tiny models (there are no weights to download here) and the error messages. Modules (this file only
re-exports them): ``builtin`` (built-in and shipped models), ``load`` (tokenizers, models, context length,
devices), ``peft_methods`` (adapters and what a wrapped peft model is), ``compat`` (peft/transformers shims).
"""

from __future__ import annotations

from clmtune.models.builtin import (BUILTIN_MODELS, BUILTIN_VERSION, SHIPPED_MODELS, opt_bpe_tokenizer,
                                    bert_chinese_tokenizer, builtin_model_path, clmtune_home, resolve_model_path)
from clmtune.models.compat import cache_kwarg, fix_prompt_learning_generation, output_cache
from clmtune.models.load import (TORCH_DTYPES, check_safetensors, check_tokenizer_fits, context_length,
                                 ensure_pad_token, load_model, load_tokenizer, model_device, model_dtype,
                                 quantization_config, resolve_device)
from clmtune.models.peft_methods import (CUSTOM_MASK_MODEL_TYPES, apply_peft, build_peft_config, forward_inputs,
                                         input_virtual_tokens, is_prompt_learning, linear_layer_names, merge_adapter, peft_type,
                                         self_attending_mask, unwrap)

__all__ = ["cache_kwarg", "output_cache", "CUSTOM_MASK_MODEL_TYPES", "TORCH_DTYPES", "model_dtype", "quantization_config", "BUILTIN_MODELS",
           "BUILTIN_VERSION", "SHIPPED_MODELS", "opt_bpe_tokenizer", "apply_peft",
           "bert_chinese_tokenizer", "build_peft_config", "builtin_model_path", "check_safetensors",
           "check_tokenizer_fits", "clmtune_home",
           "context_length", "ensure_pad_token", "fix_prompt_learning_generation", "forward_inputs",
           "input_virtual_tokens", "is_prompt_learning", "linear_layer_names", "load_model", "load_tokenizer", "merge_adapter",
           "model_device", "peft_type", "resolve_device", "resolve_model_path", "self_attending_mask", "unwrap"]
