"""Typed run configuration: one dataclass per section, a docstring per field, validated once.

A run is described by a YAML file with the sections below (every key optional; the defaults are the embedded
demo: LoRA on the shipped RAFT ``twitter_complaints`` task). Command-line overrides use dotted keys:
``--train.epochs 3 --data.max_length 128``. ``validate()`` collects every problem and raises one ``ConfigError``
that lists them all. Numbers may be written any way a person writes them: ``3e-4``, ``1e3``, ``.5``, ``1_000``
(YAML 1.1 reads ``3e-4`` as text; clmtune reads it as the number).

Three keys default to ``auto``, chosen from the data when training starts (``clmtune.defaults``; the choice and
the reason are logged and saved in ``train_summary.json`` under ``auto``):

- ``model.name_or_path: auto``: ``builtin:gpt2-zh-small`` (shipped, pretrained) when at least 30 % of the
  characters of a sample of the training text are CJK, else ``builtin:tiny-opt`` (random weights: a loud warning).
- ``train.learning_rate: auto``: per ``peft.method`` (``DEFAULT_LEARNING_RATES``): lora 2e-3, ia3 3e-3,
  prefix_tuning 1e-2, prompt_tuning 3e-2, p_tuning 1e-3, full 3e-4.
- ``data.max_length: auto``: the 99th percentile of the training rows' token lengths (prompt + target + end),
  at most the model's context; the number of rows that are cut is printed.

Modules (this file only re-exports them): ``choices`` (the allowed values and ``PEFT_TABLE``), ``data`` (the
``data`` section), ``sections`` (the other sections), ``task_rules`` (what config knows of each ``data.task``:
``TASK_RULES``), ``checks`` (the rules ``validate()`` applies), ``run_config`` (``RunConfig``), ``io`` (YAML, dicts
and overrides in, YAML out).
"""

from __future__ import annotations

from clmtune.config.choices import (ADAPTER_KEYS, AUTO, AUTO_KEYS, DEFAULT_LEARNING_RATES, DEVICE_PATTERN, END_TOKENS,
                                    EVAL_METHODS, MERGEABLE_METHODS, PADDING, PEFT_CONFIG_CLASSES, PEFT_METHODS,
                                    PEFT_TABLE, PRECISIONS, TEXT_SAMPLE_BY, TRUNCATION_SIDES, PeftMethod,
                                    device_problem)
from clmtune.config.data import DataConfig
from clmtune.config.io import SECTIONS, RawOverride, from_dict, load_config, merge, parse_overrides, save_config
from clmtune.config.run_config import RunConfig, deepspeed_problems, peft_problems
from clmtune.config.sections import (EvalConfig, GenerateConfig, ModelConfig, PeftSettings, PreferenceConfig,
                                     TrainConfig)
from clmtune.config.task_rules import TASK_NAMES, TASK_RULES, TaskRules

__all__ = ["ADAPTER_KEYS", "AUTO", "AUTO_KEYS", "DEFAULT_LEARNING_RATES", "DEVICE_PATTERN", "END_TOKENS",
           "EVAL_METHODS", "MERGEABLE_METHODS", "PADDING", "PEFT_CONFIG_CLASSES", "PEFT_METHODS", "PEFT_TABLE",
           "PRECISIONS", "PeftMethod", "SECTIONS", "TASK_NAMES", "TASK_RULES", "TEXT_SAMPLE_BY", "TRUNCATION_SIDES",
           "DataConfig", "EvalConfig", "GenerateConfig", "ModelConfig", "PeftSettings", "PreferenceConfig",
           "RawOverride", "RunConfig", "TaskRules", "TrainConfig", "deepspeed_problems", "device_problem", "from_dict",
           "load_config", "merge", "parse_overrides", "peft_problems", "save_config"]
