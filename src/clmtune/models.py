"""Models stage (a foundation): load tokenizers and causal LMs, build the tiny built-in models, attach adapters.

Everything goes through ``transformers``' Auto classes and ``peft``; the only hand-written parts are the
built-in tiny models (there are no weights to download here) and the error messages.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from clmtune.config import ModelConfig, PeftSettings, RunConfig, load_config
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


BUILTIN_MODELS = {
    "tiny-opt": _tiny_opt,  # OPT architecture, 2 layers x 64 wide, real OPT/GPT-2 BPE vocabulary (50,265)
    "tiny-gpt2-zh": _tiny_gpt2_zh,  # GPT-2 architecture with the BERT Chinese character tokenizer (21,128)
}


def builtin_model_path(name: str) -> Path:
    """Folder of a built-in model, built (seeded, random weights) on first use and cached."""
    if name not in BUILTIN_MODELS:
        raise ClmtuneError(f"model.name_or_path='builtin:{name}' is unknown; built-in models: "
                           f"{', '.join('builtin:' + n for n in BUILTIN_MODELS)}")
    folder = clmtune_home() / "models" / f"{name}-v{BUILTIN_VERSION}"
    if not (folder / "model.safetensors").is_file():
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


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """Tokenizer of the model, with a pad token guaranteed (see ``ensure_pad_token``)."""
    from transformers import AutoTokenizer

    target = path or resolve_model_path(cfg.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(target, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if Path(target).is_dir():
            raise ClmtuneError(f"{target} has no usable tokenizer ({str(exc).splitlines()[0][:200]}); copy the "
                               "tokenizer files (tokenizer.json or vocab files + tokenizer_config.json) into it") from None
        raise _hub_error(target, exc) from None
    ensure_pad_token(tok)
    return tok


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


def apply_peft(model, settings: PeftSettings):
    """Wrap the model with a fresh adapter from ``peft``."""
    from peft import LoraConfig, TaskType, get_peft_model

    kwargs = dict(settings.options)
    try:
        peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=settings.r, lora_alpha=settings.lora_alpha,
                              lora_dropout=settings.lora_dropout, target_modules=settings.target_modules, **kwargs)
    except TypeError as exc:
        raise ClmtuneError(f"peft.options: {exc}; see peft.LoraConfig for valid options") from None
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ClmtuneError(f"peft could not apply {settings.method} (target_modules={settings.target_modules}): "
                           f"{str(exc).splitlines()[0][:200]}; linear layers of this model: "
                           f"{linear_layer_names(model)}") from None


def forward_inputs(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model inputs for a left-padded batch.

    With left padding, positions must start at 0 on each row's first real token; OPT and BLOOM derive this from the
    attention mask, but GPT-2 and LLaMA number positions from the sequence start unless ``position_ids`` is given.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" in inspect.signature(base.forward).parameters:
        mask = batch["attention_mask"]
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def read_run_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ClmtuneError(f"{run_dir} is not a clmtune run folder (no config.yaml); give the output_dir of "
                           "`clmtune train`")
    return load_config(cfg_path)


def load_run(run_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, RunConfig]:
    """(model with its trained adapter, tokenizer, config) of a finished run folder."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ClmtuneError(f"{run_dir} has no trained adapter ({adapter}/adapter_config.json); did training finish?")
    tok = load_tokenizer(cfg.model, str(run_dir / "tokenizer"))
    model = PeftModel.from_pretrained(load_model(cfg.model, dtype), str(adapter))
    model.eval()
    return model, tok, cfg
