"""Loading tokenizers and causal LMs through ``transformers``' Auto classes, the context length, devices."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from clmtune.config import ModelConfig, device_problem
from clmtune.errors import ClmtuneError
from clmtune.models.builtin import resolve_model_path
from clmtune.models.peft_methods import is_prompt_learning, unwrap

log = logging.getLogger("clmtune")


def _hub_error(name: str, exc: Exception) -> ClmtuneError:
    return ClmtuneError(f"could not load {name!r}: it is not a local folder, and downloading it from the Hugging Face "
                        f"hub failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Hub downloads need "
                        "network; on an offline machine download the model elsewhere and pass its folder")


def _remote_code_error(target: str, exc: Exception) -> ClmtuneError | None:
    """transformers refuses a repository that ships its own Python code unless trust_remote_code is set; say
    which clmtune setting allows it instead of transformers' keyword argument."""
    text = str(exc)
    if "custom code" not in text and "trust_remote_code" not in text:
        return None
    return ClmtuneError(f"{target} ships its own model code (auto_map in its config), which clmtune does not run "
                        "unless you allow it: set model.trust_remote_code: true in the config "
                        "(train: --model.trust_remote_code true), only for a repository you trust")


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
        if remote := _remote_code_error(target, exc):
            raise remote from None
        if Path(target).is_dir():
            raise ClmtuneError(f"{target} has no usable tokenizer ({str(exc).splitlines()[0][:200]}); copy the "
                               "tokenizer files (tokenizer.json or vocab files + tokenizer_config.json) into it") from None
        raise _hub_error(target, exc) from None
    ensure_pad_token(tok)
    return tok


VOCAB_MIN_FILL = 0.75
"""A tokenizer must cover at least this share of the embedding rows (the rest is taken as padding)."""


def check_tokenizer_fits(model, tokenizer, where: str) -> None:
    """A tokenizer with more entries than the model has embedding rows would index past the embedding (an
    IndexError deep in the forward pass, or garbage on GPU): stop early and say both numbers. A few fewer entries
    is normal (vocabularies are often padded to a multiple of 8/64); far fewer means another vocabulary."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # DeepSpeed ZeRO-3 partitions it: a 0-size local tensor
    if len(tokenizer) > rows:
        raise ClmtuneError(f"the tokenizer of {where} has {len(tokenizer)} entries but the model's embedding has "
                           f"{rows} rows; use the tokenizer saved with this model (or resize the embedding with "
                           "model.resize_token_embeddings and save both)")
    # Far fewer entries than rows is not padding but another vocabulary (a BPE model with the BERT character
    # tokenizer: 21,128 entries for 50,265 rows): every id would mean a different token and training "works" on
    # noise. Padding adds a few percent at most (Qwen2: 151,665 -> 151,936; phi-2: 50,295 -> 51,200).
    if len(tokenizer) < rows * VOCAB_MIN_FILL:
        raise ClmtuneError(f"the tokenizer of {where} has {len(tokenizer)} entries but the model's embedding has "
                           f"{rows} rows: they are not the same vocabulary; use the tokenizer saved with this model")


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


def context_length(model_or_cfg) -> int | None:
    """How many token positions the input may take: the model's position table (``max_position_embeddings`` & co.
    of its config), minus the virtual tokens a loaded prompt-learning model puts in front of the input. ``None``
    when there is no fixed limit (ALiBi models such as BLOOM) or, given a ``ModelConfig``, when its config cannot
    be read here (loading the model reports that).

    Takes a ``ModelConfig`` (before loading: training checks ``data.max_length`` against it) or a loaded model
    (generation fits the prompt + new tokens into it)."""
    from transformers import AutoConfig

    if isinstance(model_or_cfg, ModelConfig):
        cfg = model_or_cfg
        try:
            target = resolve_model_path(cfg.name_or_path)
            mc = AutoConfig.from_pretrained(target, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, ClmtuneError):
            return None
        return _position_limit(mc)
    n = _position_limit(model_or_cfg.config)
    if n and is_prompt_learning(model_or_cfg):
        n -= unwrap(model_or_cfg).active_peft_config.num_virtual_tokens
    return n


def _position_limit(config) -> int | None:
    config = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_safetensors(folder: str | Path, fix: str = "copy the model again") -> None:
    """Every ``*.safetensors`` file in ``folder`` has a complete header covering the whole file (a truncated copy
    or an interrupted write would otherwise surface as a SafetensorError traceback deep inside loading)."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001  SafetensorError, OSError: all mean "this file cannot be read"
            raise ClmtuneError(f"{f} is corrupt or truncated ({str(exc).splitlines()[0][:120]}, "
                               f"{f.stat().st_size} bytes); {fix}") from None


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        check_safetensors(folder)
        return
    if any(n.endswith(".bin") or n.endswith(".bin.index.json") for n in names):
        if allow_pickle:
            return
        raise ClmtuneError(f"{folder} only has pickled weights (pytorch_model.bin); convert them to safetensors, or "
                           "set model.allow_pickle_weights: true if you trust the file")
    raise ClmtuneError(f"{folder} holds no model weights (*.safetensors); is it the right folder?")


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_dtype(cfg: ModelConfig) -> torch.dtype:
    """The torch dtype of ``model.dtype`` (the frozen base's storage precision in training)."""
    return TORCH_DTYPES[cfg.dtype]


def quantization_config(cfg: ModelConfig):
    """transformers' ``BitsAndBytesConfig`` for ``model.load_in_4bit``/``load_in_8bit``, or None; a one-line
    ClmtuneError where bitsandbytes is not installed."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    import importlib.util

    what = "model.load_in_4bit" if cfg.load_in_4bit else "model.load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ClmtuneError(f"{what} needs the bitsandbytes package (pip install bitsandbytes) and a device it "
                           "supports (a CUDA GPU); without them set it to false (model.dtype: bf16 halves memory)")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:  # QLoRA's settings: NF4, double quantization, compute in the model dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=model_dtype(cfg))
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, quantize: bool = False):
    """``AutoModelForCausalLM`` from a local folder, a hub id or a built-in name. ``quantize``: apply
    ``model.load_in_4bit``/``load_in_8bit`` (training loads the frozen base this way)."""
    from transformers import AutoModelForCausalLM

    target = resolve_model_path(cfg.name_or_path)
    if Path(target).is_dir():
        _check_weights(Path(target), cfg.allow_pickle_weights)
    quant = quantization_config(cfg) if quantize else None
    extra = {"quantization_config": quant} if quant is not None else {}
    if cfg.attn_implementation:
        extra["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
            use_safetensors=None if cfg.allow_pickle_weights else True, **extra)
    except (ImportError, RuntimeError) as exc:
        if quant is None:
            raise
        # transformers' bitsandbytes checks (no GPU, a build without this device's kernels): one line, not a trace
        raise ClmtuneError(f"cannot load {target} with {'4' if cfg.load_in_4bit else '8'}-bit bitsandbytes "
                           f"quantization here ({str(exc).splitlines()[0][:200]}); set model.load_in_4bit/"
                           "load_in_8bit to false, or train on a device bitsandbytes supports") from None
    except (OSError, ValueError) as exc:
        if remote := _remote_code_error(target, exc):
            raise remote from None
        if Path(target).is_dir():
            raise ClmtuneError(f"could not load the model in {target}: {str(exc).splitlines()[0][:300]}") from None
        raise _hub_error(target, exc) from None
    return model


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
