"""The rules of a run configuration, one function per section or concern, each returning its problems as lines
(``RunConfig.validate`` joins them into one ``ConfigError``)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from clmtune.config.choices import (ATTN_IMPLEMENTATIONS, END_TOKENS, EVAL_METHODS, MODEL_DTYPES, PADDING,
                                    PEFT_CONFIG_CLASSES, PEFT_METHODS, PEFT_TABLE, PRECISIONS, PREFERENCE_LOSSES,
                                    TEXT_SAMPLE_BY, TRUNCATION_SIDES, device_problem)
from clmtune.config.data import DataConfig
from clmtune.config.sections import EvalConfig, GenerateConfig, PeftSettings, PreferenceConfig, TrainConfig
from clmtune.config.task_rules import TASK_NAMES, TASK_RULES

if TYPE_CHECKING:
    from clmtune.config.run_config import RunConfig

WATCH_METRICS = {"eval_loss": "min", "eval_accuracy": "max", "eval_macro_f1": "max"}
TRACKERS = ("tensorboard",)
PROMPT_LEARNING = ("prefix_tuning", "prompt_tuning", "p_tuning")


def choice(name: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    return [] if value in allowed else [f"{name}={value!r} is not one of {', '.join(allowed)}"]


def positive(name: str, value: float | None, allow_zero: bool = False, optional: bool = False) -> list[str]:
    """``value`` > 0 (or >= 0); ``optional``: ``None`` is fine too."""
    if value is None and optional:
        return []
    if value < 0 or (value == 0 and not allow_zero):
        return [f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}"]
    return []


def finite_problems(cfg: "RunConfig") -> list[str]:
    """nan/inf pass every ``< 0`` check: they are rejected first."""
    p = []
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            value = getattr(getattr(cfg, sec.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                p.append(f"{sec.name}.{f.name}={value!r} must be a finite number")
    return p


def choice_problems(cfg: "RunConfig") -> list[str]:
    d = cfg.data
    return [*choice("data.task", d.task, TASK_NAMES), *choice("data.end_token", d.end_token, END_TOKENS),
            *choice("data.truncation_side", d.truncation_side, TRUNCATION_SIDES),
            *choice("data.padding", d.padding, PADDING),
            *choice("data.text_sample_by", d.text_sample_by, TEXT_SAMPLE_BY),
            *choice("peft.method", cfg.peft.method, PEFT_METHODS),
            *choice("eval.method", cfg.eval.method, EVAL_METHODS),
            *choice("train.precision", cfg.train.precision, PRECISIONS)]


def data_problems(d: DataConfig) -> list[str]:
    """The ``data`` settings every task shares (``task_problems``: the ones only a task has)."""
    p: list[str] = []
    if not d.template:
        p.append("data.template is empty; give a prompt such as 'Text : {text} label : '")
    if not 0 <= d.eval_fraction < 1:
        p.append(f"data.eval_fraction={d.eval_fraction!r} must be in [0, 1)")
    if d.labels is not None and not d.labels:
        p.append("data.labels=[] names no label; leave it out (or null) to take the labels from the data, or list "
                 "them: [a, b]")
    if d.labels is not None and len(set(d.labels)) != len(d.labels):
        p.append(f"data.labels has duplicates: {d.labels}")
    p += positive("data.max_length", d.max_length, optional=True)
    for key in ("max_train_rows", "max_eval_rows"):
        p += positive(f"data.{key}", getattr(d, key), optional=True)
    if d.labels is not None and len(d.labels) == 1 and re.search(r"[,，、]", d.labels[0]):
        parts = [x.strip() for x in re.split(r"[,，、]", d.labels[0]) if x.strip()]
        p.append(f"data.labels is one label {d.labels[0]!r}; for {len(parts)} labels write the list in brackets: "
                 f"--data.labels \"[{', '.join(parts)}]\" (YAML: labels: [{', '.join(parts)}])")
    if d.pad_to_multiple_of is not None and d.pad_to_multiple_of <= 0:
        p.append(f"data.pad_to_multiple_of={d.pad_to_multiple_of!r} must be a positive integer such as 8, or "
                 "null to pad each batch to exactly its longest row")
    p += positive("data.block_size", d.block_size, optional=True)
    return p


def task_problems(cfg: "RunConfig") -> list[str]:
    """The ``data`` settings only ``data.task`` has, and the PEFT methods it cannot train (``TASK_RULES``)."""
    d, method = cfg.data, cfg.peft.method
    if d.task not in TASK_RULES:
        return []  # reported by choice_problems
    rules = TASK_RULES[d.task]
    p = rules.data_problems(d)
    if not rules.prompt_learning and method in PROMPT_LEARNING:
        p.append(f"peft.method={method} does not work with data.task={d.task} (the reference model and the paired "
                 "forward need an adapter on the weights); use lora, ia3 or full")
    return p


def delimiter_problems(d: DataConfig) -> list[str]:
    if d.delimiter is not None and len(d.delimiter) != 1:
        return [f"data.delimiter={d.delimiter!r} must be one character, e.g. ',' or '\\t'"]
    return []


def checkpoint_problems(t: TrainConfig, task: str) -> list[str]:
    """Saving, DeepSpeed and in-training evaluation."""
    p = positive("train.save_steps", t.save_steps, optional=True)
    p += positive("train.save_total_limit", t.save_total_limit, optional=True)
    if t.deepspeed is not None:
        p += deepspeed_problems(t.deepspeed)
    return p + watch_problems(t, task)


def optimizer_problems(cfg: "RunConfig") -> list[str]:
    """``peft.r`` and the numbers of the training loop."""
    t = cfg.train
    return [*positive("peft.r", cfg.peft.r), *positive("train.epochs", t.epochs),
            *positive("train.max_steps", t.max_steps, optional=True), *positive("train.batch_size", t.batch_size),
            *positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
            *positive("train.learning_rate", t.learning_rate, optional=True),
            *positive("train.log_every", t.log_every), *positive("train.warmup_steps", t.warmup_steps, allow_zero=True),
            *positive("train.max_grad_norm", t.max_grad_norm, optional=True)]


def inference_problems(e: EvalConfig, g: GenerateConfig) -> list[str]:
    """The ``eval`` and ``generate`` sections."""
    p = [*positive("eval.batch_size", e.batch_size), *positive("generate.max_new_tokens", g.max_new_tokens),
         *positive("generate.temperature", g.temperature, allow_zero=True),
         *positive("generate.top_k", g.top_k, allow_zero=True),
         *positive("generate.num_return_sequences", g.num_return_sequences),
         *positive("generate.repetition_penalty", g.repetition_penalty),
         *positive("generate.batch_size", g.batch_size),
         *choice("generate.dtype", g.dtype, PRECISIONS), *choice("eval.dtype", e.dtype, PRECISIONS)]
    if g.temperature == 0 and g.num_return_sequences > 1:
        p.append(f"generate.num_return_sequences={g.num_return_sequences} needs sampling: greedy decoding "
                 "(temperature 0) gives one continuation; set a temperature > 0")
    if any(not s for s in g.stop):
        p.append("generate.stop has an empty string; remove it")
    if not 0 < g.top_p <= 1:
        p.append(f"generate.top_p={g.top_p!r} must be in (0, 1]")
    for name, dev in (("eval.device", e.device), ("generate.device", g.device)):
        if problem := device_problem(dev):
            p.append(f"{name}={problem}")
    return p


def watch_problems(t: TrainConfig, task: str) -> list[str]:
    """train.eval_steps, eval_max_rows, save_best, early_stopping_patience, report_to."""
    p: list[str] = []
    for name in ("eval_steps", "early_stopping_patience"):
        value = getattr(t, name)
        if value is not None and value <= 0:
            p.append(f"train.{name}={value!r} must be > 0 (or null to turn it off)")
    if t.eval_max_rows <= 0:
        p.append(f"train.eval_max_rows={t.eval_max_rows!r} must be > 0")
    for name in ("save_best", "early_stopping_patience"):
        if getattr(t, name) and t.eval_steps is None:
            p.append(f"train.{name} needs train.eval_steps (evaluate every N steps), e.g. --train.eval_steps 50")
    if t.save_best is not None:
        metric, mode = t.save_best.get("metric"), t.save_best.get("mode", WATCH_METRICS.get(t.save_best.get("metric")))
        allowed = [m for m in WATCH_METRICS if m == "eval_loss" or task not in TASK_RULES
                   or TASK_RULES[task].evaluation == "labels"]
        if unknown := sorted(set(t.save_best) - {"metric", "mode"}):
            p.append(f"train.save_best has unknown keys {unknown}; give {{metric: eval_accuracy, mode: max}}")
        if metric not in allowed:
            p.append(f"train.save_best.metric={metric!r} is not one of {', '.join(allowed)} (data.task={task})")
        if mode not in ("max", "min"):
            p.append(f"train.save_best.mode={mode!r} must be max or min")
        if t.deepspeed is not None:
            p.append("train.save_best is not supported with train.deepspeed (the best weights would have to be "
                     "re-sharded); remove one of them")
    if bad := [x for x in t.report_to if x not in TRACKERS]:
        p.append(f"train.report_to has {bad}; supported: {', '.join(TRACKERS)}")
    return p


def preference_problems(s: PreferenceConfig) -> list[str]:
    p = []
    if s.loss not in PREFERENCE_LOSSES:
        p.append(f"preference.loss={s.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
    for key in ("beta", "lambda_"):
        if getattr(s, key) <= 0:
            p.append(f"preference.{key.rstrip('_')}={getattr(s, key)!r} must be > 0")
    if not 0 <= s.label_smoothing < 0.5:
        p.append(f"preference.label_smoothing={s.label_smoothing!r} must be in [0, 0.5)")
    if s.precompute_reference and s.loss in ("orpo", "simpo"):
        p.append(f"preference.precompute_reference is for dpo and ipo; preference.loss={s.loss} uses no reference "
                 "model: remove it")
    return p


def peft_problems(s: PeftSettings) -> list[str]:
    """Method-specific checks; ``peft.options`` keys are checked against the peft config class's own fields."""
    p: list[str] = []
    if s.method not in PEFT_METHODS:
        return p  # already reported by choice_problems
    if s.num_virtual_tokens <= 0:
        p.append(f"peft.num_virtual_tokens={s.num_virtual_tokens!r} must be > 0")
    if s.init_text is not None and s.method != "prompt_tuning":
        p.append(f"peft.init_text is only used by prompt_tuning, not {s.method}; remove it or set "
                 "peft.method: prompt_tuning")
    if s.init_text is not None and not s.init_text.strip():
        p.append("peft.init_text is empty; give a sentence such as 'Classify if the tweet is a complaint or not:'")
    if s.method == "full":
        if s.options:
            p.append(f"peft.options {sorted(s.options)} given, but peft.method=full uses no peft config; remove them")
        return p
    if s.target_modules is not None and "target_modules" not in PEFT_TABLE[s.method].settings:
        users = " and ".join(n for n, m in PEFT_TABLE.items() if "target_modules" in m.settings)
        p.append(f"peft.target_modules is only used by {users}, not {s.method}; remove it")
    if s.options:
        import peft  # ~1 s import, only paid when options are given

        cls = getattr(peft, PEFT_CONFIG_CLASSES[s.method])
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        unknown = sorted(k for k in s.options if k not in known)
        if unknown:
            p.append(f"peft.options {unknown} are not options of {cls.__name__} (peft.method={s.method}); valid "
                     f"options: {', '.join(known)}")
    return p


def model_problems(cfg: "RunConfig") -> list[str]:
    """``model.dtype`` and the bitsandbytes loading switches, against the method."""
    m, method = cfg.model, cfg.peft.method
    if m.dtype not in MODEL_DTYPES:
        return [f"model.dtype={m.dtype!r} is not one of {', '.join(MODEL_DTYPES)}"]
    p = []
    if m.attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
        p.append(f"model.attn_implementation={m.attn_implementation!r} is not one of "
                 f"{', '.join(ATTN_IMPLEMENTATIONS)} (or leave it unset for transformers' default)")
    if m.load_in_4bit and m.load_in_8bit:
        p.append("model.load_in_4bit and model.load_in_8bit are both true; choose one")
    if method == "full" and (m.load_in_4bit or m.load_in_8bit):
        p.append("peft.method=full cannot train quantized weights; use an adapter method (e.g. lora) with "
                 "model.load_in_4bit/load_in_8bit, or load in fp32")
    elif method == "full" and m.dtype != "fp32":
        p.append(f"peft.method=full trains every weight, which model.dtype={m.dtype} would keep in {m.dtype} "
                 "(AdamW updates lost to rounding); use model.dtype: fp32 with train.precision: bf16")
    if method == "prefix_tuning" and cfg.train.gradient_checkpointing:
        p.append("peft.method=prefix_tuning does not work with train.gradient_checkpointing (peft refuses it: the "
                 "prefix lives in the attention cache, which recomputation would extend twice); set it to false or "
                 "use prompt_tuning/p_tuning/lora")
    return p


def deepspeed_problems(path: str) -> list[str]:
    """The DeepSpeed file must exist, be JSON, and choose ZeRO stage 2 or 3 (what clmtune ships and documents)."""
    import json

    f = Path(path).expanduser()
    if not f.is_file():
        return [f"train.deepspeed={path!r}: no such file (examples ship in configs/deepspeed/)"]
    try:
        ds = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"train.deepspeed={path!r} is not valid JSON ({exc})"]
    stage = ds.get("zero_optimization", {}).get("stage") if isinstance(ds, dict) else None
    if stage not in (2, 3):
        return [f"train.deepspeed={path!r}: zero_optimization.stage is {stage!r}; clmtune supports ZeRO stage 2 or 3 "
                "(see configs/deepspeed/zero2.json, zero3_offload.json)"]
    if stage == 3 and ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save") is not True:
        return [f"train.deepspeed={path!r}: ZeRO-3 without zero_optimization.stage3_gather_16bit_weights_on_model_save"
                ": true saves empty adapters (each process only holds a shard); set it to true"]
    return []
