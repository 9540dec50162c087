"""Reading a configuration: YAML files, nested dicts and ``--section.key VALUE`` overrides, type-checked; writing
it back."""

from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from clmtune.config.run_config import RunConfig
from clmtune.config.choices import AUTO, AUTO_KEYS
from clmtune.errors import ConfigError


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
KEY_ALIASES = {("preference", "lambda"): "lambda_"}
"""YAML keys that are Python keywords, and the field that holds them."""


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` keeps the last of two equal keys without a word (two ``train:`` sections: the first is
    lost); this loader refuses them, naming the key and both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                hashable = key in seen
            except TypeError:
                continue  # an unhashable key: the base loader reports it
            if hashable:
                raise _DuplicateKey(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one of them "
                                    "(merge the two into one section)")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


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
    if optional and name in AUTO_KEYS and isinstance(value, str) and value.strip().lower() == AUTO:
        return None  # chosen from the data / method when training starts (clmtune.defaults)
    if origin in (int, float) and isinstance(value, str):
        value = _number(name, value, origin, problems)
        if value is None:
            return None
    if origin is int and isinstance(value, float):
        if value.is_integer():
            return int(value)  # "max_steps: 1.0e+3"
        problems.append(f"{name}={value!r} must be an integer")
        return value
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{name}={value!r} must be a finite number")
        return value
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


def _number(name: str, text: str, kind: type, problems: list[str]) -> int | float | None:
    """A number as a person writes it (``3e-4``, ``1e3``, ``.5``, ``1_000``, ``+2``): YAML 1.1 leaves the first
    two as strings. Returns None (and adds a problem) when ``text`` is no finite number of the field's type."""
    try:
        number = float(text.strip())  # Python's float() reads every one of those forms, underscores included
    except ValueError:
        kind_name = "an integer" if kind is int else "a number"
        problems.append(f"{name}={text!r} must be {kind_name} (e.g. {'100' if kind is int else '3e-4'})")
        return None
    if not math.isfinite(number):
        problems.append(f"{name}={text!r} must be a finite number")
        return None
    if kind is int:
        if not number.is_integer():
            problems.append(f"{name}={text!r} must be an integer")
            return None
        return int(number)
    return number


def structure_problems(raw: Any, where: str = "the config") -> list[str]:
    """A config must be a mapping of sections, each a mapping of keys (``train: 5``, ``data: [a, b]`` or a whole
    file that is a list would otherwise be dropped silently and the defaults used)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [f"{where} must be a mapping of sections (data:, model:, peft:, train:, eval:, generate:), "
                f"got {_short(raw)} ({type(raw).__name__})"]
    return [f"section {sec}: must be a mapping of keys (e.g. {sec}: {{key: value}}), got {_short(v)} "
            f"({type(v).__name__})" for sec, v in raw.items() if v is not None and not isinstance(v, dict)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def from_dict(raw: dict[str, Any] | None) -> RunConfig:
    """Build a RunConfig from nested dicts and validate it; unknown sections/keys, wrong types and invalid values
    are all reported together in one ConfigError."""
    problems = structure_problems(raw)
    if problems and not isinstance(raw, dict):
        raise ConfigError(problems)
    sections: dict[str, Any] = {}
    for sec_name, sec_raw in (raw or {}).items():
        if sec_name not in SECTIONS:
            problems.append(f"unknown section {sec_name!r} (known: {', '.join(SECTIONS)})")
            continue
        cls = get_type_hints(RunConfig)[sec_name]  # the section's dataclass (annotations are strings)
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in (sec_raw if isinstance(sec_raw, dict) else {}).items():
            key = KEY_ALIASES.get((sec_name, key), key)
            if key not in hints:
                problems.append(f"unknown key {sec_name}.{key} (known: {', '.join(hints)})")
                continue
            before = len(problems)
            coerced = _coerce(f"{sec_name}.{key}", value, hints[key], problems)
            if len(problems) == before:  # a value of the wrong type is left out, so validate() can still run
                kwargs[key] = coerced
        sections[sec_name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    if problems:
        try:
            cfg.validate()
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
        raise ConfigError(problems)
    return cfg


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
        elif out.get(sec) is None or not isinstance(values, dict):
            out[sec] = values
        # else: the base section is not a mapping (``train: 5``); keep it, so that from_dict reports it
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (or the embedded defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            inside = path / "config.yaml"
            hint = f"give {inside}" if inside.is_file() else "give a YAML file (see configs/ for examples)"
            raise ConfigError([f"config file {str(path)!r} is a folder; {hint}"])
        if not path.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist; see configs/ for examples"])
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
            if raw is None:
                raise ConfigError([f"config file {str(path)!r} is empty (no settings); write its sections (see "
                                   "configs/), or leave out --config to use the embedded defaults"])
        except _DuplicateKey as exc:
            raise ConfigError([f"{path}: {exc}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path} is not valid YAML: {exc}".replace("\n", " ")]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"]) \
                from None
        if not isinstance(raw, dict):
            raise ConfigError(structure_problems(raw, f"{path}"))
    return from_dict(merge(raw, overrides or {})).validate()


def save_config(cfg: RunConfig, path: str | Path) -> None:
    raw = cfg.to_dict()
    for (sec, key), field_name in KEY_ALIASES.items():  # written as the user writes it (``lambda``)
        if field_name in raw.get(sec, {}):
            raw[sec] = {(key if k == field_name else k): v for k, v in raw[sec].items()}
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
