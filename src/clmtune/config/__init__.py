"""Typed run configuration: one dataclass per section, a docstring per field, validated once.

A run is described by a YAML file with the sections below (every key optional; the defaults are the embedded
demo: LoRA on the shipped RAFT ``twitter_complaints`` task with the built-in tiny model). Command-line overrides
use dotted keys: ``--train.epochs 3 --data.max_length 128``. ``validate()`` collects every problem and raises one
``ConfigError`` that lists them all.

Modules (this file only re-exports them): ``sections`` (the section dataclasses and allowed values),
``run_config`` (``RunConfig`` and its validation; task names come from the ``clmtune.tasks`` registry), ``io``
(YAML, dicts and overrides in, YAML out).
"""

from __future__ import annotations

from clmtune.config.io import SECTIONS, RawOverride, from_dict, load_config, merge, parse_overrides, save_config
from clmtune.config.run_config import RunConfig, deepspeed_problems, peft_problems
from clmtune.config.sections import (DEVICE_PATTERN, END_TOKENS, EVAL_METHODS, MERGEABLE_METHODS, PADDING,
                                     PEFT_CONFIG_CLASSES, PEFT_METHODS, PRECISIONS, TEXT_SAMPLE_BY, TRUNCATION_SIDES,
                                     DataConfig, EvalConfig, GenerateConfig, ModelConfig, PeftSettings, TrainConfig,
                                     device_problem)

__all__ = ["DEVICE_PATTERN", "END_TOKENS", "EVAL_METHODS", "MERGEABLE_METHODS", "PADDING", "PEFT_CONFIG_CLASSES",
           "PEFT_METHODS", "PRECISIONS", "SECTIONS", "TEXT_SAMPLE_BY", "TRUNCATION_SIDES", "DataConfig", "EvalConfig",
           "GenerateConfig", "ModelConfig", "PeftSettings", "RawOverride", "RunConfig", "TrainConfig",
           "deepspeed_problems", "device_problem", "from_dict", "load_config", "merge", "parse_overrides",
           "peft_problems", "save_config"]
