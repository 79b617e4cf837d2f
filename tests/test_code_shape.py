"""Functions that fit on a screen: no function of the package has more than 80 lines of code (its docstring,
which a public function's arguments make long, not counted). Complexity is ruff's (mccabe ≤ 15, pyproject)."""

from __future__ import annotations

import ast

from helpers import ROOT

MAX_LINES = 80


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted((ROOT / "lorasurgeon").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and code_lines(node) > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({code_lines(node)} lines)")
    assert not long, long
