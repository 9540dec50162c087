"""The settings form and the YAML: the page's ``Settings`` become a config dict, YAML text is read and written,
and every config is checked by clmtune's own validation plus the workspace fence."""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import Field

from clmtune.config import from_dict
from clmtune.config.io import structure_problems
from clmtune.ui.common import Strict, UiError
from clmtune.ui.workspace import RUNS, Workspace


class Settings(Strict):
    """The form: the keys a newcomer sets; everything else keeps clmtune's defaults (edit the YAML for more)."""
    name: str = Field(description="run name: the run folder is runs/<name>")
    source: str = Field(description="data file (workspace-relative) or builtin:...")
    task: str = Field("classify", description="a registered task (clmtune.tasks); checked by clmtune's validation")
    template: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    response_template: str | None = None
    labels: list[str] | None = None
    eval_fraction: float | None = Field(None, ge=0, lt=1)
    max_train_rows: int | None = Field(None, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    max_length: int | Literal["auto"] | None = "auto"
    model: str = "auto"
    method: str = Field("lora", description="a peft method (config.PEFT_METHODS); checked by clmtune's validation")
    r: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    learning_rate: float | Literal["auto"] | None = "auto"
    save_steps: int | None = Field(None, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    log_every: int | None = Field(None, ge=1)
    seed: int | None = None


class YamlBody(Strict):
    yaml: str = Field(max_length=200_000)
    name: str | None = None
    overwrite: bool = False


def settings_to_dict(s: Settings) -> dict:
    data = {"source": s.source, "task": s.task}
    for key in ("template", "text_column", "label_column", "response_template", "labels", "eval_fraction",
                "max_train_rows", "max_eval_rows"):
        value = getattr(s, key)
        if value not in (None, "", []):
            data[key] = value
    if s.max_length not in (None, "auto"):
        data["max_length"] = s.max_length
    peft = {"method": s.method}
    if s.r is not None and s.method == "lora":
        peft["r"] = s.r
    train = {"output_dir": f"{RUNS}/{s.name}"}
    for key in ("epochs", "max_steps", "batch_size", "save_steps", "eval_steps", "log_every", "seed"):
        if getattr(s, key) is not None:
            train[key] = getattr(s, key)
    if s.learning_rate not in (None, "auto"):
        train["learning_rate"] = s.learning_rate
    return {"data": data, "model": {"name_or_path": s.model or "auto"}, "peft": peft, "train": train}


def dump_yaml(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def parse_yaml(text: str) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UiError(400, f"the YAML does not parse: {exc}".replace("\n", " "))
    if not isinstance(raw, dict):
        raise UiError(400, "; ".join(structure_problems(raw, "the YAML")))
    return raw


def validate(ws: Workspace, raw: dict) -> None:
    """clmtune's own validation (one line per problem), then: every path the config names stays in the workspace."""
    from_dict(raw).validate()
    data, train = raw.get("data") or {}, raw.get("train") or {}
    for key in ("source", "eval_file", "test_file", "prepared"):
        if data.get(key):
            ws.check_inside(str(data[key]), f"data.{key}")
    if train.get("output_dir"):
        ws.check_inside(str(train["output_dir"]), "train.output_dir")
    if train.get("deepspeed"):
        ws.check_inside(str(train["deepspeed"]), "train.deepspeed")
    model = str((raw.get("model") or {}).get("name_or_path", "auto"))
    if model != "auto" and not model.startswith("builtin:"):
        ws.check_inside(model, "model.name_or_path")
