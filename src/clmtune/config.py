"""Typed run configuration: one dataclass per section, a docstring per field, validated once.

A run is described by a YAML file with the sections below (every key optional; the defaults are the embedded
demo: LoRA on the shipped RAFT ``twitter_complaints`` task with the built-in tiny model). Command-line overrides
use dotted keys: ``--train.epochs 3 --data.max_length 128``. ``validate()`` collects every problem and raises one
``ConfigError`` that lists them all.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from clmtune.errors import ConfigError

TASKS = ("classify",)
END_TOKENS = ("eos", "pad")
TRUNCATION_SIDES = ("left", "right")
PADDING = ("longest", "max_length")
PEFT_METHODS = ("lora",)
EVAL_METHODS = ("rank", "generate")
PRECISIONS = ("fp32", "bf16")


@dataclass
class DataConfig:
    source: str = "builtin:raft/twitter_complaints"
    """Where the examples come from: a CSV/TSV/JSON/JSONL/Parquet file, a RAFT task folder (``train.csv``,
    ``test_unlabeled.csv``, ``task.json``), or ``builtin:raft/twitter_complaints`` for the data shipped with
    clmtune."""

    task: str = "classify"
    """Shape of the work. ``classify``: classification as generation (prompt, then the label's words)."""

    template: str = "Tweet text : {Tweet text} label : "
    """Prompt template; ``{column}`` placeholders are filled from each row. The label's words follow it."""

    label_column: str = "Label"
    """Column that holds the gold label (a label name)."""

    id_column: str = "ID"
    """Column with a row identifier, used in predictions files; row numbers are used when the column is absent."""

    labels: list[str] | None = None
    """Label names (the words the model learns to write). ``None``: from ``task.json`` of a RAFT folder, else the
    sorted distinct values of the label column. Underscores become spaces (``no_complaint`` -> ``no complaint``)."""

    test_file: str | None = None
    """Optional file of unlabelled rows to predict (``clmtune eval --split test``). A RAFT folder's
    ``test_unlabeled.csv`` is used when this is unset."""

    eval_fraction: float = 0.2
    """Fraction of the labelled rows held out for evaluation (deterministic, ``seed``); 0 trains on all rows."""

    seed: int = 123
    """Seed of the train/eval split (the tutorial's ``train_test_split(0.2, seed=123)``)."""

    max_length: int = 64
    """Longest training sequence in tokens: prompt + label + end token."""

    truncation_side: str = "left"
    """When a row is too long, the side of the *prompt* that is cut (``left`` keeps the prompt's end, next to the
    label). The label and end token are never cut."""

    end_token: str = "eos"
    """Token appended after the label: the tokenizer's ``eos`` token, or its ``pad`` token (the tutorial's)."""

    padding: str = "longest"
    """``longest``: left-pad each batch to its longest row (fast); ``max_length``: pad every row to
    ``max_length`` (the tutorial's recipe)."""


@dataclass
class ModelConfig:
    name_or_path: str = "builtin:tiny-opt"
    """A local model folder, a Hugging Face hub id (needs network the first time), or ``builtin:tiny-opt``: a
    tiny randomly initialised OPT model with the real OPT/GPT-2 BPE tokenizer, for trying clmtune out."""

    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id."""

    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off unless you trust that repository."""

    allow_pickle_weights: bool = False
    """Also load ``pytorch_model.bin`` (pickle) weights when a folder has no ``.safetensors`` file. They are
    loaded with ``torch.load(weights_only=True)``; still, only enable this for files you trust."""


@dataclass
class PeftSettings:
    method: str = "lora"
    """Parameter-efficient method from the ``peft`` library."""

    r: int = 8
    """LoRA rank."""

    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / r)."""

    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""

    target_modules: list[str] | None = None
    """Module names to adapt; ``None`` uses peft's default for the model's architecture."""

    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed as they are to peft's config class."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/twitter_complaints"
    """Run folder: adapter, tokenizer, resolved config, training log, evaluation results."""

    overwrite: bool = False
    """Allow writing into a folder that already holds a finished run."""

    epochs: int = 3
    """Passes over the training split."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``epochs`` when reached first)."""

    batch_size: int = 8
    """Rows per forward pass."""

    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""

    learning_rate: float = 3e-3
    """Peak learning rate of AdamW (the peft example uses 3e-2 for prompt tuning; LoRA likes ~1e-3..3e-3)."""

    weight_decay: float = 0.0
    """AdamW weight decay."""

    warmup_steps: int = 0
    """Linear warm-up steps, then linear decay to 0."""

    seed: int = 42
    """Seed for weight init of adapters, dropout and data order."""

    log_every: int = 1
    """Write a ``train_log.jsonl`` line every N optimizer steps."""

    precision: str = "fp32"
    """``fp32``, or ``bf16`` autocast (weights of trainable parameters stay fp32)."""


@dataclass
class EvalConfig:
    method: str = "rank"
    """``rank``: score every label's tokens after the prompt and pick the most likely (never invalid);
    ``generate``: greedy decoding, compared with the label names (the peft example's method)."""

    batch_size: int = 16
    """Rows per forward pass during evaluation."""

    normalize_by_length: bool = False
    """``rank`` only: compare mean instead of summed log-likelihood per label token."""

    map_invalid: bool = True
    """``generate`` only: also report metrics with each invalid output mapped to the nearest label by edit distance
    (as peft's example does for RAFT submissions); the raw metrics are always reported too. Submissions use the
    mapped labels."""


@dataclass
class GenerateConfig:
    max_new_tokens: int = 32
    """Upper bound on generated tokens per sequence."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""

    top_k: int = 10
    """Sample among the k most likely tokens (0 disables)."""

    top_p: float = 1.0
    """Nucleus sampling: smallest set of tokens with this total probability (1 disables)."""

    num_return_sequences: int = 1
    """Continuations per prompt."""

    seed: int = 0
    """Seed for sampling, so output is reproducible."""

    repetition_penalty: float = 1.0
    """Divide the logits of tokens already in the sequence by this (CTRL paper's penalty; 1 disables)."""

    stop: list[str] = field(default_factory=list)
    """Stop a continuation when it contains one of these strings (the string itself is not returned)."""

    batch_size: int = 8
    """Prompts per ``generate`` call (left-padded together)."""

    truncate: bool = True
    """A prompt longer than the model's context (minus ``max_new_tokens``) keeps its end and a warning is logged;
    ``False``: it is an error."""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSettings = field(default_factory=PeftSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Check every value; raise one ConfigError listing all problems."""
        p: list[str] = []

        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                p.append(f"{name}={value!r} is not one of {', '.join(allowed)}")

        def positive(name: str, value: float, allow_zero: bool = False) -> None:
            if value < 0 or (value == 0 and not allow_zero):
                p.append(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")

        d, t, e, g = self.data, self.train, self.eval, self.generate
        choice("data.task", d.task, TASKS)
        choice("data.end_token", d.end_token, END_TOKENS)
        choice("data.truncation_side", d.truncation_side, TRUNCATION_SIDES)
        choice("data.padding", d.padding, PADDING)
        choice("peft.method", self.peft.method, PEFT_METHODS)
        choice("eval.method", e.method, EVAL_METHODS)
        choice("train.precision", t.precision, PRECISIONS)
        if not d.template:
            p.append("data.template is empty; give a prompt such as 'Text : {text} label : '")
        if not 0 <= d.eval_fraction < 1:
            p.append(f"data.eval_fraction={d.eval_fraction!r} must be in [0, 1)")
        if d.labels is not None and len(set(d.labels)) != len(d.labels):
            p.append(f"data.labels has duplicates: {d.labels}")
        positive("data.max_length", d.max_length)
        positive("peft.r", self.peft.r)
        positive("train.epochs", t.epochs)
        if t.max_steps is not None:
            positive("train.max_steps", t.max_steps)
        positive("train.batch_size", t.batch_size)
        positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
        positive("train.learning_rate", t.learning_rate)
        positive("train.log_every", t.log_every)
        positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
        positive("eval.batch_size", e.batch_size)
        positive("generate.max_new_tokens", g.max_new_tokens)
        positive("generate.temperature", g.temperature, allow_zero=True)
        positive("generate.top_k", g.top_k, allow_zero=True)
        positive("generate.num_return_sequences", g.num_return_sequences)
        positive("generate.repetition_penalty", g.repetition_penalty)
        positive("generate.batch_size", g.batch_size)
        if g.temperature == 0 and g.num_return_sequences > 1:
            p.append(f"generate.num_return_sequences={g.num_return_sequences} needs sampling: greedy decoding "
                     "(temperature 0) gives one continuation; set a temperature > 0")
        if any(not s for s in g.stop):
            p.append("generate.stop has an empty string; remove it")
        if not 0 < g.top_p <= 1:
            p.append(f"generate.top_p={g.top_p!r} must be in (0, 1]")
        if p:
            raise ConfigError(p)
        return self


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _coerce(name: str, value: Any, annotation: Any, problems: list[str]) -> Any:
    """Check a YAML value against a field annotation; ints are accepted for floats."""
    hint = annotation
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
        cls = globals()[SECTIONS[sec_name]] if isinstance(SECTIONS[sec_name], str) else SECTIONS[sec_name]
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


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["--train.epochs", "3", "--data.labels", "[a, b]"]`` -> nested dict; values are parsed as YAML."""
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
        out.setdefault(section, {})[name] = yaml.safe_load(value)
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
