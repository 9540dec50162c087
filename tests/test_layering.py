"""The one rule of the code's shape, checked from the source with ``ast`` (no imports run):

    entry (cli, workflows) -> stages (train, evaluate, generate, chat, serve, export, report, prepare)
        -> foundations (tasks, data, models, run folder, ...) -> base (config, errors)

- no import circle between modules (imports inside functions count: a lazy import hides a circle, it does not
  remove it; ``if TYPE_CHECKING:`` imports do not count);
- no upward import (a foundation importing a stage, a stage importing the entry) and no stage importing another
  stage: what two stages share moves down into a foundation;
- no module importing another module's private (``_name``) names.

``KNOWN`` lists what main still breaks (issue 25, deliverable 3): the test fails on anything new, and on an entry of
``KNOWN`` that no longer happens (remove it, so the list only shrinks). The rule itself is tested on a synthetic
package that breaks each part of it, so this test is able to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "clmtune"

ENTRY = {"cli", "workflows", "__main__"}
STAGES = {"train", "evaluate", "generate", "chat", "serve", "export", "report", "prepare", "ui"}
BASE = {"config", "errors"}
RANK = {"entry": 3, "stage": 2, "foundation": 1, "base": 0}

KNOWN: set[str] = set()


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_package(root: Path, package: str = PACKAGE) -> dict[str, str]:
    """{module name: source} of every module of ``package`` under ``root``."""
    return {module_name(p, root): p.read_text(encoding="utf-8") for p in sorted((root / package).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return skip


def imports(modules: dict[str, str]) -> list[tuple[str, str, list[str]]]:
    """(importer, imported module, names taken from it) for every import of one module of the set by another.
    ``from pkg import sub`` where ``sub`` is a module counts as importing ``pkg.sub``."""
    out = []
    for name, source in modules.items():
        tree = ast.parse(source)
        skip = _type_checking_nodes(tree)
        is_pkg = any(m.startswith(name + ".") for m in modules)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                out += [(name, a.name, []) for a in node.names if a.name in modules]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    here = here[:len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                if base not in modules and not any(m.startswith(base + ".") for m in modules):
                    continue
                names = []
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        out.append((name, f"{base}.{a.name}", []))
                    else:
                        names.append(a.name)
                if names and base in modules:
                    out.append((name, base, names))
    return [(a, b, n) for a, b, n in out if a != b]


def layer(module: str, package: str = PACKAGE) -> tuple[str, str]:
    """(layer, unit): the unit is the top-level module or package below ``package`` (``clmtune.train``)."""
    top = module.split(".")[1] if "." in module else ""
    kind = ("entry" if top in ENTRY else "stage" if top in STAGES else "base" if top in BASE else "foundation")
    return kind, top


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(modules: dict[str, str], package: str = PACKAGE) -> set[str]:
    found = set()
    edges = set()
    for a, b, names in imports(modules):
        # a package's __init__ re-exporting its own modules is no circle: count edges between different units, or
        # between two modules of one unit that are not the package itself
        (ka, ua), (kb, ub) = layer(a, package), layer(b, package)
        if not (b == f"{package}.{ua}" and ua == ub) and not (a == f"{package}.{ua}" and b.startswith(a + ".")):
            edges.add((a, b))
        if ua != ub and RANK[kb] > RANK[ka]:
            found.add(f"upward: {a} -> {b}")
        elif ua != ub and ka == kb == "stage":
            found.add(f"stage->stage: {a} -> {b}")
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                found.add(f"private: {a} imports {b}.{n}")
    for comp in _cycles(edges):
        found.add("circle: " + " <-> ".join(comp))
    return found


def test_the_package_keeps_the_rule():
    found = violations(read_package(SRC))
    new = sorted(found - KNOWN)
    fixed = sorted(KNOWN - found)
    assert not new, "imports that break the layering rule (see this test's docstring):\n" + "\n".join(new)
    assert not fixed, "fixed, remove from KNOWN in tests/test_layering.py:\n" + "\n".join(fixed)


BAD = {
    "pkg": "",
    "pkg.errors": "",
    "pkg.config": "from pkg.tasks import REGISTRY\n",                      # base -> foundation, and a circle
    "pkg.tasks": "from pkg.config import Settings\n",
    "pkg.data": "def f():\n    from pkg.train import run\n",             # foundation -> stage, lazily
    "pkg.train": "from pkg.evaluate import score\nfrom pkg.data import _helper\n",  # stage -> stage, private
    "pkg.evaluate": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.train import run\n",
    "pkg.cli": "from pkg.train import run\nfrom pkg import data\n",       # the entry may import anything
}


def test_the_rule_catches_each_kind_of_break():
    assert violations(BAD, "pkg") == {
        "circle: pkg.config <-> pkg.tasks",
        "circle: pkg.data <-> pkg.train",
        "upward: pkg.config -> pkg.tasks",
        "upward: pkg.data -> pkg.train",
        "stage->stage: pkg.train -> pkg.evaluate",
        "private: pkg.train imports pkg.data._helper",
    }


@pytest.mark.parametrize("fine", [
    {"pkg": "", "pkg.train": "from pkg.data import load\n", "pkg.data": "from pkg.errors import E\n", "pkg.errors": ""},
    {"pkg": "", "pkg.data": "from pkg.data.x import a\n", "pkg.data.x": "import json\n"},
])
def test_the_rule_lets_downward_imports_pass(fine):
    assert violations(fine, "pkg") == set()


def test_config_validates_tasks_with_the_registrys_own_facts():
    """config sits below the task registry, so it validates with ``config.TASK_RULES``; the registry reads its
    facts from the same rows, and a task without a row cannot be registered."""
    from clmtune.config import TASK_RULES, from_dict
    from clmtune.errors import ConfigError
    from clmtune.tasks import Task, get_task, register_task, task_names

    assert task_names() == tuple(TASK_RULES)
    for name, rules in TASK_RULES.items():
        task = get_task(name)
        assert (task.evaluation, task.prompt_learning) == (rules.evaluation, rules.prompt_learning)

    class Unlisted(Task):
        name = "unlisted"

    with pytest.raises(ValueError, match="no row in clmtune.config.TASK_RULES"):
        register_task(Unlisted())
    assert "unlisted" not in task_names()
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"task": "chat", "format": "chatgpt", "train_on": "first"},
                   "peft": {"method": "p_tuning"}}).validate()
    assert e.value.problems == ["data.format='chatgpt' is not one of alpaca, sharegpt, openai (or null to detect it)",
                                "data.train_on='first' is not one of all, last"]
