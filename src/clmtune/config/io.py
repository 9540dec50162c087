"""Reading a configuration: YAML files, nested dicts and ``--section.key VALUE`` overrides, type-checked; writing
it back."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from clmtune.config.run_config import RunConfig
from clmtune.errors import ConfigError


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _coerce(name: str, value: Any, annotation: Any, problems: list[str]) -> Any:
    """Check a YAML value against a field annotation; ints are accepted for floats."""
    hint = annotation
    if isinstance(value, RawOverride):
        if hint is str or (get_origin(hint) in (Union, types.UnionType) and str in get_args(hint)
                           and not value.strip().lower() in ("null", "~", "none")):
            return str(value)
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            problems.append(f"{name}={str(value)!r} could not be read as a value (YAML)")
            return value
    optional = False
    if get_origin(hint) in (Union, types.UnionType):
        optional = type(None) in get_args(hint)
        hint = [a for a in get_args(hint) if a is not type(None)][0]
    if value is None:
        if not optional:
            problems.append(f"{name} may not be empty")
        return value
    base = hint
    origin = get_origin(base) or base
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # "--model.revision 1" is a string to the user
    if origin is Any or isinstance(value, origin):
        if origin is int and isinstance(value, bool):
            problems.append(f"{name}={value!r} must be an integer")
        return value
    if origin is list and isinstance(value, str):  # "--peft.target_modules q_proj" -> ["q_proj"]
        return [value]
    kind = getattr(origin, "__name__", str(origin))
    problems.append(f"{name}={value!r} must be of type {kind}")
    return value


def from_dict(raw: dict[str, Any] | None) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown sections/keys and wrong types are reported together."""
    raw = raw or {}
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"the config must be a mapping of sections, got {type(raw).__name__}"])
    sections: dict[str, Any] = {}
    for sec_name, sec_raw in raw.items():
        if sec_name not in SECTIONS:
            problems.append(f"unknown section {sec_name!r} (known: {', '.join(SECTIONS)})")
            continue
        cls = get_type_hints(RunConfig)[sec_name]  # the section's dataclass (annotations are strings)
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in (sec_raw or {}).items():
            if key not in hints:
                problems.append(f"unknown key {sec_name}.{key} (known: {', '.join(hints)})")
                continue
            kwargs[key] = _coerce(f"{sec_name}.{key}", value, hints[key], problems)
        sections[sec_name] = cls(**kwargs)
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections)


class RawOverride(str):
    """A command-line value, parsed as YAML only when its field is not a string (so that a template such as
    ``{text} label :`` stays text instead of becoming a YAML mapping)."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["--train.epochs", "3", "--data.labels", "[a, b]"]`` -> nested dict of ``RawOverride`` values."""
    out: dict[str, Any] = {}
    it = iter(pairs)
    for key in it:
        if not key.startswith("--") or "." not in key:
            raise ConfigError([f"override {key!r} must look like --section.key VALUE (e.g. --train.epochs 3)"])
        try:
            value = next(it)
        except StopIteration:
            raise ConfigError([f"override {key} has no value"]) from None
        section, _, name = key[2:].partition(".")
        out.setdefault(section, {})[name] = RawOverride(value)
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for sec, values in extra.items():
        if isinstance(out.get(sec), dict) and isinstance(values, dict):
            out[sec].update(values)
        else:
            out[sec] = values
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or the embedded defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist; see configs/ for examples"])
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path} is not valid YAML: {exc}".replace("\n", " ")]) from None
    return from_dict(merge(raw, overrides or {})).validate()


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
