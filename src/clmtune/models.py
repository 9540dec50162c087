"""Models stage (a foundation): load tokenizers and causal LMs, build the tiny built-in models, attach adapters.

Everything goes through ``transformers``' Auto classes and ``peft``; the only hand-written parts are the
built-in tiny models (there are no weights to download here) and the error messages.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clmtune.config import (PEFT_CONFIG_CLASSES, PEFT_METHODS, ModelConfig, PeftSettings, RunConfig, device_problem,
                            load_config)
from clmtune.data import BUILTIN_PREFIX, assets_path
from clmtune.errors import ClmtuneError

log = logging.getLogger("clmtune")

BUILTIN_VERSION = "2"  # bump when a built-in model's recipe changes, so caches are rebuilt


def clmtune_home() -> Path:
    """Cache folder for built-in models (``$CLMTUNE_HOME``, default ``~/.cache/clmtune``)."""
    return Path(os.environ.get("CLMTUNE_HOME", Path.home() / ".cache" / "clmtune")).expanduser()


def _opt_bpe_tokenizer():
    from transformers import GPT2Tokenizer

    folder = assets_path("vocab/opt-bpe")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    # transformers 5 tokenizers take vocab=/merges=; vocab_file= would be silently ignored (empty tokenizer).
    return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                         pad_token="<pad>")


def bert_chinese_tokenizer():
    """The BERT character tokenizer of Chinese GPT-2 models (21,128 entries, shipped in assets/vocab)."""
    from transformers import BertTokenizer

    lines = assets_path("vocab/bert-chinese-vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab = {tok: i for i, tok in enumerate(lines[:21128])}
    # No bos/eos in BERT's vocabulary: Chinese GPT-2 uses [SEP] as the end token and [PAD] for padding.
    return BertTokenizer(vocab=vocab, eos_token="[SEP]", pad_token="[PAD]")


# Both tiny models use a large init std (0.2 instead of 0.02): with 64-wide layers and the default, logits stay
# within about +-1.3 of each other, so the random model cannot fit anything and tests of learning are meaningless.


def _tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    tok = _opt_bpe_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=64, word_embed_proj_dim=64, ffn_dim=256, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=512, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2, dropout=0.0, attention_dropout=0.0, init_std=0.2)
    return OPTForCausalLM(cfg), tok


def _tiny_gpt2_zh():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = bert_chinese_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                     initializer_range=0.2)
    return GPT2LMHeadModel(cfg), tok


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _opt_bpe_tokenizer()  # the OPT vocabulary is GPT-2's byte-level BPE (+4 specials)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=2,
                     eos_token_id=2, pad_token_id=1)
    return GPT2LMHeadModel(cfg), tok


def _tiny_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    tok = _opt_bpe_tokenizer()  # BLOOM's own 250k vocabulary is not shipped; the architecture is what matters here
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=2,
                      pad_token_id=1)
    return BloomForCausalLM(cfg), tok


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _opt_bpe_tokenizer()  # no sentencepiece vocabulary is shipped; LLaMA-family architecture, BPE vocab
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=2,
                      eos_token_id=2, pad_token_id=1)
    return LlamaForCausalLM(cfg), tok


BUILTIN_MODELS = {
    "tiny-opt": _tiny_opt,  # OPT architecture, 2 layers x 64 wide, real OPT/GPT-2 BPE vocabulary (50,265)
    "tiny-gpt2-zh": _tiny_gpt2_zh,  # GPT-2 architecture with the BERT Chinese character tokenizer (21,128)
    "tiny-gpt2": _tiny_gpt2,  # GPT-2 architecture (Conv1D c_attn), BPE vocabulary
    "tiny-bloom": _tiny_bloom,  # BLOOM architecture (fused query_key_value, ALiBi), BPE vocabulary
    "tiny-llama": _tiny_llama,  # LLaMA architecture (RoPE, GQA, SwiGLU), BPE vocabulary
}


# Pretrained models shipped inside the package (assets/models/NAME: safetensors + tokenizer + MODEL_CARD.md),
# trained by clmtune itself; scripts/pretrain_default.py reproduces them. Unlike BUILTIN_MODELS nothing is built.
SHIPPED_MODELS = {
    "gpt2-zh-small": "GPT-2, 4 layers x 256, cut BERT Chinese char vocab; pretrained on CLUECorpusSmall (sample) "
                     "+ ChnSentiCorp train reviews. The default for the Chinese configs and `make demo`.",
}


def builtin_model_path(name: str) -> Path:
    """Folder of a built-in model: a shipped pretrained one, or a tiny random one built (seeded) on first use."""
    if name in SHIPPED_MODELS:
        folder = assets_path(f"models/{name}")
        if not (folder / "model.safetensors").is_file():
            raise ClmtuneError(f"builtin:{name} is missing from this installation ({folder}/model.safetensors); "
                               "reinstall clmtune or rebuild it with scripts/pretrain_default.py")
        return folder
    if name not in BUILTIN_MODELS:
        raise ClmtuneError(f"model.name_or_path='builtin:{name}' is unknown; built-in models: "
                           f"{', '.join('builtin:' + n for n in [*SHIPPED_MODELS, *BUILTIN_MODELS])}")
    folder = clmtune_home() / "models" / f"{name}-v{BUILTIN_VERSION}"
    if not (folder / "model.safetensors").is_file():
        with torch.random.fork_rng(devices=[]):  # seed 0 here must not reset the caller's (already seeded) RNG
            torch.manual_seed(0)
            model, tok = BUILTIN_MODELS[name]()
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            tmp.replace(folder)  # atomic: a folder that exists is complete
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """``builtin:NAME`` -> cached folder; an existing folder -> itself; anything else is taken as a hub id."""
    if name_or_path == "auto":
        raise ClmtuneError("model.name_or_path=auto is chosen from the training data by `clmtune train`/`prepare`; "
                           "here give a model (a folder, a hub id or builtin:NAME)")
    if name_or_path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_path(name_or_path[len(BUILTIN_PREFIX):]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ClmtuneError(f"model.name_or_path={name_or_path!r} is a file; give the model's folder")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ClmtuneError(f"model.name_or_path={name_or_path!r}: no such folder")
    return name_or_path  # a hub id such as bigscience/bloomz-560m


def _hub_error(name: str, exc: Exception) -> ClmtuneError:
    return ClmtuneError(f"could not load {name!r}: it is not a local folder, and downloading it from the Hugging Face "
                        f"hub failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Hub downloads need "
                        "network; on an offline machine download the model elsewhere and pass its folder")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """Tokenizer of the model, with a pad token guaranteed (see ``ensure_pad_token``)."""
    from transformers import AutoTokenizer

    target = path or resolve_model_path(cfg.name_or_path)
    if Path(target).is_dir() and not any((Path(target) / n).is_file() for n in _TOKENIZER_FILES):
        # Without this check transformers 5 builds an *empty* tokenizer from config.json's model type, and the
        # first encode fails deep inside with "IndexError: index is out of bounds for dimension with size 0".
        raise ClmtuneError(f"{target} has no usable tokenizer (none of {', '.join(_TOKENIZER_FILES)}); copy the "
                           "tokenizer files of the model into it (tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(target, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if Path(target).is_dir():
            raise ClmtuneError(f"{target} has no usable tokenizer ({str(exc).splitlines()[0][:200]}); copy the "
                               "tokenizer files (tokenizer.json or vocab files + tokenizer_config.json) into it") from None
        raise _hub_error(target, exc) from None
    ensure_pad_token(tok)
    return tok


def check_tokenizer_fits(model, tokenizer, where: str) -> None:
    """A tokenizer with more entries than the model has embedding rows would index past the embedding (an
    IndexError deep in the forward pass, or garbage on GPU): stop early and say both numbers. Fewer entries is
    normal (vocabularies are often padded to a multiple of 8/64)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ClmtuneError(f"the tokenizer of {where} has {len(tokenizer)} entries but the model's embedding has "
                           f"{rows} rows; use the tokenizer saved with this model (or resize the embedding with "
                           "model.resize_token_embeddings and save both)")


def ensure_pad_token(tokenizer) -> str:
    """Use the tokenizer's own pad token; if it has none, its end-of-sequence token. Returns what was chosen."""
    if tokenizer.pad_token_id is not None:
        msg = f"pad token: {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}, the tokenizer's own)"
    elif tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
        msg = f"pad token: {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}, the end-of-sequence token; " \
              "the tokenizer has no pad token)"
    else:
        raise ClmtuneError("the tokenizer has neither a pad nor an end-of-sequence token; add one "
                           "(tokenizer.add_special_tokens) and save it with the model")
    tokenizer.padding_side = "left"
    log.info(msg)
    return msg


def context_length(cfg: ModelConfig) -> int | None:
    """Positions the model can attend over (``max_position_embeddings`` & co. of its config.json), or None when
    it has no fixed limit (ALiBi models such as BLOOM) or the config cannot be read here (loading reports that)."""
    from transformers import AutoConfig

    try:
        target = resolve_model_path(cfg.name_or_path)
        mc = AutoConfig.from_pretrained(target, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ClmtuneError):
        return None
    mc = getattr(mc, "text_config", None) or mc
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(mc, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return
    if any(n.endswith(".bin") or n.endswith(".bin.index.json") for n in names):
        if allow_pickle:
            return
        raise ClmtuneError(f"{folder} only has pickled weights (pytorch_model.bin); convert them to safetensors, or "
                           "set model.allow_pickle_weights: true if you trust the file")
    raise ClmtuneError(f"{folder} holds no model weights (*.safetensors); is it the right folder?")


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM`` from a local folder, a hub id or a built-in name."""
    from transformers import AutoModelForCausalLM

    target = resolve_model_path(cfg.name_or_path)
    if Path(target).is_dir():
        _check_weights(Path(target), cfg.allow_pickle_weights)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
            use_safetensors=None if cfg.allow_pickle_weights else True)
    except (OSError, ValueError) as exc:
        if Path(target).is_dir():
            raise ClmtuneError(f"could not load the model in {target}: {str(exc).splitlines()[0][:300]}") from None
        raise _hub_error(target, exc) from None
    return model


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
    kwargs: dict[str, Any] = {"task_type": peft.TaskType.CAUSAL_LM}
    if method == "lora":
        kwargs.update(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=settings.target_modules)
    elif method == "ia3":
        kwargs.update(target_modules=settings.target_modules)
    else:  # prompt-learning methods
        kwargs.update(num_virtual_tokens=settings.num_virtual_tokens)
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


def peft_type(model) -> str | None:
    """The active peft method of a (possibly DDP-wrapped) model, e.g. ``"PROMPT_TUNING"``; ``None`` for a plain
    transformers model."""
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the PeftModel
    cfg = getattr(model, "active_peft_config", None)
    return None if cfg is None else str(getattr(cfg.peft_type, "value", cfg.peft_type))


def forward_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    unwrapped = getattr(model, "module", model)  # DDP / DeepSpeed engines wrap the model
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    if peft_type(unwrapped) in ("PROMPT_TUNING", "P_TUNING"):
        return inputs
    if "position_ids" in inspect.signature(base.forward).parameters:
        mask = batch["attention_mask"]
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return inputs


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
    cfg = getattr(model, "active_peft_config", None)
    if cfg is None or not cfg.is_prompt_learning or getattr(model, "_clmtune_cache_shim", False):
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


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ClmtuneError(f"{run_dir} is not a clmtune run folder (no config.yaml); give the output_dir of "
                           "`clmtune train`")
    return load_config(cfg_path)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when torch sees one, else the CPU; else the named device, checked to exist."""
    name = str(name)
    if problem := device_problem(name):
        raise ClmtuneError(f"device {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= count:
            raise ClmtuneError(f"device {name!r}: torch {torch.__version__} sees {count} CUDA GPU(s); use cpu or auto")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ClmtuneError("device 'mps': this torch build has no Apple GPU support here; use cpu or auto")
    return torch.device(name)


def model_device(model) -> torch.device:
    """Where the model's (first) weights are: inputs must be moved there."""
    return next(model.parameters()).device


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> tuple[Any, Any, RunConfig]:
    """(model with its trained adapter, tokenizer, config) of a finished run folder, in eval mode on ``device``.

    Adapter methods: the base model + ``RUN/adapter`` (peft format). ``full``: the fine-tuned model in ``RUN/model``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    device = device if isinstance(device, torch.device) else resolve_device(device)  # a bad name fails before loading
    if cfg.peft.method == "full":
        folder = run_dir / "model"
        if not (folder / "config.json").is_file():
            raise ClmtuneError(f"{run_dir} has no trained model ({folder}/config.json); did training finish?")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    else:
        adapter = run_dir / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise ClmtuneError(f"{run_dir} has no trained adapter ({adapter}/adapter_config.json); did training "
                               "finish?")
        model = PeftModel.from_pretrained(load_model(cfg.model, dtype), str(adapter))
        fix_prompt_learning_generation(model)
    tok = load_tokenizer(cfg.model, str(run_dir / "tokenizer"))
    check_tokenizer_fits(model, tok, str(run_dir))
    return model.eval().to(device), tok, cfg
