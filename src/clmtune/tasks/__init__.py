"""Task shapes (``data.task``) and their registry. See ``tasks.base.Task`` for what a task owns.

Adding a shape: a module with a ``Task`` subclass, and one ``register_task(...)`` line below.
"""

from __future__ import annotations

from clmtune.config.task_rules import TASK_RULES
from clmtune.errors import ClmtuneError
from clmtune.tasks.base import Task
from clmtune.tasks.chat import ChatTask
from clmtune.tasks.classify import ClassifyTask
from clmtune.tasks.lm import LmTask
from clmtune.tasks.preference import PreferenceTask
from clmtune.tasks.sft import SftTask

_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if not task.name:
        raise ValueError(f"{type(task).__name__} has no name")
    if task.name not in TASK_RULES:
        raise ValueError(f"task {task.name!r} has no row in clmtune.config.TASK_RULES (its evaluation and the checks "
                         "of its data settings); add one")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ClmtuneError(f"data.task={name!r} is not one of {', '.join(task_names())}") from None


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


register_task(ClassifyTask())
register_task(SftTask())
register_task(LmTask())
register_task(ChatTask())
register_task(PreferenceTask())

__all__ = ["Task", "get_task", "register_task", "task_names"]
