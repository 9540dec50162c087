"""Typed run configuration: one dataclass per section, a docstring per field, validated once.

A run is described by a YAML file with the sections below (every key optional; the defaults are the embedded
demo: LoRA on the shipped RAFT ``twitter_complaints`` task with the built-in tiny model). Command-line overrides
use dotted keys: ``--train.epochs 3 --data.max_length 128``. ``validate()`` collects every problem and raises one
``ConfigError`` that lists them all.
"""

from __future__ import annotations

import dataclasses
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from clmtune.errors import ConfigError

TASKS = ("classify", "sft", "lm")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")
END_TOKENS = ("eos", "pad")
TRUNCATION_SIDES = ("left", "right")
PADDING = ("longest", "max_length")
PEFT_METHODS = ("lora", "prefix_tuning", "prompt_tuning", "p_tuning", "ia3", "full")
PEFT_CONFIG_CLASSES = {"lora": "LoraConfig", "prefix_tuning": "PrefixTuningConfig", "prompt_tuning": "PromptTuningConfig",
                       "p_tuning": "PromptEncoderConfig", "ia3": "IA3Config"}
"""peft config class of each method (``full`` has none: every weight is trained, no adapter)."""
PROMPT_METHODS = ("prefix_tuning", "prompt_tuning", "p_tuning")
"""Methods that prepend learned virtual tokens; they cannot be merged into the base weights."""
MERGEABLE_METHODS = ("lora", "ia3")
EVAL_METHODS = ("rank", "generate")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
"""Values of ``eval.device`` / ``generate.device``."""


def device_problem(name: object) -> str | None:
    """Why ``name`` is not a device setting (``"'gpu' is not a device: use ..."``), or None when it is one."""
    if re.fullmatch(DEVICE_PATTERN, str(name)):
        return None
    return f"{name!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("fp32", "bf16")


@dataclass
class DataConfig:
    source: str = "builtin:raft/twitter_complaints"
    """Where the examples come from: a CSV/TSV/JSON/JSONL/Parquet/TXT file; a folder with its own split files
    (``train.*``, ``dev.*``/``validation.*``, ``test.*``); a RAFT task folder (``train.csv``, ``test_unlabeled.csv``,
    ``task.json``); a folder of ``.txt`` files; ``hf:NAME`` or ``hf:NAME:SUBSET`` for a Hugging Face dataset (needs
    network the first time); or ``builtin:NAME`` for data shipped with clmtune (``builtin:raft/twitter_complaints``,
    ``builtin:raft/banking_77``, ``builtin:chnsenticorp/ChnSentiCorp_htl_all.csv``)."""

    task: str = "classify"
    """Shape of the work. ``classify``: classification as generation (prompt, then the label's words);
    ``sft``: prompt -> response pairs, loss on the response only; ``lm``: plain causal language modelling on
    ``text_column`` (each text + end token), loss on every real token."""

    template: str = "Tweet text : {Tweet text} label : "
    """Prompt template (``classify``, ``sft``); ``{column}`` placeholders are filled from each row. The label's
    words (``classify``) or the response (``sft``) follow it."""

    response_template: str = "{response}"
    """``sft`` only: template of the response the model learns to write after the prompt (e.g. ``{output}``)."""

    text_column: str = "text"
    """``lm`` only: column with the text to learn (``.txt`` sources have one column, ``text``)."""

    label_column: str = "Label"
    """Column that holds the gold label (a label name, or an index into ``labels``)."""

    id_column: str = "ID"
    """Column with a row identifier, used in predictions files; row numbers are used when the column is absent."""

    labels: list[str] | None = None
    """Label names (the words the model learns to write). ``None``: from ``task.json`` of a RAFT folder or the
    dataset's ClassLabel names, else the sorted distinct values of the label column. Underscores become spaces
    (``no_complaint`` -> ``no complaint``). Integer labels map to names by position: with ``[差评, 好评]``, 0 -> 差评
    and 1 -> 好评; a value that is neither a name nor a valid position is an error."""

    test_file: str | None = None
    """Optional file of rows to predict (``clmtune eval --split test``), labelled or not. A RAFT folder's
    ``test_unlabeled.csv`` or a folder's ``test.*`` file is used when this is unset."""

    eval_file: str | None = None
    """Optional file of labelled held-out rows; a folder's ``dev.*``/``validation.*`` file is used when this is
    unset. When there is one, ``eval_fraction`` is not used."""

    eval_fraction: float = 0.2
    """Fraction of the labelled rows held out for evaluation when the source has no eval split of its own
    (deterministic, ``seed``); 0 trains on all rows."""

    seed: int = 123
    """Seed of the train/eval split (the tutorial's ``train_test_split(0.2, seed=123)``)."""

    stratify: bool = False
    """``classify`` only: keep the label proportions equal in the train and eval splits."""

    dedup: bool = False
    """Drop rows whose prompt and target repeat an earlier row (counted in the report); duplicates are kept by
    default."""

    delimiter: str | None = None
    """Column separator of CSV/TSV files; ``None``: ``,`` for ``.csv`` and a tab for ``.tsv``."""

    encoding: str = "utf-8"
    """Text encoding of the source files (e.g. ``gbk`` for files saved by older Chinese Windows tools)."""

    text_sample_by: str = "line"
    """``.txt`` sources: one example per ``line``, per ``paragraph`` (blank-line separated) or per ``document``
    (whole file); the same choice as ``datasets``' text loader."""

    max_length: int = 64
    """Longest training sequence in tokens: prompt + target + end token (``lm`` without packing: text + end)."""

    truncation_side: str = "left"
    """When a row is too long, the side of the *prompt* that is cut (``left`` keeps the prompt's end, next to the
    label). A classification label and its end token are never cut; an ``sft`` response is cut on the right once
    the prompt is down to half of ``max_length``."""

    end_token: str = "eos"
    """Token appended after the target: the tokenizer's ``eos`` token, or its ``pad`` token (the tutorial's)."""

    padding: str = "longest"
    """``longest``: left-pad each batch to its longest row (fast); ``max_length``: pad every row to
    ``max_length`` (the tutorial's recipe)."""

    pad_to_multiple_of: int | None = None
    """``padding: longest`` only: round each batch's length up to a multiple of this (e.g. 8 for tensor-core or
    oneDNN-friendly shapes); ``None``: exactly the longest row."""

    packing: bool = True
    """``lm`` only: concatenate all texts (each + end token) and cut them into ``block_size`` blocks; ``false``:
    one text per row, cut to ``max_length`` and padded."""

    block_size: int | None = None
    """``lm`` with packing: tokens per block; ``None`` uses ``max_length``. At most the model's context length."""

    prepared: str | None = None
    """Folder written by ``clmtune prepare --save``: training reuses its tokenized splits instead of tokenizing
    again. It must have been prepared with the same data settings and tokenizer."""


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
    """``lora`` (default), ``prefix_tuning``, ``prompt_tuning``, ``p_tuning``, ``ia3`` (all from the ``peft``
    library), or ``full``: fine-tune every weight, no adapter (the run saves a full model)."""

    r: int = 8
    """``lora`` only: rank."""

    lora_alpha: int = 32
    """``lora`` only: scaling numerator (scale = lora_alpha / r)."""

    lora_dropout: float = 0.1
    """``lora`` only: dropout on the LoRA input."""

    target_modules: list[str] | None = None
    """``lora``/``ia3``: module names to adapt; ``None`` uses peft's default for the model's architecture."""

    num_virtual_tokens: int = 8
    """``prefix_tuning``/``prompt_tuning``/``p_tuning``: number of learned virtual tokens put before every input."""

    init_text: str | None = None
    """``prompt_tuning`` only: initialise the virtual tokens from this text's token embeddings (peft's
    ``PromptTuningInit.TEXT``), e.g. ``Classify if the tweet is a complaint or not:``. ``None``: random init."""

    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed as they are to the method's peft config class (``LoraConfig``,
    ``PrefixTuningConfig``, ``PromptTuningConfig``, ``PromptEncoderConfig``, ``IA3Config``); they override the
    fields above (e.g. ``{use_rslora: true}``, ``{encoder_hidden_size: 128}``, ``{feedforward_modules: [fc2]}``)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/twitter_complaints"
    """Run folder: adapter, tokenizer, resolved config, training log, evaluation results."""

    overwrite: bool = False
    """Allow writing into a folder that already holds a finished run."""

    epochs: int = 10
    """Passes over the training split (50 rows of a RAFT task need several)."""

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

    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this before each optimizer step (``transformers.Trainer``'s default);
    ``null`` disables (the peft example's loop does not clip). Under DeepSpeed set ``gradient_clipping`` in its
    JSON instead."""

    seed: int = 42
    """Seed for weight init of adapters, dropout and data order."""

    log_every: int = 1
    """Write a ``train_log.jsonl`` line every N optimizer steps."""

    precision: str = "fp32"
    """``fp32``, or ``bf16`` autocast (weights of trainable parameters stay fp32; frozen base weights are stored in
    bf16 so autocast does not re-cast them every step). On a CPU without bf16 support, training falls back to fp32
    with a warning naming the reason."""

    group_by_length: bool = True
    """Batch rows of similar length together (shuffled groups: rows are shuffled, sorted by length within groups
    of 50 batches, and the batches shuffled), so per-batch padding adds few pad tokens; ``false``: plain shuffle."""

    logits_on_labels_only: bool = True
    """Run the LM head only on the last positions that carry a label (``logits_to_keep``), not at every position;
    the loss is the same. Falls back to full logits (logged) for models whose forward has no ``logits_to_keep``."""

    save_steps: int | None = None
    """Write a checkpoint (adapter, optimizer, scheduler, RNG states, step) every N optimizer steps and at the end,
    into ``output_dir/checkpoints/step-NNNNNN``; ``clmtune train --resume`` continues from the latest.
    ``None``: no checkpoints, only the final adapter."""

    save_total_limit: int | None = 2
    """Keep only the last K checkpoints (older ones are deleted); ``None`` keeps all."""

    deepspeed: str | None = None
    """DeepSpeed config JSON (e.g. ``configs/deepspeed/zero3_offload.json``) handed to the engine through
    ``accelerate``; needs ``pip install deepspeed`` and GPUs. ``None``: plain DDP / single process."""


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

    device: str = "auto"
    """Where evaluation runs: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``."""


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

    device: str = "auto"
    """Where generation runs: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``."""

    dtype: str = "auto"
    """Precision of the weights for generation: ``auto`` (bf16 where the CPU/GPU has native bf16 matrix units:
    avx512_bf16/AMX, Ampere+; else fp32), ``bf16`` or ``fp32``. See ``clmtune.device``."""


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
        choice("data.text_sample_by", d.text_sample_by, TEXT_SAMPLE_BY)
        choice("peft.method", self.peft.method, PEFT_METHODS)
        choice("eval.method", e.method, EVAL_METHODS)
        choice("train.precision", t.precision, PRECISIONS)
        p.extend(peft_problems(self.peft))
        if t.save_steps is not None:
            positive("train.save_steps", t.save_steps)
        if t.save_total_limit is not None:
            positive("train.save_total_limit", t.save_total_limit)
        if t.deepspeed is not None:
            p.extend(deepspeed_problems(t.deepspeed))
        if not d.template:
            p.append("data.template is empty; give a prompt such as 'Text : {text} label : '")
        if not 0 <= d.eval_fraction < 1:
            p.append(f"data.eval_fraction={d.eval_fraction!r} must be in [0, 1)")
        if d.labels is not None and len(set(d.labels)) != len(d.labels):
            p.append(f"data.labels has duplicates: {d.labels}")
        positive("data.max_length", d.max_length)
        if d.pad_to_multiple_of is not None and d.pad_to_multiple_of <= 0:
            p.append(f"data.pad_to_multiple_of={d.pad_to_multiple_of!r} must be a positive integer such as 8, or "
                     "null to pad each batch to exactly its longest row")
        if d.block_size is not None:
            positive("data.block_size", d.block_size)
        if d.task == "sft" and not d.response_template:
            p.append("data.response_template is empty; give the response column, e.g. '{response}'")
        if d.task == "lm" and not d.text_column:
            p.append("data.text_column is empty; give the column with the text to learn, e.g. 'text'")
        if (d.task == "lm" and d.packing and d.padding == "max_length" and d.block_size is not None
                and d.block_size > d.max_length):
            p.append(f"data.block_size={d.block_size} is larger than data.max_length={d.max_length} with "
                     "data.padding=max_length; make them equal or use data.padding: longest")
        if d.delimiter is not None and len(d.delimiter) != 1:
            p.append(f"data.delimiter={d.delimiter!r} must be one character, e.g. ',' or '\\t'")
        positive("peft.r", self.peft.r)
        positive("train.epochs", t.epochs)
        if t.max_steps is not None:
            positive("train.max_steps", t.max_steps)
        positive("train.batch_size", t.batch_size)
        positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
        positive("train.learning_rate", t.learning_rate)
        positive("train.log_every", t.log_every)
        positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
        if t.max_grad_norm is not None:
            positive("train.max_grad_norm", t.max_grad_norm)
        positive("eval.batch_size", e.batch_size)
        positive("generate.max_new_tokens", g.max_new_tokens)
        positive("generate.temperature", g.temperature, allow_zero=True)
        positive("generate.top_k", g.top_k, allow_zero=True)
        positive("generate.num_return_sequences", g.num_return_sequences)
        positive("generate.repetition_penalty", g.repetition_penalty)
        positive("generate.batch_size", g.batch_size)
        choice("generate.dtype", g.dtype, ("auto", "fp32", "bf16"))
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
        if p:
            raise ConfigError(p)
        return self


def peft_problems(s: PeftSettings) -> list[str]:
    """Method-specific checks; ``peft.options`` keys are checked against the peft config class's own fields."""
    p: list[str] = []
    if s.method not in PEFT_METHODS:
        return p  # already reported by validate()
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
    if s.target_modules is not None and s.method not in ("lora", "ia3"):
        p.append(f"peft.target_modules is only used by lora and ia3, not {s.method}; remove it")
    if s.options:
        import peft  # ~1 s import, only paid when options are given

        cls = getattr(peft, PEFT_CONFIG_CLASSES[s.method])
        known = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        unknown = sorted(k for k in s.options if k not in known)
        if unknown:
            p.append(f"peft.options {unknown} are not options of {cls.__name__} (peft.method={s.method}); valid "
                     f"options: {', '.join(known)}")
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
