"""Built-in models: the tiny test models built from configs (no weights to download) and the models shipped in
``assets/models``, cached under ``$CLMTUNE_HOME``; ``resolve_model_path`` maps ``builtin:NAME`` to a folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from clmtune.data.sources import BUILTIN_PREFIX, assets_path
from clmtune.errors import ClmtuneError


BUILTIN_VERSION = "2"  # bump when a built-in model's recipe changes, so caches are rebuilt


def clmtune_home() -> Path:
    """Cache folder for built-in models (``$CLMTUNE_HOME``, default ``~/.cache/clmtune``)."""
    return Path(os.environ.get("CLMTUNE_HOME", Path.home() / ".cache" / "clmtune")).expanduser()


def opt_bpe_tokenizer():
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

    tok = opt_bpe_tokenizer()
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

    tok = opt_bpe_tokenizer()  # the OPT vocabulary is GPT-2's byte-level BPE (+4 specials)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=2,
                     eos_token_id=2, pad_token_id=1)
    return GPT2LMHeadModel(cfg), tok


def _tiny_bloom():
    from transformers import BloomConfig, BloomForCausalLM

    tok = opt_bpe_tokenizer()  # BLOOM's own 250k vocabulary is not shipped; the architecture is what matters here
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4, bos_token_id=2, eos_token_id=2,
                      pad_token_id=1)
    return BloomForCausalLM(cfg), tok


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = opt_bpe_tokenizer()  # no sentencepiece vocabulary is shipped; LLaMA-family architecture, BPE vocab
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
# trained by clmtune itself; scripts/maint/pretrain_default.py reproduces them. Unlike BUILTIN_MODELS nothing is built.
SHIPPED_MODELS = {
    "gpt2-zh-small": "GPT-2, 8 layers x 288 (10.4 M parameters), BERT Chinese char vocab cut to 7,996; pretrained "
                     "on CLUECorpusSmall (sample) + ChnSentiCorp train reviews. The default for the Chinese configs "
                     "and `make demo`.",
}


def builtin_model_path(name: str) -> Path:
    """Folder of a built-in model: a shipped pretrained one, or a tiny random one built (seeded) on first use."""
    if name in SHIPPED_MODELS:
        folder = assets_path(f"models/{name}")
        if not (folder / "model.safetensors").is_file():
            raise ClmtuneError(f"builtin:{name} is missing from this installation ({folder}/model.safetensors); "
                               "reinstall clmtune or rebuild it with scripts/maint/pretrain_default.py")
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
