"""What the configuration knows about each ``data.task``: its name, its default evaluation, whether peft's
prompt-learning methods can train it, and the checks of the ``data`` settings only it has. ``RunConfig.validate``
reads this table; the task registry (``clmtune.tasks``, above config) takes each task's facts from its row, so
config never asks the registry. Adding a task shape: a row here, a module with its ``Task``, a registration.

The allowed values of the chat settings live here too (``CHAT_FORMATS``, ``TRAIN_ON``, ``CHAT_COLUMNS``): the
chat task reads them from here.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

from clmtune.config.data import DataConfig

CHAT_FORMATS = ["alpaca", "sharegpt", "openai"]
"""Values of ``data.format`` (``None``: detected from the columns). ``tasks.conversations.register_conversation_format``
adds a new shape's name here, so the configuration accepts it without asking the registry above it."""
TRAIN_ON = ("all", "last")
"""Values of ``data.train_on``."""
CHAT_COLUMNS = {
    "instruction": "instruction", "input": "input", "output": "output", "system": "system", "history": "history",
    "conversations": "conversations", "messages": "messages", "role": None, "content": None,
}
"""Our field -> the file's column (the keys ``data.columns`` may map). ``role``/``content`` name the keys inside each
message (``None``: ``from``/``value`` or ``role``/``content``, whichever the message has)."""


def template_problem(template: str, key: str = "data.template") -> str | None:
    """Why ``template`` is not a template of plain ``{column}`` placeholders, or None when it is one."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return (f"{key}={template!r} is not a valid template ({exc}); write placeholders as {{column}}, and literal "
                "braces as {{ }}")
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        raw = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if conversion or spec:
            return (f"{key}={template!r}: placeholder {raw} has a format spec or conversion; only plain "
                    f"{{column}} placeholders are allowed (write {{{name}}}, and literal braces as {{{{ }}}})")
        if not name.strip():
            return (f"{key}={template!r}: empty placeholder {{}}; name a column, e.g. {{text}} (literal braces: "
                    "{{ }})")
        if "{" in name or "}" in name:
            return (f"{key}={template!r}: nested braces in placeholder {raw}; only plain {{column}} placeholders "
                    "are allowed")
    return None


def classify_problems(d: DataConfig) -> list[str]:
    problem = template_problem(d.template, "data.template") if d.template else None
    return [problem] if problem else []


def sft_problems(d: DataConfig) -> list[str]:
    p = [template_problem(d.template, "data.template") if d.template else None]
    if not d.response_template:
        p.append("data.response_template is empty; give the response column, e.g. '{response}'")
    else:
        p.append(template_problem(d.response_template, "data.response_template"))
    return [x for x in p if x]


def lm_problems(d: DataConfig) -> list[str]:
    p = []
    if not d.text_column:
        p.append("data.text_column is empty; give the column with the text to learn, e.g. 'text'")
    if (d.packing and d.padding == "max_length" and d.block_size is not None and d.max_length is not None
            and d.block_size > d.max_length):
        p.append(f"data.block_size={d.block_size} is larger than data.max_length={d.max_length} with "
                 "data.padding=max_length; make them equal or use data.padding: longest")
    return p


def chat_problems(d: DataConfig) -> list[str]:
    p = []
    if d.format is not None and d.format not in CHAT_FORMATS:
        p.append(f"data.format={d.format!r} is not one of {', '.join(CHAT_FORMATS)} (or null to detect it)")
    if d.train_on not in TRAIN_ON:
        p.append(f"data.train_on={d.train_on!r} is not one of {', '.join(TRAIN_ON)}")
    unknown = sorted(set(d.columns or {}) - set(CHAT_COLUMNS))
    if unknown:
        p.append(f"data.columns has unknown field(s) {unknown}; map any of {sorted(CHAT_COLUMNS)} to your "
                 "column names")
    return p


def pair_column_problems(d: DataConfig) -> list[str]:
    keys = ("prompt_column", "chosen_column", "rejected_column")
    if len({getattr(d, k) for k in keys}) < 3:
        return [f"data.prompt_column, data.chosen_column and data.rejected_column must be three different columns"
                f" ({', '.join(repr(getattr(d, k)) for k in keys)})"]
    return []


def no_problems(d: DataConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class TaskRules:
    name: str
    evaluation: str
    """The default evaluation of a run: ``labels`` (predict a label per example, accuracy/F1), ``replies``
    (generated replies and perplexity), ``perplexity`` or ``preference`` (reward accuracy)."""
    prompt_learning: bool = True
    """peft's prompt-learning methods (prefix/prompt/p-tuning) can train this shape."""
    data_problems: Callable[[DataConfig], list[str]] = no_problems
    """Problems of the ``data`` settings that only this task has (``RunConfig.validate`` reports them)."""


TASK_RULES = {r.name: r for r in (
    TaskRules("classify", "labels", data_problems=classify_problems),
    TaskRules("sft", "replies", data_problems=sft_problems),
    TaskRules("lm", "perplexity", data_problems=lm_problems),
    TaskRules("chat", "replies", data_problems=chat_problems),
    TaskRules("preference", "preference", prompt_learning=False, data_problems=pair_column_problems),
)}
TASK_NAMES = tuple(TASK_RULES)
