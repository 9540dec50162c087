"""Size limits of the source (issue 25): no module over ``MAX_MODULE_LINES`` lines, no function (or method) over
``MAX_FUNCTION_LINES`` lines. A long module is split by responsibility, a long function into named steps.

``ALLOWED`` lists the modules still being split (the test fails on anything else over a limit, and on an entry of
``ALLOWED`` that is within the limits again: remove it, so the list only shrinks). The checker itself is tested on
a synthetic source, so this test is able to fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80

ALLOWED: set[str] = set()  # every module is within the limits now; an entry here must name a split under way


def oversized(source: str, name: str) -> list[str]:
    """What in ``source`` (a module called ``name``) is over a limit, one line each."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{name}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_no_module_or_function_is_too_long():
    by_module = {p.relative_to(SRC).as_posix(): oversized(p.read_text(encoding="utf-8"), p.relative_to(SRC).as_posix())
                 for p in sorted((SRC / "clmtune").rglob("*.py"))}
    too_long = [line for name, lines in by_module.items() if name not in ALLOWED for line in lines]
    assert not too_long, "split these by responsibility:\n" + "\n".join(too_long)
    fixed = sorted(name for name in ALLOWED if name in by_module and not by_module[name])
    gone = sorted(name for name in ALLOWED if name not in by_module)
    assert not fixed + gone, "within the limits (or gone): remove from ALLOWED in tests/test_sizes.py:\n" + \
        "\n".join(fixed + gone)


def test_the_checker_catches_long_modules_and_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    long_function = f"def f():\n{body}\n"
    assert oversized(long_function, "m.py") == [f"m.py:1 f: {MAX_FUNCTION_LINES + 1} lines (at most 80)"]
    method = "class C:\n    async def g(self):\n" + "\n".join(f"        y{i} = {i}" for i in range(79)) + "\n"
    assert oversized(method, "m.py") == []  # 80 lines exactly is fine
    long_method = "class C:\n    async def g(self):\n" + "\n".join(f"        y{i} = {i}" for i in range(80)) + "\n"
    assert oversized(long_method, "m.py") == ["m.py:2 g: 81 lines (at most 80)"]
    long_module = "\n".join(f"x{i} = {i}" for i in range(MAX_MODULE_LINES + 1)) + "\n"
    assert oversized(long_module, "m.py") == [f"m.py: {MAX_MODULE_LINES + 1} lines (at most 400)"]
    assert oversized(long_module.rsplit("\n", 2)[0] + "\n", "m.py") == []  # 400 lines: fine
