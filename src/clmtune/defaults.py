"""Defaults chosen from the data (a foundation): the ``auto`` values of a config, resolved before any work.

``resolve_defaults(cfg)`` returns a copy of ``cfg`` with every ``auto`` replaced by a concrete value, and a record
of each choice and its reason (``train_summary.json``: ``auto``; ``clmtune prepare``'s report). Each choice is
logged, so a newcomer sees which model, learning rate and sequence length their run uses and why:

- ``model.name_or_path: auto`` -> ``builtin:gpt2-zh-small`` (shipped, pretrained) for Chinese text, else
  ``builtin:tiny-opt`` (random weights);
- ``train.learning_rate: auto`` -> ``config.DEFAULT_LEARNING_RATES[peft.method]``;
- ``data.max_length: auto`` -> 99th percentile of the training rows' token lengths, at most the model's context.

It also warns, once per run, about what would otherwise go unnoticed: a model with random weights, adapter keys
that ``peft.method: full`` ignores, and an explicit ``data.max_length`` that cuts many rows.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clmtune.config import ADAPTER_KEYS, AUTO, DEFAULT_LEARNING_RATES, PeftSettings, RunConfig
from clmtune.tasks import Task, get_task
from clmtune.tasks.examples import TaskData

log = logging.getLogger("clmtune")

CHINESE_MODEL = "builtin:gpt2-zh-small"
OTHER_MODEL = "builtin:tiny-opt"
RANDOM_WEIGHT_PREFIX = "builtin:tiny-"
"""Built-in models built from a config with random weights (``models.BUILTIN_MODELS``)."""
MODEL_LORA = {CHINESE_MODEL: {"r": 64, "target_modules": ["c_attn", "c_proj", "c_fc", "wte"], "learning_rate": 1e-3}}
"""LoRA settings a model needs to learn well, used when ``peft.target_modules`` (``learning_rate``: when
``train.learning_rate``) is unset: the shipped Chinese model learns sentiment through its character embedding
(ChnSentiCorp after 2,000 rows: 80.1 % with ``wte``, 61.1 % = the majority class without), and on all 9,600 rows
r 64 at lr 1e-3 reaches 91.0 % where r 16 at LoRA's general 2e-3 stays at 86.6-87.7 % (MODEL_CARD.md): the settings
of ``configs/chnsenticorp_classify.yaml``."""
CUT_WARNING_SHARE = 0.05
"""An explicit ``data.max_length`` that cuts more than this share of the training rows gets a warning."""


def has_random_weights(name_or_path: str) -> bool:
    return name_or_path.startswith(RANDOM_WEIGHT_PREFIX)


def ignored_adapter_keys(s: PeftSettings) -> list[str]:
    """``peft`` keys set to something other than their default that ``peft.method: full`` does not use."""
    if s.method != "full":
        return []
    default = PeftSettings()
    return [k for k in ADAPTER_KEYS if getattr(s, k) != getattr(default, k)]


@dataclass
class Resolved:
    """A config with its ``auto`` values chosen, the record of each choice, the task it names (looked up here once)
    and the examples read to choose them (``None`` when no choice needed the data): the stages take these instead
    of reading the source again."""

    cfg: RunConfig
    auto: dict[str, Any]
    examples: TaskData | None = None
    task: Task | None = None
    """The task shape of ``cfg.data.task`` (the registry's object), looked up once here."""


def resolve_defaults(cfg: RunConfig, announce: bool = True, choices: bool = True) -> tuple[RunConfig, dict[str, Any]]:
    """``cfg`` with its ``auto`` values chosen, and ``{key: {"value": ..., "why": ...}}`` for each choice.

    ``announce``: log the choices and warnings (off on the non-main processes of a distributed run); ``choices``:
    log the choices too (off where the caller prints them itself, as ``prepare``'s report does).
    """
    r = resolve_run(cfg, announce, choices)
    return r.cfg, r.auto


class Resolution:
    """One resolution's record of choices (``auto``), the examples once read, and where choices and warnings go."""

    def __init__(self, cfg: RunConfig, announce: bool, choices: bool):
        self.cfg, self.task = cfg, get_task(cfg.data.task)
        self.say = log.info if announce and choices else log.debug
        self.warn = log.warning if announce else log.debug
        self.chosen: dict[str, Any] = {}
        self.examples: TaskData | None = None

    def read_examples(self) -> TaskData:
        """The data source, read at most once per resolution."""
        if self.examples is None:
            from clmtune.data import load_task

            self.examples = load_task(self.cfg.data, self.task)
        return self.examples


def resolve_run(cfg: RunConfig, announce: bool = True, choices: bool = True) -> Resolved:
    """``resolve_defaults``, keeping the examples it read (``Resolved.examples``) for ``prepare_data`` and the task
    (``Resolved.task``)."""
    r = Resolution(copy.deepcopy(cfg), announce, choices)
    choose_model(r)
    if has_random_weights(r.cfg.model.name_or_path):
        r.warn("*** %s has RANDOM weights: it knows no language and learns only from your rows, so its predictions "
               "show that the pipeline works, not what fine-tuning can reach. For real results use a pretrained "
               "model: --model.name_or_path FOLDER (or builtin:gpt2-zh-small for Chinese text) ***",
               r.cfg.model.name_or_path)
    tuned = MODEL_LORA.get(r.cfg.model.name_or_path)
    choose_lora_modules(r, tuned)
    choose_learning_rate(r, tuned)
    ignored = ignored_adapter_keys(r.cfg.peft)
    if ignored:
        r.warn("peft.method=full trains every weight and uses no adapter: %s ignored; remove %s from the config",
               ", ".join(f"peft.{k}={getattr(r.cfg.peft, k)!r}" for k in ignored),
               "it" if len(ignored) == 1 else "them")
    choose_max_length(r)
    return Resolved(r.cfg, r.chosen, r.examples, r.task)


def choose_model(r: Resolution) -> None:
    """``model.name_or_path: auto``: the shipped Chinese model for Chinese text, else the tiny random one."""
    from clmtune.data.profile import CJK_THRESHOLD, cjk_share, text_sample

    cfg = r.cfg
    if cfg.model.name_or_path != AUTO:
        return
    share = cjk_share(text_sample(r.read_examples().train, cfg.data.seed))
    chinese = share >= CJK_THRESHOLD
    cfg.model.name_or_path = CHINESE_MODEL if chinese else OTHER_MODEL
    why = (f"{share:.0%} of the letters in a sample of the training text are Chinese characters (>= "
           f"{CJK_THRESHOLD:.0%}): the shipped pretrained Chinese model" if chinese else
           f"{share:.0%} of the letters in a sample of the training text are Chinese characters (< "
           f"{CJK_THRESHOLD:.0%}) and clmtune ships no pretrained model for other languages: the tiny "
           "random-weight model")
    r.chosen["model.name_or_path"] = {"value": cfg.model.name_or_path, "why": why, "cjk_share": round(share, 4)}
    r.say("model.name_or_path: auto -> %s (%s; set model.name_or_path to choose)", cfg.model.name_or_path, why)


def choose_lora_modules(r: Resolution, tuned: dict | None) -> None:
    """The LoRA modules (and rank) a shipped model needs, when ``peft.target_modules`` is unset."""
    cfg = r.cfg
    if not (tuned and cfg.peft.method == "lora" and cfg.peft.target_modules is None):
        return
    cfg.peft.target_modules = list(tuned["target_modules"])
    if cfg.peft.r == PeftSettings().r:
        cfg.peft.r = tuned["r"]
    why = (f"{cfg.model.name_or_path} learns through its character embedding: LoRA on every linear layer and "
           "wte (peft's default, c_attn alone, stays at the majority class)")
    r.chosen["peft.target_modules"] = {"value": cfg.peft.target_modules, "r": cfg.peft.r, "why": why}
    r.say("peft.target_modules: unset -> %s, r %d (%s; set peft.target_modules to choose)",
          cfg.peft.target_modules, cfg.peft.r, why)


def choose_learning_rate(r: Resolution, tuned: dict | None) -> None:
    """``train.learning_rate: auto``: the method's default, or LoRA's rate for a shipped model."""
    cfg = r.cfg
    if cfg.train.learning_rate is not None:
        return
    method = cfg.peft.method
    cfg.train.learning_rate = DEFAULT_LEARNING_RATES[method]
    why = f"the default for peft.method={method}"
    if method == "lora" and tuned and "learning_rate" in tuned:
        cfg.train.learning_rate = tuned["learning_rate"]
        why = f"LoRA's rate for {cfg.model.name_or_path} (its model card)"
    r.chosen["train.learning_rate"] = {"value": cfg.train.learning_rate, "why": why}
    r.say("train.learning_rate: auto -> %g (%s; set train.learning_rate to choose)", cfg.train.learning_rate, why)


def choose_max_length(r: Resolution) -> None:
    """``data.max_length: auto`` from the training rows' token lengths (measured as trained: chat renders its
    template), or the length a prepared folder used; an explicit length that cuts many rows gets a warning."""
    d = r.cfg.data
    lm_packed = d.task == "lm" and d.packing and d.block_size is not None  # max_length is not used then
    meta_file = Path(d.prepared or ".") / "clmtune_prepared.json"
    if d.max_length is None and d.prepared and meta_file.is_file():  # the saved splits were cut at a length already
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        d.max_length = meta["data"]["max_length"]
        r.chosen["data.max_length"] = {"value": d.max_length, "why": f"the length data.prepared={d.prepared} used"}
    elif not lm_packed:
        lengths, context = token_lengths(r)
        if d.max_length is None and lengths:
            auto_length(r, lengths, context)
        elif lengths and d.max_length is not None:
            warn_cut(r, lengths, context)
        elif d.max_length is None:
            d.max_length = 64  # no training rows: the data stage reports that with its own error


def token_lengths(r: Resolution) -> tuple[list[int], int | None]:
    """The training rows' token lengths, with the tokenizer set up as the task trains, and the model's context."""
    from clmtune.data.profile import sequence_lengths
    from clmtune.models import context_length, load_tokenizer

    d = r.cfg.data
    examples = r.read_examples()
    context = context_length(r.cfg.model)
    level = log.level
    log.setLevel(max(level, logging.WARNING))  # the stage loads the tokenizer again and logs its pad token
    try:
        tokenizer = load_tokenizer(r.cfg.model)
    finally:
        log.setLevel(level)
    r.task.prepare_tokenizer(tokenizer, d)  # chat: measure the rendered template, as trained
    return (sequence_lengths(tokenizer, d, examples.train, r.task) if examples.train else []), context


def auto_length(r: Resolution, lengths: list[int], context: int | None) -> None:
    from clmtune.data.profile import auto_max_length

    d = r.cfg.data
    d.max_length, facts = auto_max_length(lengths, context)
    why = (f"99th percentile of the {facts['rows']} training rows' token lengths ({facts['p99_tokens']}, "
           f"longest {facts['longest_tokens']}), rounded up to a multiple of 8"
           + (f", at most the model's context ({context})" if context else ""))
    r.chosen["data.max_length"] = {**facts, "why": why}
    r.say("data.max_length: auto -> %d (%s): %d of %d training rows will be cut (set data.max_length to "
          "choose)", d.max_length, why, facts["rows_cut"], facts["rows"])


def warn_cut(r: Resolution, lengths: list[int], context: int | None) -> None:
    from clmtune.data.profile import auto_max_length

    d = r.cfg.data
    cut = sum(1 for n in lengths if n > d.max_length)
    if cut > CUT_WARNING_SHARE * len(lengths):
        _, facts = auto_max_length(lengths, context)
        r.warn("data.max_length=%d cuts %d of %d training rows (%.0f%%); their 99th percentile is %d tokens: "
               "raise data.max_length or set it to auto", d.max_length, cut, len(lengths),
               100 * cut / len(lengths), facts["p99_tokens"])
