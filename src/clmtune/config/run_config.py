"""``RunConfig``: all sections together, and ``validate()``, which collects every problem into one ``ConfigError``
(the rules are in ``config.checks``; what only one task checks, in ``config.task_rules``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from clmtune.config import checks
from clmtune.config.checks import WATCH_METRICS, deepspeed_problems, peft_problems  # noqa: F401  (re-exported)
from clmtune.config.data import DataConfig
from clmtune.config.sections import (EvalConfig, GenerateConfig, ModelConfig, PeftSettings, PreferenceConfig,
                                     TrainConfig)
from clmtune.errors import ConfigError


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSettings = field(default_factory=PeftSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check every value; raise one ConfigError listing all problems."""
        p = [*checks.finite_problems(self), *checks.choice_problems(self), *checks.model_problems(self),
             *checks.peft_problems(self.peft), *checks.checkpoint_problems(self.train, self.data.task),
             *checks.data_problems(self.data), *checks.task_problems(self),
             *checks.preference_problems(self.preference), *checks.delimiter_problems(self.data),
             *checks.optimizer_problems(self), *checks.inference_problems(self.eval, self.generate)]
        if p:
            raise ConfigError(p)
        return self
